"""The indexer's exclusive lock on a bundles dir: one writer at a time, stale locks of dead processes ignored.

The lock is an `flock` on `BUNDLES/.work/lock`, so the kernel releases it when its holder dies (even by
`kill -9`) and a later run takes it over without guessing from pids. The file also records who holds
it, so a second indexer can say whom it is waiting for.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from indexer.core.bundle.layout import WORK_DIR
from indexer.core.errors import ClipsearchError

log = logging.getLogger(__name__)
LOCK_NAME = "lock"

# flock locks belong to the open file, which forked children (DataLoader workers) share: if the indexer
# were killed, an orphaned worker would keep the lock. Children close their copy at once.
_HELD: set[int] = set()


def _close_in_child() -> None:
    for fd in list(_HELD):
        with suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class LockError(ClipsearchError, RuntimeError):
    """Another live process holds the bundles dir's lock."""


def lock_path(bundles_dir: Path) -> Path:
    return Path(bundles_dir) / WORK_DIR / LOCK_NAME


def _holder(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text() or "{}")
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def exclusive_lock(bundles_dir: Path, what: str = "index") -> Iterator[Path]:
    """Hold the bundles dir's lock for the block, or raise `LockError` at once naming the holder."""
    path = lock_path(bundles_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            h = _holder(path)
            raise LockError(
                f"{path} is held by another clipsearch {h.get('what', 'process')} "
                f"(pid {h.get('pid', '?')} on {h.get('host', '?')}, since {h.get('since', '?')}); "
                "wait for it to finish"
            ) from None
        _note_stale(path)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "what": what,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        _HELD.add(fd)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
    finally:
        _HELD.discard(fd)
        os.close(fd)  # closing the descriptor releases the flock


def _note_stale(path: Path) -> None:
    """Log when the previous holder died without releasing (its record is still in the file)."""
    h = _holder(path)
    pid = h.get("pid")
    if isinstance(pid, int) and h.get("host") == socket.gethostname() and not _pid_alive(pid):
        log.warning("taking over a stale lock left by dead pid %d (%s)", pid, h.get("since", "?"))
