"""Entry point of the `clipsearch` console command."""

from __future__ import annotations

import os
import sys

# Before anything loads OpenMP (torch, faiss): idle OpenMP threads sleep instead of spinning. Measured on
# this project's shared 2-core machine (small model, batch 128): with the default spinning policy a busy
# neighbour made a 2-thread training step 10x slower (24 vs 267 samples/s), as each of the hundreds of
# parallel regions per step waits for a descheduled thread. An explicit OMP_WAIT_POLICY is respected.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import typer

try:  # typer >= 0.2x vendors its own click
    from typer._click.exceptions import NoArgsIsHelpError, UsageError
except ImportError:  # pragma: no cover - older typer on the real click
    from click.exceptions import NoArgsIsHelpError, UsageError  # type: ignore[no-redef]

# Importing each module registers its subcommand(s) on the shared app.
from clipsearch.commands import bundles, data, demo, duplicates, evaluate, index, model, serve, train  # noqa: F401
from clipsearch.commands.app import app, fill_optional_values


def main() -> None:
    """Run the app; a command-line usage mistake is one `error: ...` line and exit status 2."""
    try:
        code = app(args=fill_optional_values(sys.argv[1:]), standalone_mode=False)
    except NoArgsIsHelpError as e:  # a bare group: its help, as click would show it
        typer.echo(e.ctx.get_help() if e.ctx else str(e), err=True)
        sys.exit(2)
    except UsageError as e:
        names, ctx = [], e.ctx
        while ctx is not None and ctx.parent is not None:  # the subcommand path below the root
            names.insert(0, ctx.info_name or "")
            ctx = ctx.parent
        typer.echo(f"error: {e.format_message()} (see: clipsearch {' '.join([*names, '--help'])})", err=True)
        sys.exit(2)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
