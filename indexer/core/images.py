"""The one image decoder used by training, indexing and the service: a picture always maps to one tensor."""

from __future__ import annotations

import io
import os
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import IO

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError
from pillow_heif import register_heif_opener

from indexer.core.errors import ClipsearchError

# HEIC/HEIF (iPhone photos) through the maintained plug-in pillow-heif; AVIF is Pillow's own (>= 11.2).
register_heif_opener()

# Formats we decode. Anything else is refused before decoding (HTTP 415 on the service side).
ALLOWED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF"})
# File name endings a folder scan picks up.
IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".heic", ".heif", ".hif", ".avif"}
)
DEFAULT_MAX_PIXELS = 50_000_000

# We enforce our own cap from the header; Pillow's own bomb check would raise a different error later.
Image.MAX_IMAGE_PIXELS = None
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageError(ClipsearchError, ValueError):
    """An image that cannot be used. `code` is stable and machine-readable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class UnsupportedFormat(ImageError):
    """The bytes are an image, but of a format outside the allow-list."""


class TooManyPixels(ImageError):
    """The header declares a canvas larger than the pixel cap (a decompression bomb or a huge scan)."""


@dataclass(frozen=True)
class DecodeOptions:
    """Limits applied to every decoded image."""

    max_pixels: int = DEFAULT_MAX_PIXELS
    allowed_formats: frozenset[str] = ALLOWED_FORMATS


Source = str | os.PathLike[str] | bytes | IO[bytes]


def _open(source: Source) -> Image.Image:
    name = "<bytes>" if isinstance(source, bytes) else str(getattr(source, "name", source))
    try:
        if isinstance(source, bytes):
            return Image.open(io.BytesIO(source))
        if isinstance(source, str | os.PathLike):
            return Image.open(Path(source))
        return Image.open(source)
    except FileNotFoundError as e:
        raise ImageError("not_found", f"file not found: {name}") from e
    except IsADirectoryError as e:
        raise ImageError("not_a_file", f"not a file: {name}") from e
    except PermissionError as e:
        raise ImageError("unreadable", f"permission denied: {name}") from e
    except UnidentifiedImageError as e:
        raise ImageError("not_an_image", "the data is not a recognised image") from e
    except OSError as e:
        raise ImageError("unreadable", f"cannot read image: {e}") from e


def probe(source: Source, options: DecodeOptions = DecodeOptions()) -> Image.Image:
    """Open lazily and check format and pixel count from the header alone (no pixel data is decoded)."""
    img = _open(source)
    fmt = (img.format or "").upper()
    if fmt not in options.allowed_formats:
        img.close()
        raise UnsupportedFormat("unsupported_format", f"image format {fmt or 'unknown'} is not allowed")
    width, height = img.size
    if width <= 0 or height <= 0:
        img.close()
        raise ImageError("invalid_image", "image has an empty canvas")
    if width * height > options.max_pixels:
        img.close()
        raise TooManyPixels(
            "too_many_pixels",
            f"image is {width}x{height} = {width * height:,} pixels, over the cap of {options.max_pixels:,}",
        )
    return img


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit greyscale to 8 bits by its range (Pillow's convert('L') would clip at 255)."""
    arr = np.asarray(img)
    if img.mode.startswith("I;16"):
        arr8 = (arr.astype(np.uint32) >> 8).astype(np.uint8)
    else:
        a = arr.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        if hi <= 255 and lo >= 0:
            arr8 = a.astype(np.uint8)
        else:
            arr8 = ((a - lo) / max(hi - lo, 1.0) * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr8, mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        img = _to_8bit(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA") or (img.mode == "L" and "transparency" in img.info):
        img = img.convert("RGBA")
    if img.mode == "RGBa":
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        background = Image.new("RGB", img.size, (255, 255, 255))
        background.paste(img, mask=img.getchannel("A"))
        return background
    return img.convert("RGB")


@dataclass(frozen=True)
class PhotoFacts:
    """What a photo's EXIF says about it: capture time (seconds since the epoch; EXIF without an offset
    is read as UTC) and camera (make and model)."""

    taken_at: float | None = None
    camera: str | None = None


_EXIF_IFD = 0x8769
_DATETIME_ORIGINAL, _OFFSET_ORIGINAL, _DATETIME = 36867, 36881, 306
_MAKE, _MODEL = 271, 272


def _exif_text(value: object) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    text = str(value).replace("\x00", "").strip() if value is not None else ""
    return text or None


def _exif_time(stamp: str | None, offset: str | None) -> float | None:
    if not stamp:
        return None
    try:
        moment = datetime.strptime(stamp[:19], "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    zone = UTC
    if offset and len(offset) == 6 and offset[0] in "+-":
        try:
            hours, minutes = int(offset[1:3]), int(offset[4:6])
            zone = timezone((-1 if offset[0] == "-" else 1) * timedelta(hours=hours, minutes=minutes))
        except ValueError:
            zone = UTC
    return moment.replace(tzinfo=zone).timestamp()


def photo_facts(img: Image.Image) -> PhotoFacts:
    """Capture time and camera from an opened image's EXIF (its header only; no pixels are decoded)."""
    try:
        exif = img.getexif()
        sub = exif.get_ifd(_EXIF_IFD)
    except Exception:  # a damaged EXIF block costs its facts, never the image
        return PhotoFacts()
    stamp = _exif_text(sub.get(_DATETIME_ORIGINAL)) or _exif_text(exif.get(_DATETIME))
    make, model = _exif_text(exif.get(_MAKE)), _exif_text(exif.get(_MODEL))
    camera = (
        model if not make or (model and model.lower().startswith(make.lower())) else f"{make} {model or ''}"
    )
    return PhotoFacts(
        _exif_time(stamp, _exif_text(sub.get(_OFFSET_ORIGINAL))), camera.strip() if camera else None
    )


def read_photo_facts(source: Source, options: DecodeOptions = DecodeOptions()) -> PhotoFacts:
    """`photo_facts` of a file or bytes, from the header (the checks of `probe` apply)."""
    img = probe(source, options)
    try:
        return photo_facts(img)
    finally:
        img.close()


def load_image(source: Source, options: DecodeOptions = DecodeOptions()) -> Image.Image:
    """Decode an image to 8-bit RGB the same way everywhere (`load_photo` also returns its EXIF facts)."""
    return load_photo(source, options)[0]


def load_photo(source: Source, options: DecodeOptions = DecodeOptions()) -> tuple[Image.Image, PhotoFacts]:
    """Decode an image to 8-bit RGB the same way everywhere, with its `PhotoFacts`.

    Checks the format allow-list and the pixel cap from the header before decoding, takes the first
    frame of animations, applies EXIF orientation, composites transparency on white and scales
    16-bit data (not clipping it). Truncated files raise `ImageError("truncated", ...)`.

    Raises:
        ImageError: with a stable `code` (`not_an_image`, `unsupported_format`, `too_many_pixels`,
            `truncated`, `not_found`, `unreadable`, `invalid_image`).
    """
    img = probe(source, options)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            facts = photo_facts(img)
            if getattr(img, "is_animated", False):
                img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return _to_rgb(img), facts
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        msg = str(e)
        code = "truncated" if "truncated" in msg.lower() or isinstance(e, EOFError) else "corrupt"
        raise ImageError(code, f"cannot decode image: {msg or type(e).__name__}") from e
    except Image.DecompressionBombError as e:  # pragma: no cover - cap disabled above, kept for safety
        raise TooManyPixels("too_many_pixels", str(e)) from e
