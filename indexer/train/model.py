"""Build the model a run trains: architecture from `--model`, weights from `--pretrained`, towers locked."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch

from indexer.core.architectures import model_config, resolve_model_name
from indexer.core.encoder import image_size_of
from indexer.core.modeldir import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ModelError,
    model_dir_kwargs,
    save_model_dir,
)
from indexer.train.compact_embedding import full_token_embedding
from indexer.train.config import ModelSpec
from indexer.train.loss import model_kwargs_for_loss
from indexer.train.towers import lock_towers, should_lock_text

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


def _is_model_dir(spec: str | None) -> bool:
    return spec is not None and Path(spec).is_dir() and (Path(spec) / CONFIG_NAME).is_file()


def _architecture(spec: ModelSpec) -> str:
    if spec.model:
        return resolve_model_name(spec.model)
    if _is_model_dir(spec.pretrained):  # fine-tuning an earlier run keeps its architecture
        return resolve_model_name(str(spec.pretrained))
    return resolve_model_name(DEFAULT_MODEL)


def _load_pretrained(model: torch.nn.Module, pretrained: str) -> None:
    path = Path(pretrained)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    if path.is_dir() and not weights.is_file():
        raise ModelError(f"--pretrained {pretrained}: a directory without {WEIGHTS_NAME}")
    try:
        open_clip.load_checkpoint(model, str(weights), strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[0]
        raise ModelError(f"--pretrained {pretrained} does not fit this architecture ({first})") from e


def build_model(spec: ModelSpec, loss: str, device: torch.device) -> BuiltModel:
    """Create (and possibly load and lock) the model; any error a user can fix is a ModelError."""
    name = _architecture(spec)
    extra = model_kwargs_for_loss(loss)
    is_file = spec.pretrained is not None and (Path(spec.pretrained).exists())
    tag = spec.pretrained if spec.pretrained and not is_file else None
    if tag and name.startswith(open_clip.factory.LOCAL_DIR_PREFIX):
        raise ModelError(f"--pretrained {tag}: not a file or model dir (a tag needs an open_clip --model)")
    dir_kw: dict[str, Any] = {}
    if name.startswith(open_clip.factory.LOCAL_DIR_PREFIX):  # a model dir, wherever it now is
        dir_kw = model_dir_kwargs(Path(name[len(open_clip.factory.LOCAL_DIR_PREFIX) :]))
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, pretrained=tag, **dir_kw, **extra)
    except (RuntimeError, ValueError, OSError) as e:
        raise ModelError(f"cannot build model {name!r}: {str(e).splitlines()[0] if str(e) else e}") from e
    if spec.pretrained and is_file:
        _load_pretrained(model, spec.pretrained)
    lock_text = should_lock_text(spec, model)
    lock_towers(model, spec.lock_image, lock_text, spec.unlocked_layers)
    model_cfg = dict(model_config(name))
    model_cfg.update({k: v for k, v in extra.items() if k == "init_logit_bias"})
    if "text_cfg" in dir_kw:
        model_cfg["text_cfg"] = {k: v for k, v in dir_kw["text_cfg"].items() if k != "hf_model_pretrained"}
    return BuiltModel(
        model=model.to(device),
        name=name,
        model_cfg=model_cfg,
        preprocess=preprocess,
        tokenizer=open_clip.get_tokenizer(name),  # a model dir's own tokenizer files
        image_size=image_size_of(model),
        text_locked=lock_text,
    )
