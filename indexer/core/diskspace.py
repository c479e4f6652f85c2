"""A full disk as one clear error: which filesystem, how much was free, how much the work needed.

A full disk shows up as `OSError(ENOSPC)` from Python, `sqlite3.OperationalError` (`SQLITE_FULL`) from
SQLite and a `RuntimeError` ending in "(No space left on device)" from FAISS; `is_disk_full` knows all
three, and `on_disk_full` turns any of them into a `DiskFullError` that names the place being written.
"""

from __future__ import annotations

import errno
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from indexer.core.errors import ClipsearchError

_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_FULL_TEXT = (os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT), "database or disk is full")


class DiskFullError(ClipsearchError, OSError):
    """The disk (or quota) holding a path ran out of space; the message says where and how much."""


def is_disk_full(exc: BaseException) -> bool:
    """True for the ways Python, SQLite and FAISS report a full disk or an exceeded quota."""
    if isinstance(exc, DiskFullError):
        return True
    if isinstance(exc, OSError) and exc.errno in _FULL_ERRNOS:
        return True
    if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
        return True
    return isinstance(exc, sqlite3.Error | RuntimeError) and any(t in str(exc) for t in _FULL_TEXT)


def _existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def filesystem(path: Path) -> tuple[str, str]:
    """(mount point, filesystem type) holding `path`, from /proc/self/mounts where there is one."""
    here = os.path.realpath(_existing(path))
    best, kind = "/", "unknown"
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1].replace("\\040", " ")
                inside = here == mount or here.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, parts[2]
    except OSError:  # not Linux: the path's own top folder is the best we can say
        return str(_existing(path)), "unknown"
    return best, kind


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the filesystem holding `path`."""
    return shutil.disk_usage(_existing(path)).free


def human(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def describe(path: Path, what: str, needed: int | None = None, free_at_start: int | None = None) -> str:
    """One line: the filesystem of `path` is full while doing `what`; how much was needed and free."""
    mount, kind = filesystem(path)
    line = f"no space left on {mount} ({kind}, {human(free_bytes(path))} free) while {what} ({path})"
    if needed is not None:
        line += f"; this run needs about {human(needed)}"
        if free_at_start is not None:
            line += f" and {human(free_at_start)} was free when it started"
    return line + "; free some space or use a bundles dir on another disk"


def require_space(path: Path, needed: int, what: str) -> int:
    """The free bytes at `path`; `DiskFullError` at once when fewer than `needed` are free."""
    free = free_bytes(path)
    if free < needed:
        mount, kind = filesystem(path)
        raise DiskFullError(
            f"not enough space on {mount} ({kind}) for {what}: it needs about {human(needed)}, "
            f"{human(free)} is free ({path}); free some space or use a bundles dir on another disk"
        )
    return free


@contextmanager
def on_disk_full(
    path: Path, what: str, needed: int | None = None, free_at_start: int | None = None
) -> Iterator[None]:
    """Re-raise a full disk met inside the block as `DiskFullError` naming `path` and `what`."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if not is_disk_full(e):
            raise
        raise DiskFullError(describe(path, what, needed, free_at_start)) from e
