"""`train(TrainConfig)`: the contrastive training loop with evaluation, checkpoints, resume, time budget."""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from indexer.core.bars import progress_bar
from indexer.core.errors import ClipsearchError
from indexer.eval.metrics import RetrievalMetrics
from indexer.train.checkpoint import CHECKPOINT_DIR, save_checkpoint
from indexer.train.compact_embedding import full_token_embedding
from indexer.train.config import TrainConfig
from indexer.train.curves import plot_curves
from indexer.train.distributed import agree, shutdown
from indexer.train.model import save_trained_model
from indexer.train.optim import lr_at, set_lr
from indexer.train.progress import Progress
from indexer.train.run import Run, setup_run, write_run_config
from indexer.train.step import TrainingDiverged, batches, train_step, validate

log = logging.getLogger(__name__)

MIN_WARMUP_STEPS = 50


@dataclass
class RunResult:
    """How a run ended: `status` is `finished`, `time_budget` or `interrupted`."""

    status: str
    run_dir: Path
    progress: Progress
    best_val: RetrievalMetrics | None


def _evaluate(run: Run) -> None:
    """Validate, log, and save `model/` when the validation score is the best so far."""
    metrics = validate(run)
    score = metrics.score()
    p = run.progress
    flat = {f"t2i_{k}": v for k, v in metrics.text_to_image.as_dict().items()}
    flat |= {f"i2t_{k}": v for k, v in metrics.image_to_text.as_dict().items()}
    run.log.write({"kind": "val", "step": p.step, "epoch": p.epoch, "score": score, "n": metrics.n, **flat})
    p.last_eval_step = p.step
    if score > p.best_score:
        p.best_score, p.best_step, p.best_val = score, p.step, metrics
        save_trained_model(run.built, run.cfg.out / "model")
    log.info(
        "step %d val: t2i R@10 %.3f, i2t R@10 %.3f (best %.3f at step %d)",
        p.step,
        metrics.text_to_image.r_at_10,
        metrics.image_to_text.r_at_10,
        p.best_score,
        p.best_step,
    )


def _save(run: Run) -> None:
    with full_token_embedding(run.built.model):
        save_checkpoint(
            run.cfg.out, run.built.model, run.optim.optimizer, run.progress, run.optim.generator.get_state()
        )


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
        return run.progress.step / max(1, run.schedule.total_steps or 1)

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
        return progress_bar(
            total=round(clock.budget_s),
            initial=round(clock.elapsed()),
            unit="s",
            disable=not run.cfg.progress or not run.is_main,
            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}s [{elapsed}<{remaining}{postfix}]",
        )
    return progress_bar(
        total=run.schedule.total_steps,
        initial=run.progress.step,
        unit="step",
        disable=not run.cfg.progress or not run.is_main,
    )


def _log_step(run: Run, loss: float, lr: float, window: list[float], bar: tqdm, clock: _Clock) -> None:
    p = run.progress
    samples_per_s = window[1] / max(1e-9, time.monotonic() - window[0])
    bar.set_postfix(loss=f"{loss:.3f}", samples_s=f"{samples_per_s:.0f}", epoch=p.epoch, refresh=False)
    bar.update(round(clock.elapsed()) - bar.n if clock.budget_s else 1)
    if p.step % run.cfg.log_every == 0 and run.is_main:
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


def _stop_reason(run: Run, clock: _Clock) -> str | None:
    if run.stop_signal:
        return "interrupted"
    if clock.spent():
        return "time_budget"
    if run.schedule.total_steps is not None and run.progress.step >= run.schedule.total_steps:
        return "finished"
    return None


def _run_epoch(run: Run, clock: _Clock, bar: tqdm) -> str | None:
    """Train until the epoch ends (None) or the run must stop (its status)."""
    p, window = run.progress, [time.monotonic(), 0.0]
    for s, idx in enumerate(batches(run, p.epoch)):
        if s < p.step_in_epoch:
            continue
        status = agree(_stop_reason(run, clock), run.dist)  # every rank stops after the same step
        if status is not None:
            return status
        # Warm up over the schedule's fraction of the run, but never over fewer than MIN_WARMUP_STEPS:
        # a time budget on a slow machine can leave 5% of it a handful of steps, and a transformer
        # trained from scratch collapses (all embeddings alike, loss stuck at ln(batch)) without warmup.
        min_warmup = (
            MIN_WARMUP_STEPS
            if run.schedule.total_steps is None
            else min(MIN_WARMUP_STEPS, run.schedule.total_steps // 5)
        )
        ramp = min(1.0, (p.step + 1) / max(1, min_warmup))
        lr = lr_at(clock.fraction(run), run.cfg.optim.lr, run.cfg.optim.warmup) * ramp
        set_lr(run.optim.optimizer, lr)
        started = time.monotonic()
        loss = train_step(run, idx)
        clock.step_done(started)
        p.step, p.step_in_epoch, p.samples = p.step + 1, s + 1, p.samples + len(idx) * run.world_size
        p.elapsed_s = clock.elapsed()
        window[1] += len(idx) * run.world_size
        _log_step(run, loss, lr, window, bar, clock)
        if run.is_main and time.monotonic() - clock.last_checkpoint > run.cfg.checkpoint_every_min * 60:
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
            if run.data.val is not None and run.is_main:
                clock.timed(_evaluate, run)
            if run.schedule.total_steps is not None and run.progress.step >= run.schedule.total_steps:
                return "finished"


def _finish(run: Run, status: str) -> None:
    if not run.is_main:
        return
    p = run.progress
    if status != "interrupted" and run.data.val is not None and p.last_eval_step != p.step:
        _evaluate(run)
    if run.data.val is None:
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
        shutdown(run.dist)
        return RunResult("finished", cfg.out, run.progress, run.progress.best_val)
    if run.is_main:
        write_run_config(run)
    with _stop_on_signals(run):
        try:
            status = _loop(run, started)
        except TrainingDiverged:
            if run.is_main:
                plot_curves(cfg.out / "metrics.jsonl", cfg.out / "curves.png")
            raise
        _finish(run, status)
    shutdown(run.dist)  # the other ranks wait here while rank 0 validates and saves
    return RunResult(status, cfg.out, run.progress, run.progress.best_val)
