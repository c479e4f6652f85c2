"""Optimizer and learning-rate schedule, following open_clip_train's recipe."""

from __future__ import annotations

import math
from typing import Any

import torch

from indexer.core.errors import ClipsearchError


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Norms, biases, embeddings and logit_scale/bias: weight decay would only pull them towards 0."""
    lowered = name.lower()
    return param.ndim < 2 or any(
        part in lowered for part in ("bias", "norm", "ln_", ".ln", "bn", "embedding", "logit_scale")
    )


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two AdamW groups over the trainable parameters: with and without weight decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    return [
        {"params": no_decay, "weight_decay": 0.0},
        {"params": decay, "weight_decay": weight_decay},
    ]


def make_optimizer(
    model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float
) -> torch.optim.AdamW:
    groups = param_groups(model, weight_decay)
    if not any(g["params"] for g in groups):
        raise ClipsearchError("nothing to train: every parameter is locked")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def lr_at(progress: float, base_lr: float, warmup: float, min_lr_ratio: float = 0.0) -> float:
    """Linear warmup then cosine decay, as a function of progress in [0, 1] (steps or time used).

    Args:
        progress: fraction of the run done (of steps for --epochs, of wall-clock for --time-budget).
        warmup: fraction of the run spent warming up.
    """
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return base_lr * (progress + 1e-3) / warmup
    span = max(1e-8, 1.0 - warmup)
    cosine = 0.5 * (1 + math.cos(math.pi * (progress - warmup) / span))
    return base_lr * (min_lr_ratio + (1 - min_lr_ratio) * cosine)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def count_params(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, total
