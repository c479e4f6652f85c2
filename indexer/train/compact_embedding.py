"""Train only the token-embedding rows a data set uses: the same maths, a fraction of the optimizer work.

A text tower's vocabulary table (49,408 x width for open_clip's BPE) is most of a small model's
parameters, yet a caption set touches a few thousand rows. Rows that never appear get zero gradients and,
with AdamW and no weight decay on embeddings, zero updates, so training a compact copy of the used rows and
writing them back is exactly equivalent, while the dense gradient, its zeroing and the AdamW update of the
whole table (a third of a CPU step for the `small` model) disappear.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class CompactTokenEmbedding(nn.Module):
    """Stands in for an `nn.Embedding` during training; `merged()` gives the full table back."""

    def __init__(self, full: nn.Embedding, used_ids: torch.Tensor) -> None:
        super().__init__()
        self.full = full
        self.full.weight.requires_grad_(False)
        used_ids = torch.unique(used_ids)
        self.rows = nn.Parameter(full.weight.detach()[used_ids].clone())
        remap = torch.zeros(full.num_embeddings, dtype=torch.long, device=full.weight.device)
        remap[used_ids] = torch.arange(len(used_ids), device=full.weight.device)
        self.register_buffer("remap", remap, persistent=False)
        self.register_buffer("used_ids", used_ids.to(full.weight.device), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.remap[ids], self.rows)

    @torch.no_grad()
    def merged(self) -> nn.Embedding:
        self.full.weight[self.used_ids] = self.rows.detach().to(self.full.weight.dtype)
        return self.full


def _owner(model: Any) -> Any:
    """The module holding `token_embedding`: the model (CLIP) or its text tower (CustomTextCLIP)."""
    for owner in (getattr(model, "text", None), model):
        if isinstance(getattr(owner, "token_embedding", None), nn.Embedding | CompactTokenEmbedding):
            return owner
    return None


def compact_token_embedding(model: Any, used_ids: torch.Tensor) -> bool:
    """Swap a trainable token embedding for its compact form; False when there is none to compact."""
    owner = _owner(model)
    if owner is None or not isinstance(owner.token_embedding, nn.Embedding):
        return False
    if not owner.token_embedding.weight.requires_grad:  # locked text tower: nothing to gain
        return False
    owner.token_embedding = CompactTokenEmbedding(owner.token_embedding, used_ids)
    return True


@contextmanager
def full_token_embedding(model: Any) -> Iterator[None]:
    """Within the block the model has its ordinary `nn.Embedding` (for saving); then compact again."""
    owner = _owner(model)
    compact = getattr(owner, "token_embedding", None) if owner is not None else None
    if not isinstance(compact, CompactTokenEmbedding):
        yield
        return
    owner.token_embedding = compact.merged()
    try:
        yield
    finally:
        owner.token_embedding = compact
