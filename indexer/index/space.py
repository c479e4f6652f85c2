"""The disk a run needs, checked before anything is embedded, and the tidying after a failed run.

The estimate is what this run adds to the bundles dir: new cache rows, the new bundle (indexes, items,
and the model unless its files are hard-linked from the previous bundle) and the id record. Row sizes
were measured on SQLite 3 and FAISS 1.x files (docs/reliability.md); "about" is all it promises.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from indexer.core.bundle.layout import WORK_DIR
from indexer.core.diskspace import on_disk_full, require_space
from indexer.core.modeldir import model_files
from indexer.index.publish import clean_temp

log = logging.getLogger(__name__)

_WAL_ALLOWANCE = 4 * 1024 * 1024  # SQLite's WAL grows to about 1000 pages before it checkpoints
_ROW = 128  # key, sha256 and page overhead of one cache, items or ids row, past its payload
_HNSW_LINKS = 320  # bytes of graph links per vector in an HNSW32 index


def _cache_row(dim: int) -> int:
    blob = dim * 4
    return blob + _ROW if blob < 1000 else int(blob * 2.3) + _ROW  # blobs past ~1 KB take a page each


@dataclass(frozen=True)
class RunSpace:
    """How much this run needs, and how much was free when it started."""

    bundles_dir: Path
    needed: int
    free: int

    @contextmanager
    def writing(self, path: Path, what: str) -> Iterator[None]:
        """A full disk inside the block is one `DiskFullError` naming `path`, `what` and this budget."""
        with on_disk_full(path, what, self.needed, self.free):
            yield


def run_needs(
    dim: int,
    new_vectors: int,
    items: int,
    text_bytes: int,
    exact: bool,
    model_dir: Path | None,
) -> int:
    """Bytes a run adds: `new_vectors` cache rows, a bundle of `items` items (`text_bytes` of paths and
    texts, exact or graph indexes) and, when `model_dir` is given, a copy of its files."""
    cache = new_vectors * _cache_row(dim) + (min(_WAL_ALLOWANCE, new_vectors * _cache_row(dim)))
    indexes = items * (dim * 4 + 16 + (0 if exact else _HNSW_LINKS))
    rows = 2 * (items * _ROW + text_bytes)  # items.sqlite and .work/ids.sqlite
    model = sum((model_dir / name).stat().st_size for name in model_files(model_dir)) if model_dir else 0
    return cache + indexes + rows + model


def check_space(bundles_dir: Path, needed: int) -> RunSpace:
    """`RunSpace` for the run, or `DiskFullError` before any work when the disk cannot hold it."""
    free = require_space(bundles_dir, needed, "this run")
    return RunSpace(Path(bundles_dir), needed, free)


def tidy_after_failure(bundles_dir: Path) -> None:
    """Remove what a failed run leaves: `.tmp-*` dirs, `CURRENT.tmp`, and SQLite `-wal`/`-shm` files.

    A WAL holds committed rows until it is checkpointed into its database, so it is merged (which SQLite
    does when the last connection closes), never deleted; one that cannot be merged for lack of space
    stays and is merged by the next run.
    """
    for name in clean_temp(bundles_dir):
        log.info("removed %s", name)
    for wal in sorted((Path(bundles_dir) / WORK_DIR).rglob("*.sqlite-wal")):
        db = wal.with_name(wal.name.removesuffix("-wal"))
        if not db.exists():
            continue
        try:
            conn = sqlite3.connect(db)
            try:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
        except sqlite3.Error as e:
            log.info("kept %s (%s); the next run merges it", wal.name, e)
        if wal.exists():
            log.info("kept %s; the next run merges it", wal.name)
