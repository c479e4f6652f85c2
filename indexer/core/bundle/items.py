"""`items.sqlite`: one row per image or text, addressed by the id FAISS returns.

The columns are the fields of `Item`, spelled once: the table, the writer and the reader derive them.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Literal

ItemKind = Literal["image", "text"]


@dataclass(frozen=True)
class Item:
    """One image or text of a bundle."""

    id: int
    kind: ItemKind
    path: str | None = None
    text: str | None = None  # an image's first caption, shown with it; a text item's text
    size: int | None = None  # bytes of the image
    mtime: float | None = None  # seconds since the epoch
    sha256: str | None = None  # of the image bytes or the text
    width: int | None = None
    height: int | None = None


@dataclass(frozen=True)
class Skipped:
    """A source file that is not in the bundle, and why: one line of `skipped.jsonl`."""

    path: str
    reason: str  # a stable code: not_found, unreadable, truncated, unsupported_format, corrupt, ...
    message: str = ""


ITEM_COLUMNS = tuple(f.name for f in fields(Item))
REPLACED = "replaced"  # a delta segment's table of the ids it owns
_CHUNK = 500  # ids per `IN (...)`: SQLite's variable limit is 999 on old builds
_SQL_TYPES = {"id": "INTEGER PRIMARY KEY", "size": "INTEGER", "mtime": "REAL", "width": "INTEGER"}
_SQL_TYPES |= {"height": "INTEGER", "kind": "TEXT NOT NULL CHECK (kind IN ('image', 'text'))"}
_COLUMN_DEFS = ", ".join(f"{c} {_SQL_TYPES.get(c, 'TEXT')}" for c in ITEM_COLUMNS)
SCHEMA = f"CREATE TABLE items ({_COLUMN_DEFS});\nCREATE INDEX items_kind ON items(kind);\n"


REPLACED_SCHEMA = f"CREATE TABLE {REPLACED} (id INTEGER PRIMARY KEY);\n"


def write_items(path: Path, items: Iterable[Item], replaced: Iterable[int] | None = None) -> None:
    """Create `path` holding `items` (a new file: bundles are written once).

    `replaced`: for a delta segment, every id it owns (docs/architecture.md, "Bundle format").
    """
    conn = sqlite3.connect(path)
    try:
        conn.executescript(SCHEMA + (REPLACED_SCHEMA if replaced is not None else ""))
        marks = ", ".join("?" * len(ITEM_COLUMNS))
        conn.executemany(
            f"INSERT INTO items ({', '.join(ITEM_COLUMNS)}) VALUES ({marks})", (astuple(i) for i in items)
        )
        if replaced is not None:
            conn.executemany(f"INSERT INTO {REPLACED} (id) VALUES (?)", ((int(i),) for i in replaced))
        conn.commit()
    finally:
        conn.close()


def open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection to an immutable items file (no locks, no journal)."""
    return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)


class ItemStore:
    """Read-only, thread-safe access to a bundle's `items.sqlite`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn = open_readonly(path)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._conn.close()

    def count(self, kind: ItemKind) -> int:
        with self._lock:
            row = self._conn.execute("SELECT COUNT(*) FROM items WHERE kind = ?", (kind,)).fetchone()
        return int(row[0])

    def get(self, item_id: int) -> Item | None:
        return self.get_many([item_id]).get(item_id)

    def get_many(self, ids: Sequence[int]) -> dict[int, Item]:
        """Items by id; unknown ids are absent from the result."""
        wanted = [int(i) for i in ids if int(i) >= 0]
        if not wanted:
            return {}
        marks = ",".join("?" * len(wanted))
        sql = f"SELECT {', '.join(ITEM_COLUMNS)} FROM items WHERE id IN ({marks})"
        with self._lock:
            rows = self._conn.execute(sql, wanted).fetchall()
        return {int(r[0]): Item(*r) for r in rows}

    def kinds(self, ids: Sequence[int]) -> dict[int, ItemKind]:
        """The kind of each of `ids` that has a row (by primary key: cost in proportion to `ids`)."""
        out: dict[int, ItemKind] = {}
        wanted = [int(i) for i in ids]
        for start in range(0, len(wanted), _CHUNK):
            part = wanted[start : start + _CHUNK]
            sql = f"SELECT id, kind FROM items WHERE id IN ({','.join('?' * len(part))})"
            with self._lock:
                out.update((int(i), k) for i, k in self._conn.execute(sql, part))
        return out

    def replaced(self) -> list[int]:
        """The ids a delta segment owns (its `replaced` table); empty for a base."""
        with self._lock:
            has = self._conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (REPLACED,)
            ).fetchone()
            rows = self._conn.execute(f"SELECT id FROM {REPLACED}").fetchall() if has else []
        return [int(r[0]) for r in rows]

    def image_paths(self) -> list[str]:
        """The path of every image item (lighter than `all` for a large collection)."""
        with self._lock:
            rows = self._conn.execute("SELECT path FROM items WHERE kind = 'image' AND path IS NOT NULL")
            return [r[0] for r in rows]

    def all(self, kind: ItemKind | None = None) -> list[Item]:
        """Every item (of `kind`), by id."""
        sql = f"SELECT {', '.join(ITEM_COLUMNS)} FROM items"
        args: tuple[str, ...] = ()
        if kind is not None:
            sql, args = sql + " WHERE kind = ?", (kind,)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY id", args).fetchall()
        return [Item(*r) for r in rows]
