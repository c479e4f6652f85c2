"""`clipsearch duplicates`: groups of near-identical images in a bundle (bursts, copies, re-encodes)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer

from clipsearch.commands.app import app, setup_logging, user_errors
from indexer.core.errors import ClipsearchError


@app.command("duplicates")
def duplicates_command(
    bundles: Annotated[Path, typer.Option("--bundles", help="Bundles dir (its CURRENT bundle is read).")],
    threshold: Annotated[
        float, typer.Option(help="Cosine similarity at which two images count as near-duplicates (0-1].")
    ] = 0.95,
    version: Annotated[str | None, typer.Option(help="A bundle version instead of CURRENT.")] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help='Print {"groups": [[{"id", "path", "score"}, ...], ...]}.')
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging and tracebacks.")] = False,
) -> None:
    """List groups of near-identical images (FAISS range search), largest first."""
    setup_logging(verbose)
    with user_errors(verbose):
        from indexer.core.bundle.duplicates import duplicate_groups
        from indexer.core.bundle.read import open_bundle

        if not 0 < threshold <= 1:
            raise ClipsearchError(f"--threshold must be in (0, 1], got {threshold}")
        if not bundles.is_dir():
            raise ClipsearchError(f"--bundles {bundles} is not a directory")
        bundle = open_bundle(bundles, version)
        try:
            groups = duplicate_groups(bundle, threshold)
        finally:
            bundle.close()
    if json_out:
        typer.echo(json.dumps({"groups": [[asdict(m) for m in g] for g in groups]}))
        return
    if not groups:
        typer.echo(f"no near-duplicates at threshold {threshold}")
    for n, group in enumerate(groups, start=1):
        typer.echo(f"group {n}: {len(group)} images")
        for m in group:
            typer.echo(f"  {m.score:.4f}  {m.id:>8}  {m.path}")
    extra = sum(len(g) - 1 for g in groups)
    typer.echo(f"{len(groups)} groups, {extra} images that duplicate another", err=True)
