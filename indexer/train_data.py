"""Training and evaluation data: decode every image once with the shared decoder, tokenize once, cache.

Small and medium sets (the common case on a CPU) are decoded in parallel once, at the model's input size,
and kept in memory as uint8 tensors; each step then only indexes, normalises and (optionally) crops. Rows
whose image is missing or undecodable are skipped and counted; more than `max_bad_fraction` aborts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T

from indexer.data import Record
from indexer.errors import ClipsearchError
from indexer.images import ImageError, load_image

log = logging.getLogger(__name__)

MAX_BAD_FRACTION = 0.05


class DatasetError(ClipsearchError, ValueError):
    """A training or evaluation set that cannot be used as given (empty, too small, too many bad rows)."""


def default_workers() -> int:
    return max(0, min(4, (os.cpu_count() or 1)))


class _DecodeDataset(Dataset[tuple[int, torch.Tensor | None, str]]):
    """Record i -> (i, transform(load_image(bytes)), '') or (i, None, reason) for a bad row."""

    def __init__(self, records: Sequence[Record], transform: Callable[[Any], torch.Tensor]) -> None:
        self.records = records
        self.transform = transform

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        rec = self.records[i]
        try:
            return i, self.transform(load_image(rec.read_bytes())), ""
        except (ImageError, OSError) as e:
            return i, None, f"{rec.key}: {e}"


@dataclass
class DecodedBatch:
    """Decoded images of a batch of records: `pixels[j]` belongs to record `kept[j]`."""

    pixels: torch.Tensor
    kept: list[int]
    bad: list[str]


def _collate(items: list[tuple[int, torch.Tensor | None, str]]) -> DecodedBatch:
    good = [(i, x) for i, x, _ in items if x is not None]
    pixels = torch.stack([x for _, x in good]) if good else torch.zeros(0)
    return DecodedBatch(
        pixels=pixels, kept=[i for i, _ in good], bad=[why for _, x, why in items if x is None]
    )


def iter_decoded(
    records: Sequence[Record],
    transform: Callable[[Any], torch.Tensor],
    batch_size: int = 256,
    workers: int = 0,
) -> Iterator[DecodedBatch]:
    """Decode records in order, `workers` processes in parallel, yielding one batch at a time."""
    loader = DataLoader(
        _DecodeDataset(records, transform),
        batch_size=batch_size,
        num_workers=workers if len(records) > batch_size else 0,
        collate_fn=_collate,
    )
    yield from loader


@dataclass
class Decoded:
    """All decodable images of a record list, stacked: `pixels[j]` is `records[kept[j]]`."""

    pixels: torch.Tensor
    kept: list[int]
    bad: list[str]


def decode_records(
    records: Sequence[Record],
    transform: Callable[[Any], torch.Tensor],
    workers: int | None = None,
    max_bad_fraction: float = MAX_BAD_FRACTION,
    what: str = "data",
) -> Decoded:
    """Decode every record once; bad rows are logged, counted and skipped (too many raise DatasetError)."""
    workers = default_workers() if workers is None else workers
    pixels, kept, bad = [], [], []
    for batch in iter_decoded(records, transform, workers=workers):
        if batch.kept:
            pixels.append(batch.pixels)
        kept += batch.kept
        bad += batch.bad
    check_bad(len(bad), len(records), bad, what, max_bad_fraction)
    if not kept:
        raise DatasetError(f"{what}: no decodable images")
    return Decoded(pixels=torch.cat(pixels), kept=kept, bad=bad)


def check_bad(n_bad: int, n_total: int, examples: Sequence[str], what: str, limit: float) -> None:
    if n_bad:
        log.warning(
            "%s: skipped %d of %d rows with a missing or undecodable image, e.g. %s",
            what,
            n_bad,
            n_total,
            examples[0],
        )
    if n_total and n_bad / n_total > limit:
        raise DatasetError(
            f"{what}: {n_bad} of {n_total} images ({n_bad / n_total:.0%}) are missing or undecodable, "
            f"over the {limit:.0%} limit; first: {examples[0]}"
        )


@dataclass(frozen=True)
class PixelPipeline:
    """The model's preprocessing split in two: geometry (once, to uint8) and normalisation (per batch)."""

    geometry: Callable[[Any], torch.Tensor]
    mean: torch.Tensor
    std: torch.Tensor
    size: int

    @classmethod
    def from_preprocess(cls, preprocess: Any, size: int) -> PixelPipeline:
        steps = list(getattr(preprocess, "transforms", []))
        norm = next((s for s in steps if isinstance(s, T.Normalize)), None)
        cut = next((k for k, s in enumerate(steps) if isinstance(s, T.ToTensor)), len(steps))
        geometry = T.Compose([*steps[:cut], T.PILToTensor()])
        mean = torch.tensor(norm.mean if norm else (0.0, 0.0, 0.0)).view(1, 3, 1, 1)
        std = torch.tensor(norm.std if norm else (1.0, 1.0, 1.0)).view(1, 3, 1, 1)
        return cls(geometry=geometry, mean=mean, std=std, size=size)

    def normalise(self, pixels_u8: torch.Tensor) -> torch.Tensor:
        """(n, 3, H, W) uint8 -> float32 normalised as the model's preprocessing does."""
        return (pixels_u8.float().div_(255) - self.mean) / self.std


