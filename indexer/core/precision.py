"""Numeric precision, one vocabulary for every command and the service: `auto`, `bf16`, `fp16`, `fp32`.

`auto` is bf16 autocast on a GPU that supports it, fp16 autocast on an older GPU, and plain fp32 on the
CPU; an explicit `bf16` or `fp16` autocasts on any device. open_clip_train's names `amp_bf16` and `amp`
are accepted for `bf16` and `fp16`, so its users' habits carry over.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, Any

from indexer.core.errors import ClipsearchError

if TYPE_CHECKING:  # torch is imported where it is used, so parsing a config stays light
    import torch

PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ALIASES = {"amp_bf16": "bf16", "amp": "fp16"}  # open_clip_train's --precision names


class PrecisionError(ClipsearchError, ValueError):
    """A precision name outside the vocabulary."""


def parse_precision(value: str) -> str:
    """The canonical name of `value` (an alias becomes its canonical name)."""
    name = ALIASES.get(value, value)
    if name not in PRECISIONS:
        raise PrecisionError(f"precision must be one of {', '.join(PRECISIONS)}, got {value!r}")
    return name


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype `precision` means on `device`; None means plain fp32."""
    import torch

    name = parse_precision(precision)
    if name == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(name)


def autocast(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    """The autocast context for `precision` on `device` (a no-op for fp32)."""
    import torch

    dtype = autocast_dtype(precision, device)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)
