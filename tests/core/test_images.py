"""The shared image decoder: every odd image a user can have either decodes the same way or is refused."""

from __future__ import annotations

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from indexer.core.images import IMAGE_EXTENSIONS, DecodeOptions, ImageError, load_image, load_photo


def _png_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", **kw)
    return buf.getvalue()


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares a huge canvas (a decompression bomb)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_rgba_is_composited_on_white():
    img = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    out = load_image(_png_bytes(img))
    assert out.mode == "RGB"
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_palette_with_transparency_is_composited():
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    out = load_image(_png_bytes(img, transparency=0))
    assert out.getpixel((0, 0)) == (255, 255, 255)


def test_sixteen_bit_is_scaled_not_clipped():
    arr = np.full((4, 4), 32768, dtype=np.uint16)
    img = Image.fromarray(arr, mode="I;16")
    out = load_image(_png_bytes(img))
    assert out.getpixel((0, 0))[0] == 128


def test_cmyk_jpeg_decodes_to_rgb():
    buf = io.BytesIO()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(buf, format="JPEG")
    out = load_image(buf.getvalue())
    r, g, b = out.getpixel((4, 4))
    assert out.mode == "RGB" and r > 200 and g < 60 and b < 60


def test_animated_gif_takes_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    out = load_image(buf.getvalue())
    r, _, b = out.getpixel((2, 2))
    assert r > 200 and b < 50


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (20, 10), (0, 255, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    assert load_image(buf.getvalue()).size == (10, 20)


def test_bomb_is_rejected_from_header_quickly():
    start = time.perf_counter()
    with pytest.raises(ImageError) as e:
        load_image(bomb_png())
    assert e.value.code == "too_many_pixels"
    assert time.perf_counter() - start < 1.0


def test_pixel_cap_is_configurable():
    data = _png_bytes(Image.new("RGB", (100, 100)))
    with pytest.raises(ImageError, match="over the cap"):
        load_image(data, DecodeOptions(max_pixels=9_999))


def test_truncated_file_is_rejected():
    data = _png_bytes(Image.effect_noise((64, 64), 50).convert("RGB"))
    with pytest.raises(ImageError) as e:
        load_image(data[: len(data) // 2])
    assert e.value.code in ("truncated", "corrupt")


def test_random_bytes_are_not_an_image():
    with pytest.raises(ImageError) as e:
        load_image(bytes(range(256)) * 4)
    assert e.value.code == "not_an_image"


def test_format_outside_allow_list_is_refused():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="TGA")
    with pytest.raises(ImageError) as e:
        load_image(buf.getvalue())
    assert e.value.code == "unsupported_format"


def test_missing_file(tmp_path):
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "nope.png")
    assert e.value.code == "not_found"


@pytest.mark.parametrize("fmt", ["HEIF", "AVIF"])
def test_heic_and_avif_decode_with_their_exif(fmt: str) -> None:
    """iPhone HEIC (pillow-heif) and AVIF (Pillow's own) go through the same decoder, EXIF included."""
    exif = Image.Exif()
    exif[271], exif[272] = "Apple", "iPhone 15"
    exif.get_ifd(0x8769)[36867] = "2024:06:01 10:00:00"
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 20, 20)).save(buf, format=fmt, exif=exif.tobytes())
    img, facts = load_photo(buf.getvalue())
    assert img.mode == "RGB" and img.size == (40, 30)
    r, g, b = img.getpixel((20, 15))
    assert r > 150 and g < 80 and b < 80  # still red after lossy coding
    assert facts.camera == "Apple iPhone 15" and facts.taken_at == 1717236000.0
    assert {".heic", ".heif", ".avif"} <= IMAGE_EXTENSIONS
