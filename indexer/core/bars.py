"""Progress bars that suit where they are written: live on a terminal, a line every 30 s in a log.

tqdm redraws up to ten times a second; on a terminal that is one line, but written to a file or a
container's log (no terminal) every redraw is kept, and an hour's indexing leaves tens of thousands of
`\\r` fragments. Every bar in clipsearch comes from here.
"""

from __future__ import annotations

import sys
from typing import IO, Any

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


def _is_terminal(stream: IO[str]) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or replaced stream
        return False


def progress_bar(**kwargs: Any) -> tqdm:
    """A tqdm bar on stderr (or `file=`); away from a terminal it redraws at most every 30 s."""
    stream: IO[str] = kwargs.setdefault("file", sys.stderr) or sys.stderr
    if not _is_terminal(stream):
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("maxinterval", LOG_INTERVAL_S)
    return tqdm(**kwargs)
