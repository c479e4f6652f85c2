"""Image bytes the service tests upload: every format and mode the issue lists, good and bad."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def png(rgb: tuple[int, int, int] = (230, 20, 20), size: int = 40) -> bytes:
    return encode(Image.new("RGB", (size, size), rgb), "PNG")


def cmyk_jpeg() -> bytes:
    return encode(Image.new("CMYK", (40, 40), (0, 220, 220, 20)), "JPEG")


def png_16bit() -> bytes:
    arr = np.full((40, 40), 50000, dtype=np.uint16)
    return encode(Image.fromarray(arr, mode="I;16"), "PNG")


def palette_with_transparency() -> bytes:
    img = Image.new("P", (40, 40), 0)
    img.putpalette([230, 20, 20, 0, 0, 0] + [0] * 762)
    img.paste(1, (0, 0, 20, 40))
    return encode(img, "PNG", transparency=1)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (40, 40), c) for c in ((230, 20, 20), (20, 40, 230))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def truncated_png() -> bytes:
    data = encode(Image.effect_noise((64, 64), 50).convert("RGB"), "PNG")
    return data[: len(data) // 2]


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header declares a huge canvas (a decompression bomb)."""

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def ico() -> bytes:
    """A real image in a format outside the allow-list."""
    return encode(Image.new("RGB", (32, 32), (10, 200, 10)), "ICO")