def pad_id(tokenizer: Any) -> int:
    """The padding id of an open_clip tokenizer: the HF tokenizer's own, else 0 (open_clip's BPE)."""
    inner = getattr(tokenizer, "tokenizer", None)
    value = getattr(inner, "pad_token_id", None)
    return int(value) if isinstance(value, int) else 0


def used_length(tokens: torch.Tensor, pad: int = 0) -> int:
    """Columns up to the last one that holds a non-padding token in some row."""
    used = (tokens != pad).any(dim=0).nonzero()
    return int(used.max()) + 1 if len(used) else 1


@dataclass
class CachedSplit:
    """A decoded, tokenized image–caption set held in memory.

    `pixels` (n_images, 3, H, W) uint8; `captions[i]` are image i's captions; for training, pair p is
    (image `pair_image[p]`, caption tokens `tokens[p]`).
    """

    pixels: torch.Tensor
    captions: list[tuple[str, ...]]
    tokens: torch.Tensor
    pair_image: torch.Tensor
    n_bad: int

    @property
    def n_pairs(self) -> int:
        return len(self.pair_image)


def build_split(
    records: Sequence[Record],
    pipeline: PixelPipeline,
    tokenizer: Callable[[list[str]], torch.Tensor],
    what: str,
    workers: int | None = None,
) -> CachedSplit:
    """Decode and tokenize a record list once (records without any caption are skipped)."""
    captioned = [r for r in records if r.captions]
    if not captioned:
        raise DatasetError(f"{what}: no image with a caption found (empty dataset?)")
    decoded = decode_records(captioned, pipeline.geometry, workers=workers, what=what)
    captions = [captioned[i].captions for i in decoded.kept]
    pair_image = [img for img, caps in enumerate(captions) for _ in caps]
    texts = [c for caps in captions for c in caps]
    tokens = tokenizer(texts)
    return CachedSplit(
        pixels=decoded.pixels,
        captions=captions,
        tokens=tokens,
        pair_image=torch.tensor(pair_image, dtype=torch.long),
        n_bad=len(decoded.bad),
    )


def random_crop_batch(pixels: torch.Tensor, generator: torch.Generator, scale: float) -> torch.Tensor:
    """RandomResizedCrop per image, on the batch at once: each image gets its own square crop whose side is
    a random fraction in [scale, 1] of the image's, at a random place, resized back to the full size.

    One affine resampling of the whole batch (`affine_grid` + `grid_sample`), so it costs next to nothing
    next to the forward pass, yet every image of every epoch is seen a little differently.
    """
    if scale >= 1.0:
        return pixels
    n = pixels.shape[0]
    side = scale + (1 - scale) * torch.rand(n, generator=generator)
    shift = (1 - side) * (2 * torch.rand(2, n, generator=generator) - 1)  # keep the crop inside the image
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = theta[:, 1, 1] = side
    theta[:, 0, 2], theta[:, 1, 2] = shift[0], shift[1]
    grid = torch.nn.functional.affine_grid(theta.to(pixels.dtype), list(pixels.shape), align_corners=False)
    return torch.nn.functional.grid_sample(
        pixels, grid.to(pixels.device), mode="bilinear", align_corners=False
    )
