"""The Typer app every subcommand registers on, and the one-line error convention they share."""

from __future__ import annotations

import logging
import sqlite3
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer

from indexer.core.diskspace import describe, is_disk_full
from indexer.core.errors import ClipsearchError

try:  # typer >= 0.2x vendors its own click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer on the real click
    from click.exceptions import ClickException  # type: ignore[no-redef]

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


# Options whose value may be left out (`--ray` alone means `--ray local`): the parser has no optional
# values, so `main` fills in the implied one before parsing.
OPTIONAL_VALUES: dict[str, str] = {}


def fill_optional_values(args: list[str]) -> list[str]:
    """`args` with each `OPTIONAL_VALUES` option that has no value of its own given its implied one."""
    out: list[str] = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg in OPTIONAL_VALUES and (i + 1 == len(args) or args[i + 1].startswith("-")):
            out.append(OPTIONAL_VALUES[arg])
    return out


_VERBOSE = {"on": False}  # set by `clipsearch --verbose ...` (and a command's own -v)
_OURS = ("clipsearch", "indexer", "service")


@app.callback()
def _main(
    verbose: Annotated[
        bool, typer.Option("--verbose", help="With an error, print its traceback too; debug logging.")
    ] = False,
) -> None:
    """Train a CLIP-style dual encoder, index images and texts with FAISS, and serve search over HTTP."""
    # An explicit group callback keeps `clipsearch SUBCOMMAND` a group even while only one
    # subcommand is registered (Typer would otherwise make that command the whole app).
    _VERBOSE["on"] = verbose


def _where(exc: BaseException) -> str:
    """`path/file.py:line in function` of the innermost frame of our own code in `exc`'s traceback."""
    where = ""
    for frame in traceback.extract_tb(exc.__traceback__):
        parts = Path(frame.filename).parts
        if _OURS[0] in parts or _OURS[1] in parts or _OURS[2] in parts:
            root = max(i for i, part in enumerate(parts) if part in _OURS)
            where = f"{'/'.join(parts[root:])}:{frame.lineno} in {frame.name}"
    return where


def error_line(exc: BaseException, disk: Path | None = None) -> str:
    """One line naming what failed and where, whatever `exc` is (the text after `error: `).

    `disk` is the directory the command writes to, named when a full disk did not say where it was.
    """
    if isinstance(exc, ClipsearchError):
        line = str(exc)
    elif is_disk_full(exc):
        path = getattr(exc, "filename", None) or disk or Path.cwd()
        line = describe(Path(path), "writing")
    elif isinstance(exc, OSError):  # permission denied, missing file: the OS message is the clearest
        line = str(exc)
    else:
        kind = "SQLite error" if isinstance(exc, sqlite3.Error) else f"unexpected {type(exc).__name__}"
        where = _where(exc)
        line = (
            f"{kind}: {exc}"
            + (f" (at {where})" if where else "")
            + "; rerun with --verbose for the traceback"
        )
    return " ".join(line.split())


@contextmanager
def user_errors(verbose: bool = False, disk: Path | None = None) -> Iterator[None]:
    """Any error becomes one `error: ...` line on stderr and exit status 1; `--verbose` adds the traceback.

    A failed run's leftovers are the library's to remove (e.g. `indexer.index.space.tidy_after_failure`).
    """
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt, ClickException):
        raise
    except Exception as e:
        if verbose or _VERBOSE["on"]:
            traceback.print_exc(file=sys.stderr)
        typer.secho(f"error: {error_line(e, disk)}", err=True, fg=typer.colors.RED)
        raise typer.Exit(1) from None


def warn(message: str) -> None:
    """`warning: ...` on stderr: the command goes on, but the user should fix something."""
    typer.secho(f"warning: {message}", err=True, fg=typer.colors.YELLOW)


def setup_logging(verbose: bool = False) -> None:
    verbose = verbose or _VERBOSE["on"]
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
        # Without a network the Hub client logs every retry of a download; the one error line says it all.
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
