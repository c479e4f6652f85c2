"""`clipsearch bundles list|verify|gc`: see, check and prune the bundles in a bundles dir."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from clipsearch.commands.app import app, setup_logging, user_errors
from indexer.core.errors import ClipsearchError

bundles_app = typer.Typer(
    help="See, check (checksums, counts, dimensions) and prune bundles.", no_args_is_help=True
)
app.add_typer(bundles_app, name="bundles")

BundlesOpt = Annotated[Path, typer.Option("--bundles", help="Bundles dir (holds CURRENT and the bundles).")]


def _existing(bundles: Path) -> Path:
    if not bundles.is_dir():
        raise ClipsearchError(f"--bundles {bundles} is not a directory")
    return bundles


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


@bundles_app.command("list")
def list_command(
    bundles: BundlesOpt,
    json_out: Annotated[bool, typer.Option("--json", help="One JSON array on stdout.")] = False,
) -> None:
    """List bundles, oldest first; `*` marks CURRENT, `L` a bundle a server holds a lease on."""
    with user_errors():
        from indexer.core.bundle.inventory import current_problem, describe

        infos = describe(_existing(bundles))
        problem = current_problem(bundles)
    if problem:
        typer.secho(f"warning: {problem}", err=True, fg=typer.colors.YELLOW)
    if json_out:
        typer.echo(json.dumps([i.as_dict() for i in infos]))
        return
    if not infos:
        typer.echo(f"no bundles in {bundles}")
    for i in infos:
        d = i.as_dict()
        mark = ("*" if i.current else " ") + ("L" if i.leased else " ")
        if i.problem:
            typer.echo(f"{mark} {i.version}  BROKEN: {i.problem}")
            continue
        recall = f" recall@10={d['recall_at_10']}" if d["recall_at_10"] is not None else ""
        typer.echo(
            f"{mark} {i.version}  {d['created_at']}  {d['images']} images  {d['texts']} texts  "
            f"model={d['model']} ({str(d['fingerprint'])[:12]})  index={d['index']}{recall}  "
            f"{_human(i.size_bytes)}"
        )


@bundles_app.command("verify")
def verify_command(
    bundles: BundlesOpt,
    version: Annotated[list[str] | None, typer.Option(help="Only these bundles (repeatable).")] = None,
) -> None:
    """Open every bundle as the service would (checksums, counts, dimensions, model fingerprint); without
    --version, also check that CURRENT names one of them."""
    with user_errors():
        from indexer.core.bundle.inventory import current_problem, verify
        from indexer.core.bundle.read import list_versions

        known = list_versions(_existing(bundles))
        unknown = [v for v in version or [] if v not in known]
        if unknown:
            raise ClipsearchError(f"no bundle named {unknown[0]} in {bundles}")
        current = None if version else current_problem(bundles)
        if not known:
            raise ClipsearchError(f"no bundles in {bundles}" + (f" ({current})" if current else ""))
        results = verify(bundles, version)
    for name, problem in results.items():
        typer.echo(f"ok      {name}" if problem is None else f"FAILED  {name}: {problem}")
    if current:
        typer.echo(f"FAILED  CURRENT: {current}")
    bad = sum(p is not None for p in results.values())
    failures = [f"{bad} of {len(results)} bundles failed verification"] if bad else []
    if failures or current:
        line = "; ".join([*([current] if current else []), *failures])
        typer.secho(f"error: {line}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1)


@bundles_app.command("gc")
def gc_command(
    bundles: BundlesOpt,
    keep: Annotated[
        int, typer.Option(help="Keep this many newest bundles (CURRENT and leased always kept).")
    ] = 3,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only say what would be removed.")] = False,
    cache: Annotated[bool, typer.Option(help="Also drop cached vectors no kept bundle uses.")] = True,
) -> None:
    """Remove old bundles, leftovers of interrupted runs and unused cached embeddings."""
    setup_logging()
    with user_errors(disk=bundles):
        from indexer.core.bundle.inventory import current_problem
        from indexer.index.gc import prune, prune_cache
        from indexer.index.lock import exclusive_lock

        if keep < 1:
            raise ClipsearchError(f"--keep must be at least 1, got {keep}")
        problem = current_problem(_existing(bundles))
        if problem:  # which bundles are safe to delete depends on what CURRENT should name
            raise ClipsearchError(f"not pruning: {problem}; run clipsearch index to publish a new one")
        with exclusive_lock(_existing(bundles), "bundles gc"):
            removed = prune(bundles, keep, dry_run=dry_run)
            caches = prune_cache(bundles, dry_run=dry_run) if cache else 0
    verb = "would remove" if dry_run else "removed"
    typer.echo(f"{verb} {len(removed)} bundle(s){': ' + ', '.join(removed) if removed else ''}")
    if cache:
        typer.echo(f"{verb} {caches} unused embedding cache file(s)")
