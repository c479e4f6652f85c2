"""Train against a locked text tower without running it every step.

With `--lock-text` (LiT-style, the text tower pretrained and frozen) the tower's output for a caption never
changes during the run, so running it on every batch is pure waste: for a BERT-sized tower next to a small
image tower it is most of each step. Its features are computed once per distinct caption, in inference
mode, and the step uses them from memory. Only the part that still trains runs per step: nothing when the
whole tower is frozen, the linear projection of a Hugging Face tower whose transformer is frozen (open_clip
locks the transformer and leaves `proj` trainable).

Inference mode means the frozen transformer runs without dropout, as a frozen tower should (the LiT
recipe); open_clip_train would run it in train mode and add dropout noise to features it never trains.

With `--unlocked-layers N` on a Hugging Face tower (BERT-like: embeddings, then a stack of layers), only
the last N layers train: the output of the frozen embeddings and lower layers is what is cached, one
(tokens, width) matrix per caption, and each step runs the N top layers, the pooler and the projection.
open_clip cannot unlock layers of a BERT tower at all; here the text side adapts to the captions at a
fraction of the cost of training it whole. Padding positions are cached as zeros, and a zero row is how
the head finds the padding again (a real token's hidden state is never exactly zero).

Under torchrun the cache is computed once across the ranks, not once per rank: each rank runs the trunk on
its 1/N share of the distinct captions and an all-gather gives every rank the whole cache
(`distributed.computed_once`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import open_clip
import torch
from open_clip.hf_model import HFTextEncoder

from indexer.train.distributed import Dist, computed_once

log = logging.getLogger(__name__)

NOT_TEXT = ("visual.", "logit_scale", "logit_bias")


@dataclass
class FrozenText:
    """Cached trunk features of the train and val captions, and the trainable head applied per step."""

    train: torch.Tensor  # (n_pairs, d), row i for train pair i
    val: torch.Tensor | None  # (n_val_texts, d)
    head: Callable[[torch.Tensor], torch.Tensor]  # trunk features -> text embedding (unnormalised)
    what: str  # "tower" (all frozen), "transformer" (projection trains) or "layers L+" (top layers train)

    def embed(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.head(feats), dim=-1)


def _text_params(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if not n.startswith(NOT_TEXT)]


def _trunk(
    model: Any,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor], str] | None:
    """(trunk, head, what) when the text path has a frozen trunk worth caching, else None."""
    params = _text_params(model)
    if params and not any(p.requires_grad for _, p in params):
        return (lambda tokens: model.encode_text(tokens, normalize=False)), (lambda f: f), "tower"
    text = getattr(model, "text", None)
    if isinstance(model, open_clip.CustomTextCLIP) and isinstance(text, HFTextEncoder):
        trunk_frozen = not any(
            p.requires_grad for n, p in text.named_parameters() if not n.startswith("proj")
        )
        if trunk_frozen:

            def pooled(tokens: torch.Tensor) -> torch.Tensor:
                mask = (tokens != text.config.pad_token_id).long()
                return text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask)

            return pooled, text.proj, "transformer"
        return _partial_trunk(text)
    return None


def _layers(text: HFTextEncoder) -> tuple[torch.nn.Module, torch.nn.ModuleList] | None:
    """(embeddings, layer stack) of a BERT-like Hugging Face transformer, else None."""
    embeddings = getattr(text.transformer, "embeddings", None)
    layers = getattr(getattr(text.transformer, "encoder", None), "layer", None)
    if isinstance(embeddings, torch.nn.Module) and isinstance(layers, torch.nn.ModuleList):
        return embeddings, layers
    return None


def frozen_layer_count(text: HFTextEncoder) -> int | None:
    """How many bottom layers of the stack are frozen (with the embeddings), when only top layers train."""
    found = _layers(text)
    if found is None or any(p.requires_grad for p in found[0].parameters()):
        return None
    frozen = [not any(p.requires_grad for p in layer.parameters()) for layer in found[1]]
    n = frozen.index(False) if False in frozen else len(frozen)
    return n if 0 < n < len(frozen) and not any(frozen[n:]) else None


def _partial_trunk(
    text: HFTextEncoder,
) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], torch.Tensor], str] | None:
    n = frozen_layer_count(text)
    found = _layers(text)
    if n is None or found is None or not isinstance(text.pooler, (open_clip.hf_model.MeanPooler,)):
        return None
    embeddings, layers = found

    def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # [batch, 1, 1, tokens]: 0 where attended, the dtype's minimum on padding (BERT's own convention)
        return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min

    def run(hidden: torch.Tensor, mask: torch.Tensor, stack: Any) -> torch.Tensor:
        bias = additive(mask, hidden.dtype)
        for layer in stack:
            out = layer(hidden, bias)
            hidden = out[0] if isinstance(out, tuple) else out
        return hidden

    def lower(tokens: torch.Tensor) -> torch.Tensor:
        mask = (tokens != text.config.pad_token_id).long()
        hidden = run(embeddings(input_ids=tokens), mask, layers[:n])
        return hidden * mask.unsqueeze(-1)  # [batch, tokens, width], padding zeroed

    def upper(hidden: torch.Tensor) -> torch.Tensor:
        mask = (hidden.abs().sum(-1) != 0).long()
        top = run(hidden, mask, layers[n:])
        return text.proj(text.pooler(SimpleNamespace(last_hidden_state=top), mask))

    return lower, upper, f"layers 1-{n}"


@torch.no_grad()
def _run_trunk(
    trunk: Callable[[torch.Tensor], torch.Tensor],
    model: Any,
    tokens: torch.Tensor,
    device: torch.device,
    d: Dist | None = None,
) -> torch.Tensor:
    """Trunk features of each distinct token row once (once across all ranks), in inference mode, scattered
    back to all rows."""
    unique, inverse = torch.unique(tokens, dim=0, return_inverse=True)  # sorted: the same on every rank

    def rows(start: int, stop: int) -> torch.Tensor:
        return torch.cat(
            [trunk(unique[s : min(s + 256, stop)].to(device)).float() for s in range(start, stop, 256)]
        )

    was_training = model.training
    model.eval()
    try:
        feats = computed_once(len(unique), rows, d)
    finally:
        model.train(was_training)
    return feats[inverse.to(feats.device)]


def freeze_text_features(
    model: Any,
    train_tokens: torch.Tensor,
    val_tokens: torch.Tensor | None,
    device: torch.device,
    d: Dist | None = None,
) -> FrozenText | None:
    """Cache the frozen text trunk's features, or None when the text tower trains (nothing to cache). With
    `d` (a torchrun rank), every rank computes its share and receives the whole cache."""
    found = _trunk(model)
    if found is None:
        return None
    trunk, head, what = found
    train = _run_trunk(trunk, model, train_tokens, device, d)
    val = _run_trunk(trunk, model, val_tokens, device, d) if val_tokens is not None else None
    log.info(
        "text %s is locked: its features for %d captions are computed once, not every step%s",
        what,
        len(torch.unique(train_tokens, dim=0)),
        f" (1/{d.world_size} on each of {d.world_size} ranks)" if d is not None else "",
    )
    return FrozenText(train=train, val=val, head=head, what=what)
