"""Train against a locked image tower without running it every step (LiT's locked image tower, cached).

With `--lock-image` the trunk of a timm image tower is frozen, batch-norm statistics included, so its
pooled features for an image never change during the run; without augmentation (`--crop-scale 1`) the
input never changes either. They are then computed once per image, in inference mode, and each step runs
only the tower's head (its projection). For an ImageNet-pretrained EfficientNet on a CPU that is almost
all of the step: `small-pt` with a locked, cached image tower trains as fast as its text side allows.
Under torchrun each rank computes 1/N of the images' features and all ranks receive the whole cache
(`distributed.computed_once`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from indexer.train.distributed import Dist, computed_once

log = logging.getLogger(__name__)
BATCH = 256


@dataclass
class FrozenImage:
    """Cached trunk features of the train and val images, and the head applied per step."""

    train: torch.Tensor  # (n_images, d), row i for train image i
    val: torch.Tensor | None  # (n_val_images, d)
    head: torch.nn.Module

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.head(feats), dim=-1)


def _frozen_trunk(model: Any) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """(trunk, head) of a timm image tower whose trunk is entirely frozen, else None."""
    visual = getattr(model, "visual", None)
    trunk, head = getattr(visual, "trunk", None), getattr(visual, "head", None)
    if not isinstance(trunk, torch.nn.Module) or not isinstance(head, torch.nn.Module):
        return None
    if any(p.requires_grad for p in trunk.parameters()):
        return None
    return trunk, head


@torch.no_grad()
def _run(
    trunk: torch.nn.Module, pixels: torch.Tensor, normalise: Any, device: torch.device, d: Dist | None = None
) -> torch.Tensor:
    def rows(start: int, stop: int) -> torch.Tensor:
        return torch.cat(
            [
                trunk(normalise(pixels[s : min(s + BATCH, stop)]).to(device)).float()
                for s in range(start, stop, BATCH)
            ]
        )

    was_training = trunk.training
    trunk.eval()
    try:
        return computed_once(len(pixels), rows, d)
    finally:
        trunk.train(was_training)


def freeze_image_features(
    model: Any,
    train_pixels: torch.Tensor,
    val_pixels: torch.Tensor | None,
    normalise: Any,
    crop_scale: float,
    device: torch.device,
    d: Dist | None = None,
) -> FrozenImage | None:
    """Cache the frozen image trunk's features, or None when it trains or augmentation changes its input.
    With `d` (a torchrun rank), every rank computes its share and receives the whole cache."""
    found = _frozen_trunk(model)
    if found is None or crop_scale < 1:
        return None
    trunk, head = found
    train = _run(trunk, train_pixels, normalise, device, d)
    val = _run(trunk, val_pixels, normalise, device, d) if val_pixels is not None else None
    log.info(
        "image trunk is locked: its features for %d images are computed once, not every step", len(train)
    )
    return FrozenImage(train=train, val=val, head=head)
