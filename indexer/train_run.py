"""The state of a training run and how it is set up: model, cached data, optimizer, resumed progress."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from indexer.checkpoint import Progress, load_model_state, load_optimizer_state
from indexer.compact_embedding import compact_token_embedding
from indexer.curves import MetricsLog
from indexer.data import read_records
from indexer.evaluate import Pairs, pairs_from_captions
from indexer.frozen_text import FrozenText, freeze_text_features
from indexer.loss import make_loss
from indexer.model import resolve_device
from indexer.optim import count_params, make_optimizer
from indexer.train_config import CONFIG_FILE, TrainConfig, config_to_dict
from indexer.train_data import CachedSplit, DatasetError, PixelPipeline, build_split, pad_id, used_length
from indexer.train_setup import BuiltModel, build_model

log = logging.getLogger(__name__)

DEFAULT_EPOCHS = 10


@dataclass
class Run:
    """Everything the loop mutates, in one place."""

    cfg: TrainConfig
    built: BuiltModel
    pipeline: PixelPipeline
    train: CachedSplit
    val: CachedSplit | None
    optimizer: torch.optim.AdamW
    loss_fn: torch.nn.Module
    device: torch.device
    generator: torch.Generator
    progress: Progress
    log: MetricsLog
    steps_per_epoch: int
    total_steps: int | None
    val_pairs: Pairs | None = None
    val_tokens: torch.Tensor | None = None  # tokens of val_pairs.texts
    scaler: Any = None  # torch.amp.GradScaler; enabled only for fp16 (`amp`) on CUDA
    frozen_text: FrozenText | None = None  # cached features of a locked text tower
    best_val: dict[str, Any] | None = None
    stop_signal: str | None = None


def _load_split(source: Any, built: BuiltModel, pipeline: PixelPipeline, what: str, workers: int | None):
    records = read_records(source)
    if not records:
        raise DatasetError(f"{what} set {source.source} is empty")
    split = build_split(records, pipeline, built.tokenizer, f"{what} set {source.source}", workers)
    log.info(
        "%s: %d images, %d pairs, %d bad rows skipped", what, len(split.pixels), split.n_pairs, split.n_bad
    )
    return split


@dataclass
class _Data:
    train: CachedSplit
    val: CachedSplit | None
    val_pairs: Pairs | None
    val_tokens: torch.Tensor | None


def _load_data(cfg: TrainConfig, built: BuiltModel, pipeline: PixelPipeline) -> _Data:
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
    return _Data(train, val, val_pairs, val_tokens)


def setup_run(cfg: TrainConfig, resume: bool) -> Run:
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    device = resolve_device(cfg.device)
    built = build_model(cfg.model, cfg.loss, device)
    pipeline = PixelPipeline.from_preprocess(built.preprocess, built.image_size)
    data = _load_data(cfg, built, pipeline)
    if resume:
        load_model_state(cfg.out, built.model)
    seen = [data.train.tokens.flatten()] + (
        [data.val_tokens.flatten()] if data.val_tokens is not None else []
    )
    compact_token_embedding(built.model, torch.cat(seen))
    frozen_text = freeze_text_features(built.model, data.train.tokens, data.val_tokens, device)
    o = cfg.optim
    optimizer = make_optimizer(built.model, o.lr, o.weight_decay, (o.beta1, o.beta2), o.eps)
    micro = min(o.batch_size, data.train.n_pairs)
    steps_per_epoch = max(1, data.train.n_pairs // (micro * o.accum_steps))
    epochs = cfg.epochs or (None if cfg.time_budget_min else DEFAULT_EPOCHS)
    generator = torch.Generator().manual_seed(cfg.seed)
    progress = Progress()
    if resume:
        progress, rng = load_optimizer_state(cfg.out, optimizer)
        generator.set_state(rng)
    return Run(
        cfg=cfg,
        built=built,
        pipeline=pipeline,
        train=data.train,
        val=data.val,
        val_pairs=data.val_pairs,
        val_tokens=data.val_tokens,
        frozen_text=frozen_text,
        optimizer=optimizer,
        loss_fn=make_loss(cfg.loss),
        device=device,
        generator=generator,
        progress=progress,
        log=MetricsLog(cfg.out / "metrics.jsonl"),
        steps_per_epoch=steps_per_epoch,
        total_steps=epochs * steps_per_epoch if epochs else None,
        scaler=torch.amp.GradScaler(device.type, enabled=cfg.precision == "amp" and device.type == "cuda"),
    )


def write_run_config(run: Run) -> None:
    trainable, total = count_params(run.built.model)
    resolved = {
        "config": config_to_dict(run.cfg),
        "resolved": {
            "model_name": run.built.name,
            "model_cfg": run.built.model_cfg,
            "text_locked": run.built.text_locked,
            "text_features_cached": run.frozen_text.what if run.frozen_text else None,
            "device": str(run.device),
            "train_images": len(run.train.pixels),
            "train_pairs": run.train.n_pairs,
            "train_bad_rows": run.train.n_bad,
            "val_bad_rows": run.val.n_bad if run.val else 0,
            "val_images": len(run.val.pixels) if run.val else 0,
            "context_length_used": run.train.tokens.shape[1],
            "steps_per_epoch": run.steps_per_epoch,
            "total_steps": run.total_steps,
            "trainable_params": trainable,
            "total_params": total,
            "torch": torch.__version__,
        },
    }
    (run.cfg.out / CONFIG_FILE).write_text(json.dumps(resolved, indent=2))
