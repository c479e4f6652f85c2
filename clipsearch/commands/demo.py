"""`clipsearch demo`: the whole flow offline — emoji data, training, indexing, serving."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from clipsearch.commands.app import DeviceOption, app, user_errors


def _say(message: str) -> None:
    typer.secho(f"demo: {message}", fg=typer.colors.CYAN, err=True)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where data, the training run and bundles go.")] = Path(
        "demo-work"
    ),
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to serve on.")] = 8000,
    host: Annotated[str, typer.Option(help="Address to serve on.")] = "127.0.0.1",
    serve: Annotated[bool, typer.Option("--serve/--no-serve", help="Serve when the bundle is ready.")] = True,
    time_budget: Annotated[
        float, typer.Option(min=0.05, help="Training budget in minutes (a few minutes on 2 CPU cores).")
    ] = 3.0,
    model: Annotated[
        str, typer.Option(help="Architecture to train (see `clipsearch train --model`).")
    ] = "small",
    device: DeviceOption = "auto",
    font: Annotated[Path | None, typer.Option(help="A colour emoji font (default: Debian's Noto).")] = None,
    limit: Annotated[
        int | None, typer.Option(min=8, help="Use only the first N emoji (quick checks).")
    ] = None,
    images: Annotated[
        Path | None,
        typer.Option(
            help="Index this folder of your own images (recursive, incremental) with the demo's model "
            "instead of the emoji set; an empty folder means the emoji set."
        ),
    ] = None,
) -> None:
    """Build the emoji data set, train a small model, index it and serve it; finished stages are skipped."""
    from clipsearch.demo import DemoConfig, prepare, serve_argv

    cfg = DemoConfig(
        workdir=workdir,
        host=host,
        port=port,
        serve=serve,
        time_budget_minutes=time_budget,
        model=model,
        device=device,
        font=font,
        limit=limit,
        images=images,
    )
    with user_errors():
        version = prepare(cfg, say=_say)
    _say(f"bundle {version} is ready in {cfg.bundles_dir}")
    if not serve:
        return
    _say(f"serving on {cfg.url}  (search page: {cfg.url}/ , API docs: {cfg.url}/docs; Ctrl-C stops)")
    argv = serve_argv(cfg)
    os.execv(argv[0], argv)
