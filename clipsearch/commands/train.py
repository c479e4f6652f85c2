"""`clipsearch train`: parse options into a TrainConfig and run `indexer.train.loop.train`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from clipsearch.commands.app import (
    CaptionColumnOption,
    DeviceOption,
    ImageColumnOption,
    app,
    setup_logging,
    user_errors,
)
from indexer.data.sources import DEFAULT_CAPTION_COLUMN, DEFAULT_IMAGE_COLUMN, SourceSpec
from indexer.train.config import ModelSpec, OptimConfig, TrainConfig

_D = OptimConfig()


def _source(src: str | None, image_column: str, caption_column: str) -> SourceSpec | None:
    return SourceSpec(src, image_column, caption_column) if src else None


@app.command()
def train(
    train: Annotated[
        str | None, typer.Option(help="Training data: CSV/TSV, JSONL, image folder or .tar shards.")
    ] = None,
    val: Annotated[
        str | None, typer.Option(help="Validation data (same forms); picks the best checkpoint.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run directory to create (model/, metrics, checkpoint).")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="Continue the run in this directory with its own config.")
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="Shipped config (small), open_clip name, JSON config or model dir; default: small."
        ),
    ] = None,
    pretrained: Annotated[
        str | None,
        typer.Option(help="open_clip tag, checkpoint file, or model dir of an earlier run (fine-tune)."),
    ] = None,
    lock_image: Annotated[
        bool | None,
        typer.Option(
            "--lock-image/--no-lock-image",
            help="Freeze the image tower (LiT). Default: frozen when the config starts it from pretrained "
            "weights (small-pt), trained otherwise.",
            show_default=False,
        ),
    ] = None,
    lock_text: Annotated[
        bool | None,
        typer.Option(
            "--lock-text/--no-lock-text",
            help="Freeze the text tower. Default: frozen when it is a pretrained language model "
            "(a Hugging Face tower, as in `small`), trained otherwise.",
            show_default=False,
        ),
    ] = None,
    unlocked_layers: Annotated[
        int, typer.Option(help="With a lock: leave the last N layers/groups trainable.")
    ] = 0,
    unlocked_text_layers: Annotated[
        int | None,
        typer.Option(
            help="The text tower's own --unlocked-layers (the image tower keeps --unlocked-layers)."
        ),
    ] = None,
    loss: Annotated[str, typer.Option(help="clip (symmetric InfoNCE) or siglip (sigmoid).")] = "clip",
    epochs: Annotated[
        int | None, typer.Option(help="Passes over the data (10 when no --time-budget is given).")
    ] = None,
    time_budget: Annotated[
        float | None, typer.Option(help="Train for this many minutes; the schedule fits the budget.")
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Pairs per micro-batch.")] = _D.batch_size,
    accum_steps: Annotated[
        int, typer.Option(help="Micro-batches per step; the loss sees them all at once.")
    ] = 1,
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = _D.lr,
    weight_decay: Annotated[
        float, typer.Option(help="AdamW weight decay (not on norms, biases, embeddings, logit_scale).")
    ] = _D.weight_decay,
    warmup: Annotated[
        float, typer.Option(help="Fraction of the run spent on linear warmup before the cosine decay.")
    ] = _D.warmup,
    grad_clip: Annotated[
        float, typer.Option(help="Clip the gradients' global L2 norm to this; 0 disables.")
    ] = _D.grad_clip,
    precision: Annotated[
        str,
        typer.Option(
            help="auto, bf16, fp16 or fp32 (open_clip_train's amp_bf16/amp too); auto = bf16 autocast on "
            "a GPU that supports it, else fp16, and fp32 on the CPU."
        ),
    ] = "auto",
    device: DeviceOption = "auto",
    seed: Annotated[int, typer.Option(help="Seed for initialisation, batch order and augmentation.")] = 0,
    image_column: ImageColumnOption = DEFAULT_IMAGE_COLUMN,
    caption_column: CaptionColumnOption = DEFAULT_CAPTION_COLUMN,
    crop_scale: Annotated[
        float, typer.Option(help="Random-crop augmentation: crop side as a fraction; 1 disables.")
    ] = 1.0,
    workers: Annotated[
        int | None, typer.Option(help="Image decoding processes (default: min(4, CPUs)).")
    ] = None,
    log_every: Annotated[int, typer.Option(help="Write a metrics.jsonl line every N steps.")] = 10,
    checkpoint_every: Annotated[float, typer.Option(help="Minutes between resumable checkpoints.")] = 5.0,
    progress: Annotated[bool, typer.Option(help="Show a progress bar with samples/s and ETA.")] = True,
    nproc: Annotated[
        int,
        typer.Option(
            help="Train with DDP in N processes here (one per GPU; gloo on CPU), launched as torchrun "
            "would; --batch-size is per process."
        ),
    ] = 1,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logging, and the traceback with an error.")
    ] = False,
) -> None:
    """Train (or fine-tune) a dual encoder with a contrastive loss; writes RUN_DIR/model and curves."""
    from indexer.train import loop as training
    from indexer.train.config import ConfigError, load_run_config

    setup_logging(verbose)
    with user_errors(verbose):
        if nproc != 1:
            _launch(nproc)
            return
        if resume is not None:
            cfg = load_run_config(resume)
            cfg = TrainConfig(**{**cfg.__dict__, "out": resume, "progress": progress})
        else:
            if train is None or out is None:
                raise ConfigError("give --train and --out (or --resume RUN_DIR)")
            cfg = TrainConfig(
                out=out,
                train=SourceSpec(train, image_column, caption_column),
                val=_source(val, image_column, caption_column),
                model=ModelSpec(
                    model, pretrained, lock_image, lock_text, unlocked_layers, unlocked_text_layers
                ),
                optim=OptimConfig(
                    lr=lr,
                    weight_decay=weight_decay,
                    warmup=warmup,
                    grad_clip=grad_clip,
                    batch_size=batch_size,
                    accum_steps=accum_steps,
                ),
                loss=loss,
                epochs=epochs,
                time_budget_min=time_budget,
                precision=precision,
                device=device,
                seed=seed,
                crop_scale=crop_scale,
                workers=workers,
                log_every=log_every,
                checkpoint_every_min=checkpoint_every,
                progress=progress,
            )
        result = training.train(cfg, resume=resume is not None)
    _report(result)


def _launch(nproc: int) -> None:
    """`--nproc N`: this same command line, without --nproc, in N processes under torch's launcher."""
    from indexer.train.config import ConfigError
    from indexer.train.distributed import launch, launched_world_size

    if nproc < 1:
        raise ConfigError(f"--nproc must be at least 1, got {nproc}")
    if launched_world_size() > 1:
        raise ConfigError("--nproc launches processes itself; under torchrun leave it out")
    launch(nproc, _without_nproc(sys.argv[1:]))


def _without_nproc(args: list[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _report(result: object) -> None:
    from indexer.train.distributed import launched_world_size
    from indexer.train.loop import RunResult

    assert isinstance(result, RunResult)
    if launched_world_size() > 1 and os.environ.get("RANK", "0") != "0":
        return  # rank 0 reports for the run
    p = result.progress
    if result.status == "interrupted":
        typer.echo(
            f"interrupted at step {p.step}; checkpoint saved. Continue with: "
            f"clipsearch train --resume {result.run_dir}",
            err=True,
        )
        raise typer.Exit(130)
    why = "time budget spent" if result.status == "time_budget" else "finished"
    typer.echo(
        f"{why} after {p.step} steps ({p.epoch} epochs, {p.elapsed_s:.0f} s); "
        f"model: {result.run_dir / 'model'}"
    )
    if result.best_val:
        t2i, i2t = result.best_val.text_to_image, result.best_val.image_to_text
        typer.echo(
            f"best val (step {p.best_step}): text->image R@1 {t2i.r_at_1:.3f} R@10 {t2i.r_at_10:.3f}; "
            f"image->text R@1 {i2t.r_at_1:.3f} R@10 {i2t.r_at_10:.3f}"
        )
