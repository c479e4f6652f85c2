"""Build the model a run trains: architecture from `--model`, weights from `--pretrained`, towers locked."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from indexer.core.encoder import image_size_of
from indexer.core.modeldir import is_model_dir, save_model_dir
from indexer.core.modelref import ModelReference, load_reference
from indexer.train.compact_embedding import full_token_embedding
from indexer.train.config import ModelSpec
from indexer.train.loss import model_kwargs_for_loss
from indexer.train.towers import lock_towers, should_lock_image, should_lock_text

log = logging.getLogger(__name__)
DEFAULT_MODEL = "small"


@dataclass
class BuiltModel:
    """A model ready to train, with what is needed to save it and to feed it."""

    model: Any
    name: str  # resolved open_clip name
    model_cfg: dict[str, Any]  # saved as `model_cfg` in open_clip_config.json
    preprocess: Any  # open_clip's eval transform; its geometry is applied once, at caching
    tokenizer: Any
    image_size: int
    text_locked: bool = False
    image_locked: bool = False

    def shorten_context(self, length: int) -> int:
        """Let the text tower run on `length` tokens instead of its full context; returns the length used.

        Exact, and a large saving when captions are short: trailing columns are padding after the
        end-of-text token, which a causal tower never attends to from there (HF towers mask padding).
        Only separate text towers (`CustomTextCLIP`) slice their positional embedding; their causal mask
        is a non-persistent buffer, so this never reaches the saved model. Other models keep the full
        context.
        """
        text = getattr(self.model, "text", None)
        if not isinstance(self.model, open_clip.CustomTextCLIP) or text is None:
            return int(self.model.context_length)
        mask = getattr(text, "attn_mask", None)
        if isinstance(mask, torch.Tensor) and mask.shape[0] > length:
            text.attn_mask = mask[:length, :length].contiguous()
        return length


def save_trained_model(built: BuiltModel, out_dir: Path) -> Path:
    """`save_model_dir` with the full token table (training may hold a compact one)."""
    with full_token_embedding(built.model):
        return save_model_dir(built.model, built.model_cfg, out_dir, built.tokenizer)


def _reference(spec: ModelSpec) -> ModelReference:
    """`--model`/`--pretrained` as a model reference; without `--model`, a model dir given as
    `--pretrained` (an earlier run) brings its own architecture, and otherwise the default is `small`."""
    pretrained = spec.pretrained
    if spec.model:
        return ModelReference(spec.model, pretrained)
    if pretrained is not None and is_model_dir(Path(pretrained)):  # fine-tuning an earlier run
        return ModelReference(pretrained)
    return ModelReference(DEFAULT_MODEL, pretrained)


def build_model(spec: ModelSpec, loss: str, device: torch.device) -> BuiltModel:
    """Create (and possibly load and lock) the model; any error a user can fix is a ModelError."""
    extra = model_kwargs_for_loss(loss)
    loaded = load_reference(_reference(spec), "cpu", **extra)
    model = loaded.model
    lock_text = should_lock_text(spec, model)
    lock_image = should_lock_image(spec, loaded.image_pretrained)
    lock_towers(model, lock_image, lock_text, spec.unlocked_layers, spec.unlocked_text_layers)
    model_cfg = dict(loaded.model_cfg)
    model_cfg.update({k: v for k, v in extra.items() if k == "init_logit_bias"})
    return BuiltModel(
        model=model.to(device),
        name=loaded.name,
        model_cfg=model_cfg,
        preprocess=loaded.preprocess,
        tokenizer=loaded.tokenizer,  # a model dir's own tokenizer files
        image_size=image_size_of(model),
        text_locked=lock_text,
        image_locked=lock_image,
    )
