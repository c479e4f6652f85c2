"""Training data in memory: every image decoded once (the shared loader) at the model's input size and
kept as uint8, every caption tokenized once; each step then only indexes, normalises and (optionally)
crops. Rows whose image is missing or undecodable are skipped and counted; more than
`MAX_BAD_FRACTION` aborts.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision import transforms as T

from indexer.data.decode import DatasetError, Transform, decoded_batches, report_failures
from indexer.data.sources import Record
from indexer.data.workers import default_workers

log = logging.getLogger(__name__)

MAX_BAD_FRACTION = 0.05


@dataclass
class Decoded:
    """All decodable images of a record list, stacked: `pixels[j]` is `records[kept[j]]`."""

    pixels: torch.Tensor
    kept: list[int]
    bad: list[str]


def decode_records(
    records: Sequence[Record],
    transform: Transform,
    workers: int | None = None,
    max_bad_fraction: float = MAX_BAD_FRACTION,
    what: str = "data",
) -> Decoded:
    """Decode every record once; bad rows are logged, counted and skipped (too many raise DatasetError)."""
    workers = default_workers(main_busy=False) if workers is None else workers
    pixels, kept, bad = [], [], []
    for batch in decoded_batches(records, transform, workers=workers):
        if batch.pixels is not None:
            pixels.append(batch.pixels)
        kept += [d.pos for d in batch.ok]
        bad += [f"{records[d.pos].key}: {d.error[1] if d.error else ''}" for d in batch.failed]
    report_failures(bad, len(records), what, max_bad_fraction)
    if not kept:
        raise DatasetError(f"{what}: no decodable images")
    return Decoded(pixels=torch.cat(pixels), kept=kept, bad=bad)


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
