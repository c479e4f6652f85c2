"""`clipsearch eval`: retrieval metrics of a saved model on an image–caption source."""

from __future__ import annotations

import json
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
from indexer.eval.metrics import RetrievalMetrics


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
) -> None:
    """Text→image and image→text R@1/5/10 and median rank (captions shared by images count for each)."""
    from indexer.eval.runner import EvalConfig, evaluate

    setup_logging()
    with user_errors():
        cfg = EvalConfig(
            model, SourceSpec(data, image_column, caption_column), batch_size=batch_size, device=device
        )
        metrics = evaluate(cfg)
    typer.echo(json.dumps(metrics.as_dict()) if json_out else _table(metrics))


def _table(metrics: RetrievalMetrics) -> str:
    lines = [
        f"{metrics.n} image-caption pairs",
        f"{'':14} {'R@1':>6} {'R@5':>6} {'R@10':>6} {'median rank':>12}",
    ]
    for m, label in ((metrics.text_to_image, "text->image"), (metrics.image_to_text, "image->text")):
        lines.append(f"{label:14} {m.r_at_1:6.3f} {m.r_at_5:6.3f} {m.r_at_10:6.3f} {m.median_rank:12.1f}")
    return "\n".join(lines)
