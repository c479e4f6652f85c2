"""Which towers train: LiT-style locks with open_clip's own `lock_*_tower`, and the default for the text
tower (a pretrained language model is locked unless asked otherwise)."""

from __future__ import annotations

import logging
from typing import Any

import torch
from open_clip.hf_model import HFTextEncoder
from timm.layers import freeze_batch_norm_2d

from indexer.core.errors import ClipsearchError
from indexer.train.config import ConfigError, ModelSpec

log = logging.getLogger(__name__)


def should_lock_text(spec: ModelSpec, model: Any) -> bool:
    """An explicit --lock-text/--no-lock-text, else: lock a pretrained language model (a Hugging Face text
    tower). Locked, its features are computed once per caption (`indexer.train.frozen_text`) and a step
    costs the image tower alone: on the emoji set `small` trains 3.8x faster so, reaching val R@10 0.695
    in 3 minutes; trained too, it scored higher after 10 minutes (0.728 vs 0.692), so long runs may prefer
    --no-lock-text."""
    if spec.lock_text is not None:
        return spec.lock_text
    locked = isinstance(getattr(model, "text", None), HFTextEncoder)
    if locked:
        log.info("the text tower is a pretrained language model: locked (train it with --no-lock-text)")
    return locked


def should_lock_image(spec: ModelSpec, image_pretrained: bool) -> bool:
    """An explicit --lock-image/--no-lock-image, else: lock an image tower its config starts pretrained
    (`small-pt`'s ImageNet EfficientNet), as LiT does. Locked and without augmentation, its features are
    computed once per image (`indexer.train.frozen_image`): trained, EfficientNet-Lite0 made a step of
    `small-pt` about 5x slower than one of `small` on 2 shared cores."""
    if spec.lock_image is not None:
        return spec.lock_image
    if image_pretrained:
        log.info("the image tower starts pretrained: locked (train it with --no-lock-image)")
    return image_pretrained


def lock_towers(
    model: Any, lock_image: bool, lock_text: bool, unlocked_layers: int, unlocked_text: int | None = None
) -> None:
    """Freeze the towers asked for; the last `unlocked_layers` layer groups of a locked tower stay
    trainable (`unlocked_text`, when given, is the text tower's own count, as open_clip_train splits
    them). A locked image tower also keeps its batch-norm statistics frozen, as LiT does."""
    if unlocked_layers and not (lock_image or lock_text):
        raise ConfigError("--unlocked-layers only applies with --lock-image or --lock-text")
    if unlocked_text and not lock_text:
        raise ConfigError("--unlocked-text-layers only applies with a locked text tower")
    if lock_image:
        _lock_image(model, unlocked_layers)
    unlocked_layers = unlocked_layers if unlocked_text is None else unlocked_text
    text = getattr(model, "text", None)
    if (
        lock_text
        and unlocked_layers
        and isinstance(text, HFTextEncoder)
        and _lock_hf_layers(text, unlocked_layers)
    ):
        return
    if lock_text:
        try:
            model.lock_text_tower(unlocked_layers=unlocked_layers, freeze_layer_norm=True)
        except KeyError as e:  # open_clip's layer map for Hugging Face towers lacks some model types
            kind = getattr(getattr(getattr(model, "text", None), "config", None), "model_type", "this")
            raise ClipsearchError(
                f"--unlocked-layers is not supported for a {kind} text tower (open_clip has no layer map "
                f"for it: missing {e}); lock the whole tower (--unlocked-layers 0) or train it "
                "(--no-lock-text)"
            ) from None


def _lock_image(model: Any, unlocked_groups: int) -> None:
    """open_clip's image lock, with the frozen part's batch norms frozen by timm for a timm trunk.

    open_clip's `freeze_batch_norm_2d` turns timm's `BatchNormAct2d` (norm + activation, as EfficientNet
    has) into a plain `FrozenBatchNorm2d`, dropping the activation: the locked tower then computes
    something else than the saved model does. timm's own freeze keeps it (`FrozenBatchNormAct2d`)."""
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    if not isinstance(trunk, torch.nn.Module):
        model.lock_image_tower(unlocked_groups=unlocked_groups, freeze_bn_stats=True)
        return
    model.lock_image_tower(unlocked_groups=unlocked_groups, freeze_bn_stats=False)
    _freeze_locked_batch_norms(trunk)


def _freeze_locked_batch_norms(module: torch.nn.Module) -> None:
    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d) and not any(p.requires_grad for p in child.parameters()):
            setattr(module, name, freeze_batch_norm_2d(child))
        else:
            _freeze_locked_batch_norms(child)


def _lock_hf_layers(text: HFTextEncoder, unlocked_layers: int) -> bool:
    """Freeze a BERT-like tower's embeddings and all but its last `unlocked_layers` layers (the pooler and
    projection train), as open_clip's HF lock would count them; False when the tower has no such stack.
    The frozen lower part's output is then cached once per caption (`indexer.train.frozen_text`)."""
    layers = getattr(getattr(text.transformer, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList) or not hasattr(text.transformer, "embeddings"):
        return False
    if unlocked_layers >= len(layers):
        raise ConfigError(
            f"--unlocked-layers {unlocked_layers}: the text tower has {len(layers)} layers; "
            "to train them all, use --no-lock-text"
        )
    for module in [text.transformer.embeddings, *layers[: len(layers) - unlocked_layers]]:
        for p in module.parameters():
            p.requires_grad = False
    log.info("text tower: the last %d of %d layers train, the rest are locked", unlocked_layers, len(layers))
    return True
