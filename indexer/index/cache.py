"""Indexer-private state under `BUNDLES/.work/`: the embedding cache and the file-signature table.

Why SQLite and not `.npy` shards: every batch is committed as one transaction, so a run killed with
`kill -9` loses at most the batch in flight and the next run resumes from the last commit; lookups are
by content hash (renames and duplicates reuse vectors without scanning shards); and `PRAGMA
quick_check` plus a per-row length check detect a damaged file, which is then rebuilt rather than
mixed. A 512-d float32 vector is a 2 KiB blob, well inside what SQLite stores efficiently.

One cache file per model fingerprint, so vectors of two models can never be mixed; the file's `meta`
table repeats the fingerprint and the dimension and both are checked on open.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.core.bundle.layout import WORK_DIR
from indexer.core.errors import ClipsearchError
from indexer.core.images import PhotoFacts
from indexer.index.stages import reached

log = logging.getLogger(__name__)

CACHE_DIR = "cache"
FILES_DB = "files.sqlite"
CACHE_FORMAT = "1"
MODEL_KEY_PREFIX = "model:"  # rows that remember a model weights file's sha256 (its fingerprint)
_CHUNK = 500  # ids per `IN (...)` query; SQLite's default variable limit is 999 on old builds

_CACHE_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vectors (
    kind TEXT NOT NULL, sha256 TEXT NOT NULL, vec BLOB NOT NULL, width INTEGER, height INTEGER,
    taken_at REAL, camera TEXT, facts INTEGER, PRIMARY KEY (kind, sha256)
) WITHOUT ROWID;
"""
# Columns added after format 1, added in place to an older file (its vectors stay valid); `facts` is 1
# once the image's EXIF was read (NULL: a row written before, whose facts are read when next needed).
_ADDED_COLUMNS = {"taken_at": "REAL", "camera": "TEXT", "facts": "INTEGER"}


@dataclass(frozen=True)
class ImageFacts:
    """What the cache records about an image beside its vector."""

    width: int | None = None
    height: int | None = None
    photo: PhotoFacts | None = None  # None: not read yet (a row from before facts were kept)


class CacheCorrupt(ClipsearchError, RuntimeError):
    """The embedding cache holds data that cannot be trusted."""


def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path)
    # WAL + NORMAL: a committed batch survives a killed process; only power loss may drop the last one.
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    return conn


def _chunks(seq: Sequence[str], n: int = _CHUNK) -> Iterator[Sequence[str]]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]


