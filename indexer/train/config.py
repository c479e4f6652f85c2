"""The frozen configuration of a training run, built once at the command-line edge and saved with the run."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from indexer.core.errors import ClipsearchError
from indexer.core.precision import PrecisionError, parse_precision
from indexer.data.sources import SourceSpec

CONFIG_FILE = "config.json"


class ConfigError(ClipsearchError, ValueError):
    """Options that contradict each other or are out of range."""


@dataclass(frozen=True)
class ModelSpec:
    """Which dual encoder to train and from which weights."""

    model: str | None = None  # shipped name, open_clip name, JSON path or model dir; None: `small`
    pretrained: str | None = None  # open_clip tag, checkpoint file, or model dir of an earlier run
    lock_image: bool | None = None  # None: locked when the config starts it from pretrained weights
    lock_text: bool | None = None  # None: locked when the text tower is a pretrained HF language model
    unlocked_layers: int = 0  # with a lock: the last N layers (groups for the image tower) stay trainable
    unlocked_text_layers: int | None = (
        None  # the text tower's own N (open_clip_train's split); None: the above
    )


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup + cosine; the defaults are the CPU recipe of the `small` model."""

    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup: float = 0.05  # fraction of the run (steps, or wall-clock with a time budget)
    beta1: float = 0.9
    beta2: float = 0.98
    eps: float = 1e-6
    grad_clip: float = 1.0  # max global L2 norm of the gradients; 0 disables clipping
    batch_size: int = 128
    accum_steps: int = 1  # micro-batches per optimizer step; the loss sees all of them at once


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs; `config.json` in the run dir is this, resolved."""

    out: Path
    train: SourceSpec
    val: SourceSpec | None = None
    model: ModelSpec = field(default_factory=ModelSpec)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: str = "clip"
    epochs: int | None = None  # None with no time budget: DEFAULT_EPOCHS
    time_budget_min: float | None = None
    precision: str = "auto"  # see indexer.core.precision
    device: str = "auto"
    seed: int = 0
    crop_scale: float = 1.0  # random crop of this fraction of the side per batch; 1 disables
    workers: int | None = None  # image decoding processes; None: min(4, CPUs)
    log_every: int = 10
    checkpoint_every_min: float = 5.0
    progress: bool = True

    def validate(self) -> TrainConfig:
        if self.epochs is not None and self.time_budget_min is not None:
            raise ConfigError("give --epochs or --time-budget, not both")
        if self.epochs is not None and self.epochs < 1:
            raise ConfigError("--epochs must be at least 1")
        if self.time_budget_min is not None and self.time_budget_min <= 0:
            raise ConfigError("--time-budget must be a positive number of minutes")
        if self.loss not in ("clip", "siglip"):
            raise ConfigError(f"unknown loss {self.loss!r}: use clip or siglip")
        try:
            precision = parse_precision(self.precision)
        except PrecisionError as e:
            raise ConfigError(f"--{e}") from None
        if self.optim.batch_size < 2 or self.optim.accum_steps < 1:
            raise ConfigError("--batch-size must be at least 2 and --accum-steps at least 1")
        if not 0 <= self.optim.warmup < 1:
            raise ConfigError("--warmup is a fraction of the run in [0, 1)")
        if not 0 < self.crop_scale <= 1:
            raise ConfigError("--crop-scale must be in (0, 1]")
        return replace(self, precision=precision)


def _to_json(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Path):
        return str(value)
    return value


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return {k: _to_json(v) for k, v in asdict(cfg).items()} | {
        "train": _to_json(cfg.train),
        "val": _to_json(cfg.val),
        "out": str(cfg.out),
    }


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    d = dict(d)
    d["out"] = Path(d["out"])
    d["train"] = SourceSpec(**d["train"])
    d["val"] = SourceSpec(**d["val"]) if d.get("val") else None
    d["model"] = ModelSpec(**d["model"])
    d["optim"] = OptimConfig(**d["optim"])
    return TrainConfig(**d)


def load_run_config(run_dir: Path) -> TrainConfig:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run dir: it has no {CONFIG_FILE}")
    return config_from_dict(json.loads(path.read_text())["config"])
