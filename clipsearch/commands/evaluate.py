"""`clipsearch eval`: retrieval metrics of a saved model on an image–caption source, and zero-shot
classification accuracy when its images have class labels."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from clipsearch.commands.app import (
    CaptionColumnOption,
    DeviceOption,
    ImageColumnOption,
    app,
    setup_logging,
    user_errors,
)
from indexer.data.sources import (
    DEFAULT_CAPTION_COLUMN,
    DEFAULT_IMAGE_COLUMN,
    DEFAULT_LABEL_COLUMN,
    SourceSpec,
)

if TYPE_CHECKING:
    from indexer.eval.runner import EvalReport


@app.command("eval")
def eval_command(
    model: Annotated[Path, typer.Option(help="Model dir (open_clip local-dir layout), e.g. RUN_DIR/model.")],
    data: Annotated[
        str, typer.Option(help="Image–caption data: CSV/TSV, JSONL, image folder or .tar shards.")
    ],
    json_out: Annotated[
        bool, typer.Option("--json", help="Print exactly one JSON object on stdout.")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Images or texts per forward pass.")] = 256,
    device: DeviceOption = "auto",
    image_column: ImageColumnOption = DEFAULT_IMAGE_COLUMN,
    caption_column: CaptionColumnOption = DEFAULT_CAPTION_COLUMN,
    label_column: Annotated[
        str,
        typer.Option(help="Class-label column of CSV/TSV/JSONL; when present, zero-shot accuracy too."),
    ] = DEFAULT_LABEL_COLUMN,
    classes: Annotated[
        str | None,
        typer.Option(
            help="Zero-shot classes: a file with one name per line, or a,b,c. Labels are names or indices "
            "into them. Default: the labels found in the data."
        ),
    ] = None,
    prompts: Annotated[
        str,
        typer.Option(
            help="Zero-shot prompts: simple (CLIP's 7 best ImageNet templates), openai (its 80), name (the "
            "class name alone), or a file with one template per line with {} for the class."
        ),
    ] = "simple",
) -> None:
    """Text→image and image→text R@1/5/10 and median rank (captions shared by images count for each), and
    zero-shot top-1/top-5 accuracy over prompted class names when the images have labels."""
    from indexer.eval.runner import EvalConfig, evaluate_report
    from indexer.eval.zeroshot import read_classes

    setup_logging()
    with user_errors():
        cfg = EvalConfig(
            model,
            SourceSpec(data, image_column, caption_column, label_column),
            batch_size=batch_size,
            device=device,
            classes=read_classes(classes) if classes is not None else None,
            prompts=prompts,
        )
        report = evaluate_report(cfg)
    typer.echo(json.dumps(report.as_dict()) if json_out else _table(report))


def _table(report: EvalReport) -> str:
    lines = []
    if (metrics := report.retrieval) is not None:
        lines += [
            f"{metrics.n} image-caption pairs",
            f"{'':14} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'median rank':>12}",
        ]
        for m, label in ((metrics.text_to_image, "text->image"), (metrics.image_to_text, "image->text")):
            lines.append(f"{label:14} {m.r_at_1:6.3f} {m.r_at_5:6.3f} {m.r_at_10:6.3f} {m.median_rank:12.1f}")
    if (z := report.zero_shot) is not None:
        lines.append(
            f"zero-shot: {z.n} labelled images, {z.classes} classes, prompts {z.prompts}: "
            f"top-1 {z.top1:.3f}, top-5 {z.top5:.3f}"
        )
    return "\n".join(lines)
