"""`train(TrainConfig)`: the contrastive training loop with evaluation, checkpoints, resume, time budget."""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from indexer.checkpoint import CHECKPOINT_DIR, Progress, save_checkpoint
from indexer.compact_embedding import full_token_embedding
from indexer.curves import plot_curves
from indexer.errors import ClipsearchError
from indexer.evaluate import retrieval_metrics, val_score
from indexer.loss import clamp_logit_scale, contrastive_loss
from indexer.optim import lr_at, set_lr
from indexer.train_config import TrainConfig
from indexer.train_data import random_crop_batch
from indexer.train_run import Run, setup_run, write_run_config
from indexer.train_setup import save_trained_model

log = logging.getLogger(__name__)

MIN_WARMUP_STEPS = 50
EVAL_BATCH = 512


class TrainingDiverged(ClipsearchError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class RunResult:
    """How a run ended: `status` is `finished`, `time_budget` or `interrupted`."""

    status: str
    run_dir: Path
    progress: Progress
    best_val: dict[str, Any] | None


def autocast_for(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    """Mixed precision as asked; `auto` is bf16 autocast on CUDA and plain fp32 on CPU."""
    if precision == "auto":
        precision = "amp_bf16" if device.type == "cuda" else "fp32"
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "amp_bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def _batches(run: Run, epoch: int) -> Iterator[torch.Tensor]:
    """Pair indices of each micro-batch of an epoch: a fixed permutation per (seed, epoch), so resume
    can skip the batches already done."""
    perm = torch.randperm(
        run.train.n_pairs, generator=torch.Generator().manual_seed(run.cfg.seed * 1000 + epoch)
    )
    micro = min(run.cfg.optim.batch_size, run.train.n_pairs)
    for s in range(run.steps_per_epoch):
        step_idx = perm[s * micro * run.cfg.optim.accum_steps : (s + 1) * micro * run.cfg.optim.accum_steps]
        yield step_idx


def _features(run: Run, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pixels = run.train.pixels[run.train.pair_image[idx]]
    pixels = run.pipeline.normalise(random_crop_batch(pixels.float(), run.generator, run.cfg.crop_scale))
    pixels = pixels.to(run.device, non_blocking=True)
    with autocast_for(run.cfg.precision, run.device):
        image_emb = run.built.model.encode_image(pixels, normalize=True)
        if run.frozen_text is not None:
            text_emb = run.frozen_text.embed(run.frozen_text.train[idx].to(run.device, non_blocking=True))
        else:
            tokens = run.train.tokens[idx].to(run.device, non_blocking=True)
            text_emb = run.built.model.encode_text(tokens, normalize=True)
    return image_emb.float(), text_emb.float()


def _loss(run: Run, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    model = run.built.model
    bias = getattr(model, "logit_bias", None)
    return contrastive_loss(run.loss_fn, image_emb, text_emb, model.logit_scale.exp(), bias)


def _train_step(run: Run, idx: torch.Tensor) -> float:
    """One optimizer step over `accum_steps` micro-batches.

    With accumulation the loss is computed over the whole effective batch, as open_clip_train does:
    features of every micro-batch are first computed without gradients, then each micro-batch is run
    again with gradients and its features swapped into the full set."""
    chunks = idx.chunk(run.cfg.optim.accum_steps)
    run.optimizer.zero_grad(set_to_none=True)
    if len(chunks) == 1:
        loss = _loss(run, *_features(run, idx))
        _check_finite(run, loss)
        run.scaler.scale(loss).backward()
    else:
        state = run.generator.get_state()
        with torch.no_grad():
            cached = [_features(run, c) for c in chunks]
        run.generator.set_state(state)  # the same crops again in the gradient pass
        for j, c in enumerate(chunks):
            img, txt = _features(run, c)
            all_img = torch.cat([img if k == j else cached[k][0] for k in range(len(chunks))])
            all_txt = torch.cat([txt if k == j else cached[k][1] for k in range(len(chunks))])
            loss = _loss(run, all_img, all_txt)
            _check_finite(run, loss)
            run.scaler.scale(loss).backward()
        _average_shared_grads(run.built.model, len(chunks))
    if run.cfg.optim.grad_clip > 0:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.built.model.parameters(), run.cfg.optim.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    clamp_logit_scale(run.built.model)
    return float(loss.detach())


def _average_shared_grads(model: torch.nn.Module, n: int) -> None:
    """logit_scale/bias take part in every micro-batch's full-batch loss, so their gradient was summed n
    times; scaled back, the step equals one full-batch step (open_clip_train leaves it n times larger)."""
    for name in ("logit_scale", "logit_bias"):
        p = getattr(model, name, None)
        if isinstance(p, torch.Tensor) and p.grad is not None:
            p.grad /= n


def _check_finite(run: Run, loss: torch.Tensor) -> None:
    if not math.isfinite(float(loss.detach())):
        raise TrainingDiverged(
            f"loss became {float(loss.detach())} at step {run.progress.step}: training diverged "
            "(try a lower --lr or "
            f"--precision fp32); the last good checkpoint is kept in {run.cfg.out}"
        )


@torch.no_grad()
def validate(run: Run) -> dict[str, Any]:
    """Retrieval metrics of the current model on the cached val set."""
    assert run.val is not None
    model = run.built.model
    was_training = model.training
    model.eval()
    pairs = run.val_pairs
    tokens = run.val_tokens
    with autocast_for(run.cfg.precision, run.device):
        image_emb = torch.cat(
            [
                model.encode_image(
                    run.pipeline.normalise(run.val.pixels[s : s + EVAL_BATCH]).to(run.device), normalize=True
                )
                for s in range(0, len(run.val.pixels), EVAL_BATCH)
            ]
        )
        if run.frozen_text is not None and run.frozen_text.val is not None:
            text_emb = run.frozen_text.embed(run.frozen_text.val.to(run.device))
        else:
            text_emb = torch.cat(
                [
                    model.encode_text(tokens[s : s + EVAL_BATCH].to(run.device), normalize=True)
                    for s in range(0, len(tokens), EVAL_BATCH)
                ]
            )
    model.train(was_training)
    return retrieval_metrics(image_emb.float().cpu().numpy(), text_emb.float().cpu().numpy(), pairs)


def _evaluate(run: Run) -> None:
    """Validate, log, and save `model/` when the validation score is the best so far."""
    metrics = validate(run)
    score = val_score(metrics)
    p = run.progress
    flat = {f"t2i_{k}": v for k, v in metrics["text_to_image"].items()}
    flat |= {f"i2t_{k}": v for k, v in metrics["image_to_text"].items()}
    run.log.write(
        {"kind": "val", "step": p.step, "epoch": p.epoch, "score": score, "n": metrics["n"], **flat}
    )
    p.extra["last_eval_step"] = p.step
    if score > p.best_score:
        p.best_score, p.best_step = score, p.step
        run.best_val = metrics
        p.extra["best_val"] = metrics
        save_trained_model(run.built, run.cfg.out / "model")
    log.info(
        "step %d val: t2i R@10 %.3f, i2t R@10 %.3f (best %.3f at step %d)",
        p.step,
        metrics["text_to_image"]["R@10"],
        metrics["image_to_text"]["R@10"],
        p.best_score,
        p.best_step,
    )


def _save(run: Run) -> None:
    with full_token_embedding(run.built.model):
        save_checkpoint(run.cfg.out, run.built.model, run.optimizer, run.progress, run.generator.get_state())


@contextmanager
def _stop_on_signals(run: Run) -> Iterator[None]:
    """Ctrl-C and SIGTERM ask the loop to stop after the current step and save a resumable checkpoint."""

    def ask_stop(signum: int, _frame: Any) -> None:
        run.stop_signal = signal.Signals(signum).name

    previous = {s: signal.signal(s, ask_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


class _Clock:
    """Wall-clock of the run, continued across resumes, and the time to keep for the final save."""

    def __init__(self, run: Run, started: float) -> None:
        # Setup (decoding, model build) counts against a time budget: the user asked for N minutes.
        self.start = started - run.progress.elapsed_s
        self.budget_s = run.cfg.time_budget_min * 60 if run.cfg.time_budget_min else None
        self.reserve_s = 2.0
        self.step_s = 0.0  # running mean of one step's wall-clock
        self.last_checkpoint = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def fraction(self, run: Run) -> float:
        if self.budget_s:
            return self.elapsed() / self.budget_s
        return run.progress.step / max(1, run.total_steps or 1)

    def spent(self) -> bool:
        """True when one more step would not finish before the budget, counting the final eval + save."""
        return self.budget_s is not None and self.elapsed() + self.reserve_s + self.step_s >= self.budget_s

    def step_done(self, started: float) -> None:
        self.step_s = (
            0.8 * self.step_s + 0.2 * (time.monotonic() - started)
            if self.step_s
            else time.monotonic() - started
        )

    def timed(self, fn: Any, run: Run) -> None:
        t0 = time.monotonic()
        fn(run)
        self.reserve_s = max(self.reserve_s, 1.5 * (time.monotonic() - t0) + 1.0)


def _progress_bar(run: Run, clock: _Clock) -> tqdm:
    if clock.budget_s:
        return tqdm(
            total=round(clock.budget_s),
            initial=round(clock.elapsed()),
            unit="s",
            disable=not run.cfg.progress,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}s [{elapsed}<{remaining}{postfix}]",
        )
    return tqdm(total=run.total_steps, initial=run.progress.step, unit="step", disable=not run.cfg.progress)


def _log_step(run: Run, loss: float, lr: float, window: list[float], bar: tqdm, clock: _Clock) -> None:
    p = run.progress
    samples_per_s = window[1] / max(1e-9, time.monotonic() - window[0])
    bar.set_postfix(loss=f"{loss:.3f}", samples_s=f"{samples_per_s:.0f}", epoch=p.epoch, refresh=False)
    bar.update(round(clock.elapsed()) - bar.n if clock.budget_s else 1)
    if p.step % run.cfg.log_every == 0:
        scale = float(run.built.model.logit_scale.detach().exp())
        run.log.write(
            {
                "kind": "train",
                "step": p.step,
                "epoch": p.epoch,
                "loss": loss,
                "lr": lr,
                "logit_scale": scale,
                "samples_per_s": samples_per_s,
                "elapsed_s": clock.elapsed(),
            }
        )
        window[:] = [time.monotonic(), 0.0]


def _run_epoch(run: Run, clock: _Clock, bar: tqdm) -> str | None:
    """Train until the epoch ends (None) or the run must stop (its status)."""
    p, window = run.progress, [time.monotonic(), 0.0]
    for s, idx in enumerate(_batches(run, p.epoch)):
        if s < p.step_in_epoch:
            continue
        if run.stop_signal:
            return "interrupted"
        if clock.spent():
            return "time_budget"
        if run.total_steps is not None and p.step >= run.total_steps:
            return "finished"
        # Warm up over the schedule's fraction of the run, but never over fewer than MIN_WARMUP_STEPS:
        # a time budget on a slow machine can leave 5% of it a handful of steps, and a transformer
        # trained from scratch collapses (all embeddings alike, loss stuck at ln(batch)) without warmup.
        min_warmup = (
            MIN_WARMUP_STEPS if run.total_steps is None else min(MIN_WARMUP_STEPS, run.total_steps // 5)
        )
        ramp = min(1.0, (p.step + 1) / max(1, min_warmup))
        lr = lr_at(clock.fraction(run), run.cfg.optim.lr, run.cfg.optim.warmup) * ramp
        set_lr(run.optimizer, lr)
        started = time.monotonic()
        loss = _train_step(run, idx)
        clock.step_done(started)
        p.step, p.step_in_epoch, p.samples = p.step + 1, s + 1, p.samples + len(idx)
        p.elapsed_s = clock.elapsed()
        window[1] += len(idx)
        _log_step(run, loss, lr, window, bar, clock)
        if time.monotonic() - clock.last_checkpoint > run.cfg.checkpoint_every_min * 60:
            _save(run)
            clock.last_checkpoint = time.monotonic()
    return None


def _loop(run: Run, started: float) -> str:
    clock = _Clock(run, started)
    with _progress_bar(run, clock) as bar:
        while True:
            status = _run_epoch(run, clock, bar)
            if status is not None:
                return status
            run.progress.epoch, run.progress.step_in_epoch = run.progress.epoch + 1, 0
            if run.val is not None:
                clock.timed(_evaluate, run)
            if run.total_steps is not None and run.progress.step >= run.total_steps:
                return "finished"


def _finish(run: Run, status: str) -> None:
    p = run.progress
    if status != "interrupted" and run.val is not None and p.extra.get("last_eval_step") != p.step:
        _evaluate(run)
    if run.val is None:
        save_trained_model(run.built, run.cfg.out / "model")
    p.finished = status != "interrupted"
    _save(run)
    plot_curves(run.cfg.out / "metrics.jsonl", run.cfg.out / "curves.png")


def train(cfg: TrainConfig, resume: bool = False) -> RunResult:
    """Train as `cfg` says (continuing the checkpoint in `cfg.out` when `resume`), and return how it ended.

    Raises:
        ClipsearchError: bad data, options or model; TrainingDiverged on a NaN loss.
    """
    started = time.monotonic()
    cfg = cfg.validate()
    cfg.out.mkdir(parents=True, exist_ok=True)
    if not resume and (cfg.out / CHECKPOINT_DIR).exists():
        raise ClipsearchError(f"{cfg.out} already holds a run; continue it with --resume or pick a new --out")
    run = setup_run(cfg, resume)
    if run.progress.finished:
        log.info("%s: the run already finished; nothing to do", cfg.out)
        return RunResult("finished", cfg.out, run.progress, run.progress.extra.get("best_val"))
    run.best_val = run.progress.extra.get("best_val")
    write_run_config(run)
    with _stop_on_signals(run):
        try:
            status = _loop(run, started)
        except TrainingDiverged:
            plot_curves(cfg.out / "metrics.jsonl", cfg.out / "curves.png")
            raise
        _finish(run, status)
    return RunResult(status, cfg.out, run.progress, run.best_val)
