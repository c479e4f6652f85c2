"""The Typer app every subcommand registers on, and the one-line error convention they share."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer

from indexer.core.errors import ClipsearchError

# Options several subcommands share, declared once so their names and help stay the same everywhere.
DeviceOption = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
ImageColumnOption = Annotated[str, typer.Option(help="Image column of CSV/TSV/JSONL sources.")]
CaptionColumnOption = Annotated[str, typer.Option(help="Caption column of CSV/TSV/JSONL sources.")]

app = typer.Typer(
    name="clipsearch",
    help="Train a CLIP-style dual encoder, index images and texts with FAISS, and serve search over HTTP.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def _main() -> None:
    """Train a CLIP-style dual encoder, index images and texts with FAISS, and serve search over HTTP."""
    # An explicit group callback keeps `clipsearch SUBCOMMAND` a group even while only one
    # subcommand is registered (Typer would otherwise make that command the whole app).


@contextmanager
def user_errors() -> Iterator[None]:
    """Turn errors a user can fix into `error: ...` on stderr and exit status 1 (no traceback)."""
    try:
        yield
    except ClipsearchError as e:
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from None
    except OSError as e:  # disk full, permission denied, missing file: the OS message is the clearest
        typer.secho(f"error: {e}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from None


def warn(message: str) -> None:
    """`warning: ...` on stderr: the command goes on, but the user should fix something."""
    typer.secho(f"warning: {message}", err=True, fg=typer.colors.YELLOW)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # open_clip logs a warning for every randomly initialised model; that is our normal case.
    logging.getLogger("root").setLevel(logging.ERROR if not verbose else logging.DEBUG)
    if not verbose:
        # Loading a sentence-transformers checkpoint into a bare BERT prints a "LOAD REPORT" table and a
        # progress bar about its unused pooler head; the tower never uses that head.
        try:
            from transformers.utils import logging as hf_logging
        except ImportError:
            return
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
