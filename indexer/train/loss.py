"""The training objective: open_clip's `ClipLoss` (symmetric InfoNCE) or `SigLipLoss`, behind one call."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from open_clip.loss import ClipLoss, SigLipLoss

LOSSES = ("clip", "siglip")
# Note: open_clip_train clamps to 4.6052 = ln(100), as in the original CLIP paper.
MAX_LOGIT_SCALE = math.log(100)


def make_loss(kind: str) -> torch.nn.Module:
    """A fresh loss: `clip` (softmax over the batch, both directions) or `siglip` (pairwise sigmoid)."""
    if kind == "clip":
        return ClipLoss()
    if kind == "siglip":
        return SigLipLoss()
    raise ValueError(f"unknown loss {kind!r}: use one of {', '.join(LOSSES)}")


def model_kwargs_for_loss(kind: str) -> dict[str, Any]:
    """Extra `open_clip.create_model` arguments a loss needs (SigLIP's bias; open_clip_train's init)."""
    if kind == "siglip":
        return {"init_logit_scale": float(np.log(10)), "init_logit_bias": -10.0}
    return {}


def contrastive_loss(
    loss_fn: torch.nn.Module,
    image_emb: torch.Tensor,
    text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
    logit_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """The scalar loss of a batch whose row i of `image_emb` and `text_emb` is a matched pair.

    Args:
        loss_fn: from `make_loss`.
        image_emb: (batch, dim), L2-normalised.
        text_emb: (batch, dim), L2-normalised.
        logit_scale: exp(learned log-temperature), a scalar tensor.
        logit_bias: the learned SigLIP bias (required by `siglip`, ignored by `clip`).
    """
    if isinstance(loss_fn, SigLipLoss):
        if logit_bias is None:
            raise ValueError("the siglip loss needs a model built with a logit_bias (init_logit_bias)")
        return loss_fn(image_emb, text_emb, logit_scale, logit_bias)
    out: torch.Tensor = loss_fn(image_emb, text_emb, logit_scale)
    return out


@torch.no_grad()
def clamp_logit_scale(model: torch.nn.Module) -> None:
    """Keep the learned log-temperature in [0, ln 100] after each optimizer step, as open_clip_train does."""
    scale = getattr(model, "logit_scale", None)
    if isinstance(scale, torch.Tensor):
        scale.clamp_(0, MAX_LOGIT_SCALE)
