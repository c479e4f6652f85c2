"""The state of a training run and how it is set up: model, cached data, optimizer, resumed progress."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from indexer.core.encoder import resolve_device
from indexer.core.precision import autocast_dtype
from indexer.data.decode import DatasetError
from indexer.data.sources import SourceSpec, read_records
from indexer.eval.metrics import Pairs, pairs_from_captions
from indexer.train.checkpoint import load_model_state, load_optimizer_state
from indexer.train.compact_embedding import compact_token_embedding
from indexer.train.config import CONFIG_FILE, ConfigError, TrainConfig, config_to_dict
from indexer.train.curves import MetricsLog
from indexer.train.data import CachedSplit, PixelPipeline, build_split, pad_id, used_length
from indexer.train.distributed import Dist, Towers, init_from_env, make_distributed_loss, wrap
from indexer.train.frozen_image import FrozenImage, freeze_image_features
from indexer.train.frozen_text import FrozenText, freeze_text_features
from indexer.train.loss import make_loss
from indexer.train.model import BuiltModel, build_model
from indexer.train.optim import count_params, make_optimizer
from indexer.train.progress import Progress

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 10


@dataclass
class TrainData:
    """The cached train and val sets, and how a batch of them becomes model input."""

    pipeline: PixelPipeline
    train: CachedSplit
    val: CachedSplit | None
    val_pairs: Pairs | None  # val's unique captions and the images each belongs to
    val_tokens: torch.Tensor | None  # tokens of val_pairs.texts
    frozen_text: FrozenText | None  # cached features of a locked text tower
    frozen_image: FrozenImage | None = None  # cached features of a locked image trunk


@dataclass
class Optimization:
    """What changes the weights: AdamW, the loss, fp16 loss scaling, the augmentation RNG."""

    optimizer: torch.optim.AdamW
    loss_fn: torch.nn.Module
    scaler: Any  # torch.amp.GradScaler; enabled only for fp16 autocast on CUDA
    generator: torch.Generator  # random crops; saved with checkpoints so a resume crops the same


@dataclass(frozen=True)
class Schedule:
    steps_per_epoch: int
    total_steps: int | None  # None: the run ends on its time budget


@dataclass
class Run:
    """Everything the loop reads and mutates."""

    cfg: TrainConfig
    device: torch.device
    built: BuiltModel
    data: TrainData
    optim: Optimization
    schedule: Schedule
    progress: Progress
    log: MetricsLog
    towers: torch.nn.Module  # the step's forward pass (`Towers`, under DDP when distributed)
    stop_signal: str | None = None  # set by Ctrl-C / SIGTERM: stop after the current step
    dist: Dist | None = None  # this rank's place in a torchrun run; None for one process

    @property
    def is_main(self) -> bool:
        """Only this process writes logs, checkpoints and the model dir."""
        return self.dist is None or self.dist.is_main

    @property
    def world_size(self) -> int:
        return 1 if self.dist is None else self.dist.world_size


def _load_split(
    source: SourceSpec, built: BuiltModel, pipeline: PixelPipeline, what: str, workers: int | None
) -> CachedSplit:
    records = read_records(source)
    if not records:
        raise DatasetError(f"{what} set {source.source} is empty")
    split = build_split(records, pipeline, built.tokenizer, f"{what} set {source.source}", workers)
    log.info(
        "%s: %d images, %d pairs, %d bad rows skipped", what, len(split.pixels), split.n_pairs, split.n_bad
    )
    return split


def _load_data(cfg: TrainConfig, built: BuiltModel, pipeline: PixelPipeline) -> TrainData:
    """Decode and tokenize train and val once; cut token columns no caption uses."""
    train = _load_split(cfg.train, built, pipeline, "train", cfg.workers)
    if train.n_pairs < 2:
        raise DatasetError(
            f"train set {cfg.train.source} has {train.n_pairs} pair; contrastive training needs 2"
        )
    val = val_pairs = val_tokens = None
    if cfg.val is not None:
        val = _load_split(cfg.val, built, pipeline, "val", cfg.workers)
        if len(val.pixels) < 2:
            raise DatasetError(
                f"val set {cfg.val.source} has {len(val.pixels)} image; recall needs at least 2"
            )
        val_pairs = pairs_from_captions(val.captions)
        val_tokens = built.tokenizer(list(val_pairs.texts))
    pad = pad_id(built.tokenizer)
    needed = max(
        used_length(train.tokens, pad), used_length(val_tokens, pad) if val_tokens is not None else 1
    )
    length = built.shorten_context(needed)
    train.tokens = train.tokens[:, :length].contiguous()
    val_tokens = val_tokens[:, :length].contiguous() if val_tokens is not None else None
    return TrainData(pipeline, train, val, val_pairs, val_tokens, frozen_text=None)


def setup_run(cfg: TrainConfig, resume: bool) -> Run:
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    d, device = init_from_env(resolve_device(cfg.device))
    if d is not None and cfg.optim.accum_steps > 1:
        raise ConfigError("--accum-steps above 1 is not supported with several processes yet")
    built = build_model(cfg.model, cfg.loss, device)
    data = _load_data(cfg, built, PixelPipeline.from_preprocess(built.preprocess, built.image_size))
    if resume:
        load_model_state(cfg.out, built.model)
    seen = [data.train.tokens.flatten()] + (
        [data.val_tokens.flatten()] if data.val_tokens is not None else []
    )
    compact_token_embedding(built.model, torch.cat(seen))
    # Computed once across the ranks (each its 1/N share, all-gathered), before DDP wraps the model.
    data.frozen_text = freeze_text_features(built.model, data.train.tokens, data.val_tokens, device, d)
    data.frozen_image = freeze_image_features(
        built.model,
        data.train.pixels,
        data.val.pixels if data.val is not None else None,
        data.pipeline.normalise,
        cfg.crop_scale,
        device,
        d,
    )
    o = cfg.optim
    optimizer = make_optimizer(built.model, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps)
    micro = min(o.batch_size, data.train.n_pairs)
    world = 1 if d is None else d.world_size  # --batch-size is per process, as in open_clip_train
    steps_per_epoch = max(1, data.train.n_pairs // (micro * o.accum_steps * world))
    epochs = cfg.epochs or (None if cfg.time_budget_min else DEFAULT_EPOCHS)
    generator = torch.Generator().manual_seed(cfg.seed)
    progress = Progress()
    if resume:
        progress, rng = load_optimizer_state(cfg.out, optimizer)
        generator.set_state(rng)
    towers: torch.nn.Module = Towers(
        built.model,
        data.frozen_text.embed if data.frozen_text else None,
        data.frozen_image.embed if data.frozen_image else None,
    )
    if d is not None:
        towers = wrap(towers, d, device)  # after resume and every change to the parameters
    fp16 = autocast_dtype(cfg.precision, device) == torch.float16 and device.type == "cuda"
    return Run(
        cfg=cfg,
        device=device,
        built=built,
        data=data,
        optim=Optimization(
            optimizer=optimizer,
            loss_fn=make_loss(cfg.loss) if d is None else make_distributed_loss(cfg.loss, d),
            scaler=torch.amp.GradScaler(device.type, enabled=fp16),
            generator=generator,
        ),
        schedule=Schedule(steps_per_epoch, epochs * steps_per_epoch if epochs else None),
        progress=progress,
        log=MetricsLog(cfg.out / "metrics.jsonl"),
        towers=towers,
        dist=d,
    )


def write_run_config(run: Run) -> None:
    trainable, total = count_params(run.built.model)
    d = run.data
    resolved = {
        "config": config_to_dict(run.cfg),
        "resolved": {
            "model_name": run.built.name,
            "model_cfg": run.built.model_cfg,
            "text_locked": run.built.text_locked,
            "image_locked": run.built.image_locked,
            "text_features_cached": d.frozen_text.what if d.frozen_text else None,
            "image_features_cached": d.frozen_image is not None,
            "device": str(run.device),
            "train_images": len(d.train.pixels),
            "train_pairs": d.train.n_pairs,
            "train_bad_rows": d.train.n_bad,
            "val_bad_rows": d.val.n_bad if d.val else 0,
            "val_images": len(d.val.pixels) if d.val else 0,
            "context_length_used": d.train.tokens.shape[1],
            "steps_per_epoch": run.schedule.steps_per_epoch,
            "total_steps": run.schedule.total_steps,
            "trainable_params": trainable,
            "total_params": total,
            "torch": torch.__version__,
        },
    }
    (run.cfg.out / CONFIG_FILE).write_text(json.dumps(resolved, indent=2))