class EmbeddingCache:
    """Vectors keyed by (kind, content sha256) for one model fingerprint; written one batch at a time."""

    def __init__(
        self, bundles_dir: Path, fingerprint: str, dim: int, fresh: bool = False, variant: str = ""
    ) -> None:
        """`variant` names a numerics change (e.g. `int8`) whose vectors must not mix with plain ones."""
        name = fingerprint[:32] + (f"-{variant}" if variant else "")
        self.path = Path(bundles_dir) / WORK_DIR / CACHE_DIR / f"{name}.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fingerprint, self.dim, self.variant = fingerprint, dim, variant
        self.rebuilt: str | None = None
        if fresh:
            self._remove()
        problem = self._problem() if self.path.exists() else None
        if problem:
            log.warning("embedding cache %s %s; rebuilding it", self.path.name, problem)
            self.rebuilt = problem
            self._remove()
        self._conn = _connect(self.path)
        self._conn.executescript(_CACHE_SCHEMA)
        have = {r[1] for r in self._conn.execute("PRAGMA table_info(vectors)")}
        for column, sql_type in _ADDED_COLUMNS.items():
            if column not in have:
                self._conn.execute(f"ALTER TABLE vectors ADD COLUMN {column} {sql_type}")
        meta = {"format": CACHE_FORMAT, "fingerprint": fingerprint, "dim": str(dim), "variant": variant}
        self._conn.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", meta.items())
        self._conn.commit()

    def _remove(self) -> None:
        remove_work_file(self.path)

    def _problem(self) -> str | None:
        """Why the existing file cannot be used, or None if it can."""
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
            try:
                if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                    return "fails SQLite's integrity check"
                meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
                same = (meta.get("fingerprint"), meta.get("variant", "")) == (self.fingerprint, self.variant)
                if not same or meta.get("format") != CACHE_FORMAT:
                    return "belongs to another model or format"
                if meta.get("dim") != str(self.dim):
                    return f"holds {meta.get('dim')}-d vectors but the model embeds to {self.dim}"
                sql = "SELECT COUNT(*) FROM vectors WHERE length(vec) != ?"
                if conn.execute(sql, (self.dim * 4,)).fetchone()[0]:
                    return "has vectors of the wrong length"
            finally:
                conn.close()
        except sqlite3.DatabaseError as e:
            return f"is unreadable ({e})"
        return None

    def close(self) -> None:
        self._conn.close()

    def reopen(self) -> EmbeddingCache:
        """The same cache on a new connection, for another thread (it was checked when this one opened)."""
        other = object.__new__(EmbeddingCache)
        other.__dict__.update({k: v for k, v in self.__dict__.items() if k != "_conn"})
        other._conn = _connect(self.path)
        return other

    def known(self, kind: str, shas: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for part in _chunks(list(shas)):
            sql = f"SELECT sha256 FROM vectors WHERE kind = ? AND sha256 IN ({','.join('?' * len(part))})"
            found.update(r[0] for r in self._conn.execute(sql, (kind, *part)))
        return found

    def put(
        self,
        kind: str,
        rows: Iterable[tuple[str, np.ndarray, int | None, int | None]],
        facts: Sequence[PhotoFacts] | None = None,
    ) -> None:
        """Store one batch of vectors in one transaction (so a kill never leaves half a batch).

        `facts`: each image row's EXIF facts, in row order (None for texts)."""
        data = [
            (kind, sha, np.ascontiguousarray(v, np.float32).tobytes(), w, h)
            + (
                (f.taken_at, f.camera, 1)
                if (f := facts[n] if facts else None) is not None
                else (None, None, None)
            )
            for n, (sha, v, w, h) in enumerate(rows)
        ]
        with self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO vectors VALUES (?, ?, ?, ?, ?, ?, ?, ?)", data)
            reached("cache-write", self.path.parent.parent)

    def sizes(self, kind: str, shas: Sequence[str]) -> dict[str, ImageFacts]:
        """Width, height and EXIF facts recorded with each vector, without reading the vectors."""
        out: dict[str, ImageFacts] = {}
        for part in _chunks(list(dict.fromkeys(shas))):
            marks = ",".join("?" * len(part))
            sql = (
                "SELECT sha256, width, height, taken_at, camera, facts FROM vectors"
                f" WHERE kind = ? AND sha256 IN ({marks})"
            )
            out.update(
                (sha, ImageFacts(w, h, PhotoFacts(t, c) if read else None))
                for sha, w, h, t, c, read in self._conn.execute(sql, (kind, *part))
            )
        return out

    def put_facts(self, rows: Iterable[tuple[str, PhotoFacts]]) -> None:
        """Record EXIF facts of images whose vectors were cached before facts were kept."""
        data = [(f.taken_at, f.camera, sha) for sha, f in rows]
        with self._conn:
            self._conn.executemany(
                "UPDATE vectors SET taken_at = ?, camera = ?, facts = 1 WHERE kind = 'image' AND sha256 = ?",
                data,
            )

    def blocks(self, kind: str, shas: Sequence[str], block: int = 4096) -> Iterator[np.ndarray]:
        """(<=block, dim) float32 arrays of the vectors of `shas`, in that order (FAISS-style streaming)."""
        for i in range(0, len(shas), block):
            part = shas[i : i + block]
            blobs = self._blobs(kind, part)
            missing = [s for s in part if s not in blobs]
            if missing:
                raise CacheCorrupt(f"{self.path} lost the vector of {missing[0][:12]}; rerun to re-embed")
            yield self._decode([blobs[s] for s in part])

    def _blobs(self, kind: str, shas: Sequence[str]) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for part in _chunks(list(dict.fromkeys(shas))):
            marks = ",".join("?" * len(part))
            sql = f"SELECT sha256, vec FROM vectors WHERE kind = ? AND sha256 IN ({marks})"
            out.update(self._conn.execute(sql, (kind, *part)))
        return out

    def _decode(self, blobs: Sequence[bytes]) -> np.ndarray:
        """(len(blobs), dim) float32 in one piece; a wrong length or a non-finite value means damage."""
        damaged = CacheCorrupt(f"{self.path} holds a damaged vector; rerun with --full to rebuild it")
        if any(len(b) != self.dim * 4 for b in blobs):
            raise damaged
        vecs = np.frombuffer(bytearray().join(blobs), dtype=np.float32).reshape(len(blobs), self.dim)
        if not np.isfinite(vecs).all():
            raise damaged
        return vecs

    def prune(self, keep: dict[str, set[str]]) -> int:
        """Delete vectors whose (kind, sha) is not in `keep`; returns how many went."""
        gone = 0
        with self._conn:
            for kind, sha in self._conn.execute("SELECT kind, sha256 FROM vectors").fetchall():
                if sha not in keep.get(kind, set()):
                    self._conn.execute("DELETE FROM vectors WHERE kind = ? AND sha256 = ?", (kind, sha))
                    gone += 1
        return gone


def cache_files(bundles_dir: Path) -> list[Path]:
    return sorted((Path(bundles_dir) / WORK_DIR / CACHE_DIR).glob("*.sqlite"))


def cache_dim(path: Path) -> int | None:
    """The vector dimension a cache file records, or None when it cannot be read."""
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()
        finally:
            conn.close()
        return int(row[0]) if row else None
    except (sqlite3.DatabaseError, ValueError):
        return None


@dataclass(frozen=True)
class FileState:
    """What a file looked like when it was last hashed.

    `size`/`mtime_ns` are the stat signature (of the shard, for a member of a WebDataset tar);
    `nbytes` is the size of the image bytes themselves.
    """

    size: int
    mtime_ns: int
    sha256: str
    nbytes: int


class FileStates:
    """`key -> FileState` from earlier runs: files whose signature is unchanged are not read again.

    Only a hint: a damaged table is dropped and every file is hashed again.
    """

    def __init__(self, bundles_dir: Path) -> None:
        self.path = Path(bundles_dir) / WORK_DIR / FILES_DB
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._conn = self._open()
        except sqlite3.DatabaseError as e:
            log.warning("%s is unreadable (%s); hashing every file again", self.path, e)
            remove_work_file(self.path)
            self._conn = self._open()

    def _open(self) -> sqlite3.Connection:
        conn = _connect(self.path)
        conn.execute(
            "CREATE TABLE IF NOT EXISTS files (key TEXT PRIMARY KEY, size INTEGER, mtime_ns INTEGER,"
            " sha256 TEXT, nbytes INTEGER) WITHOUT ROWID"
        )
        conn.execute("SELECT COUNT(*) FROM files").fetchone()
        return conn

    def load(self) -> dict[str, FileState]:
        rows = self._conn.execute("SELECT key, size, mtime_ns, sha256, nbytes FROM files")
        return {k: FileState(s, m, h, n) for k, s, m, h, n in rows}

    def get(self, key: str) -> FileState | None:
        sql = "SELECT size, mtime_ns, sha256, nbytes FROM files WHERE key = ?"
        row = self._conn.execute(sql, (key,)).fetchone()
        return FileState(*row) if row else None

    def put(self, rows: Iterable[tuple[str, FileState]]) -> None:
        data = [(k, f.size, f.mtime_ns, f.sha256, f.nbytes) for k, f in rows]
        with self._conn:
            self._conn.executemany("INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?)", data)

    def load_keys(self, keys: Iterable[str]) -> dict[str, FileState]:
        """The rows of `keys` only (a watcher's batch: cost in proportion to it, not to the collection)."""
        out: dict[str, FileState] = {}
        for part in _chunks(list(keys)):
            marks = ",".join("?" * len(part))
            sql = f"SELECT key, size, mtime_ns, sha256, nbytes FROM files WHERE key IN ({marks})"
            out.update((k, FileState(s, m, h, n)) for k, s, m, h, n in self._conn.execute(sql, part))
        return out

    def forget(self, keys: Iterable[str]) -> None:
        """Drop the rows of files that are gone."""
        with self._conn:
            self._conn.executemany("DELETE FROM files WHERE key = ?", ((k,) for k in keys))

    def retain(self, keys: set[str]) -> None:
        """Forget files no longer in the source (keeps the table the size of the collection)."""
        rows = self._conn.execute("SELECT key FROM files")
        old = [k for (k,) in rows if k not in keys and not k.startswith(MODEL_KEY_PREFIX)]
        with self._conn:
            self._conn.executemany("DELETE FROM files WHERE key = ?", ((k,) for k in old))

    def close(self) -> None:
        self._conn.close()


def remove_work_file(path: Path) -> None:
    """Delete a SQLite file with its WAL side files."""
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
