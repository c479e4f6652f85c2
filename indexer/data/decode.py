"""The one decoding loader: records → the shared image decoder → a transform, in parallel worker
processes (a torch DataLoader), batch by batch; a bad image is a reported failure, never a crash.

Training and evaluation decode their sets with it, indexing streams its changed files through it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from indexer.core.errors import ClipsearchError
from indexer.core.images import DEFAULT_MAX_PIXELS, DecodeOptions, ImageError, PhotoFacts, load_photo
from indexer.data.sources import Record

log = logging.getLogger(__name__)

Transform = Callable[[Any], torch.Tensor]  # a decoded RGB PIL image -> (3, H, W) tensor


class DatasetError(ClipsearchError, ValueError):
    """A set of images that cannot be used as given (empty, too small, too many bad rows)."""


@dataclass
class Decoded:
    """Record `pos` of the input: its pixels after the transform, or why it could not be used."""

    pos: int
    pixels: torch.Tensor | None = None
    size: tuple[int, int] | None = None  # (width, height) of the decoded image
    error: tuple[str, str] | None = None  # (code, message); code as in `ImageError`
    facts: PhotoFacts | None = None  # EXIF capture time and camera


class _DecodeDataset(Dataset[Decoded]):
    def __init__(self, records: Sequence[Record], transform: Transform, options: DecodeOptions) -> None:
        self.records, self.transform, self.options = records, transform, options

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, pos: int) -> Decoded:
        return decode_one(self.records[pos], self.transform, self.options, pos)


def decode_one(record: Record, transform: Transform, options: DecodeOptions, pos: int = 0) -> Decoded:
    """Read and decode one record's image and apply `transform`; a failure is returned, never raised."""
    try:
        img, facts = load_photo(record.image_source(), options)
        return Decoded(pos, transform(img), img.size, facts=facts)
    except ImageError as e:
        return Decoded(pos, error=(e.code, e.message))
    except OSError as e:
        return Decoded(pos, error=("unreadable", str(e)))
    except Exception as e:  # a decoder bug on hostile bytes must skip one file, not stop the run
        return Decoded(pos, error=("corrupt", f"{type(e).__name__}: {e}"))


@dataclass
class DecodedBatch:
    """One batch in input order: `pixels[j]` is `ok[j]`'s, stacked (None when every image failed)."""

    ok: list[Decoded]
    failed: list[Decoded]
    pixels: torch.Tensor | None


def _collate(items: list[Decoded]) -> DecodedBatch:
    ok = [d for d in items if d.pixels is not None]
    failed = [d for d in items if d.pixels is None]
    pixels = torch.stack([d.pixels for d in ok if d.pixels is not None]) if ok else None
    return DecodedBatch(ok, failed, pixels)


def decoded_batches(
    records: Sequence[Record],
    transform: Transform,
    batch_size: int = 256,
    workers: int = 0,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[DecodedBatch]:
    """Decode `records` in order, `workers` processes prefetching while the caller uses each batch.

    Inputs that fit in one batch are decoded in this process: starting workers would cost more.
    """
    workers = workers if len(records) > batch_size else 0
    loader = DataLoader(
        _DecodeDataset(records, transform, DecodeOptions(max_pixels=max_pixels)),
        batch_size=batch_size,
        num_workers=workers,
        collate_fn=_collate,
        prefetch_factor=4 if workers else None,
    )
    yield from loader


def report_failures(failed: Sequence[str], total: int, what: str, limit: float) -> None:
    """Log the images that could not be used; more than `limit` of `total` raises `DatasetError`.

    `failed` holds one line per bad image (`KEY: message`).
    """
    if failed:
        log.warning(
            "%s: skipped %d of %d rows with a missing or undecodable image, e.g. %s",
            what,
            len(failed),
            total,
            failed[0],
        )
    if total and len(failed) / total > limit:
        raise DatasetError(
            f"{what}: {len(failed)} of {total} images ({len(failed) / total:.0%}) are missing or "
            f"undecodable, over the {limit:.0%} limit; first: {failed[0]}"
        )
