"""`clipsearch data`: build ready-to-train image–caption sets (today: `data emoji`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from clipsearch.commands.app import app, user_errors, warn

data_app = typer.Typer(help="Build image–caption data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("emoji")
def emoji(
    out: Annotated[Path, typer.Option(help="Folder to write images/, captions.csv, train.csv, val.csv.")],
    font: Annotated[
        Path | None,
        typer.Option(
            help="Colour emoji font (CBDT, sbix or COLR), e.g. Apple Color Emoji "
            "(default: Debian's /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf)."
        ),
    ] = None,
    size: Annotated[int, typer.Option(min=8, max=1024, help="Side of the square PNGs, in pixels.")] = 64,
    val_fraction: Annotated[
        float, typer.Option(min=0.0, max=0.9, help="Share of images held out, as whole concepts.")
    ] = 0.1,
    seed: Annotated[int, typer.Option(help="Chooses which concepts are held out.")] = 0,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Only this many concepts (with all their variants); for tests.")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Rendering processes (default: one per CPU core, at most 8).")
    ] = None,
) -> None:
    """Render every emoji of a colour font as a PNG captioned with its English name."""
    from indexer.data.emoji import (
        DEFAULT_FONT,
        RAQM_MISSING,
        EmojiDataConfig,
        build_emoji_dataset,
        text_layout,
    )
    from indexer.data.workers import default_workers

    cfg = EmojiDataConfig(
        out=out,
        font=font or DEFAULT_FONT,
        size=size,
        val_fraction=val_fraction,
        seed=seed,
        limit=limit,
        workers=workers or default_workers(main_busy=False),
    )
    if text_layout() != "raqm":
        warn(RAQM_MISSING)
    with user_errors():
        start = time.perf_counter()
        info = build_emoji_dataset(cfg)
    skipped = info.skipped.blank + info.skipped.tofu + info.skipped.unsupported
    why = "the font cannot draw them" if info.layout == "raqm" else "no raqm, see the warning"
    typer.echo(
        f"{info.images} emoji images ({skipped} of {info.catalogue} skipped: {why}) "
        f"in {time.perf_counter() - start:.1f}s; train {info.train.images} images / "
        f"{info.train.concepts} concepts, val {info.val.images} images / {info.val.concepts} concepts "
        f"-> {out}"
    )
    if info.layout != "raqm":
        warn(f"only {info.images} of {info.catalogue} emoji drawn: {RAQM_MISSING}")
