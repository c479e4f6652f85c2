"""`items.sqlite`: one row per image or text, addressed by the id FAISS returns, with its metadata.

The columns are the fields of `Item`, spelled once: the table, the writer and the reader derive them.
User fields (extra CSV/JSONL columns, sidecar `.json`) live in a second table, `fields(id, name,
value)`, one row per value (a list is several rows), typed as SQLite stores them (integer, real, text).
The file's format is its `PRAGMA user_version` (`ITEMS_FORMAT`); a file of an older format reads with
the newer columns empty.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

ItemKind = Literal["image", "text"]
FieldValue = str | int | float
UserFields = Mapping[str, FieldValue | tuple[FieldValue, ...]]
# SQLite's typeof() of a stored user field value -> the name a client sees (GET /v1/info).
_VALUE_TYPES = {"integer": "int", "real": "float", "text": "str"}


def value_type(value: FieldValue) -> str:
    """The type name of a user field value as `ItemStore.field_types` reports it (a bool is an int)."""
    return "str" if isinstance(value, str) else "float" if isinstance(value, float) else "int"


# 1: id..height; 2: folder, taken_at, camera and the `fields` table (docs/architecture.md, "Bundle format")
ITEMS_FORMAT = 2


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
    folder: str | None = None  # the folder the image lies in (its path's parent)
    taken_at: float | None = None  # EXIF capture time, seconds since the epoch (no offset in EXIF: as UTC)
    camera: str | None = None  # EXIF camera make and model
    fields: UserFields = field(default_factory=dict, hash=False)  # user fields by column name


@dataclass(frozen=True)
class Skipped:
    """A source file that is not in the bundle, and why: one line of `skipped.jsonl`."""

    path: str
    reason: str  # a stable code: not_found, unreadable, truncated, unsupported_format, corrupt, ...
    message: str = ""


def folder_of(path: str | None) -> str | None:
    """The folder an item's path lies in (`SHARD.tar::a/b.jpg` -> `SHARD.tar::a`)."""
    return os.path.dirname(path) if path else None


USER_FIELDS = "fields"
ITEM_COLUMNS = tuple(f.name for f in fields(Item) if f.name != USER_FIELDS)
BUILTIN_FIELDS = ("path", "folder", "mtime", "size", "width", "height", "taken_at", "camera")
REPLACED = "replaced"  # a delta segment's table of the ids it owns
_CHUNK = 500  # ids per `IN (...)`: SQLite's variable limit is 999 on old builds
_SQL_TYPES = {"id": "INTEGER PRIMARY KEY", "size": "INTEGER", "mtime": "REAL", "width": "INTEGER"}
_SQL_TYPES |= {"height": "INTEGER", "kind": "TEXT NOT NULL CHECK (kind IN ('image', 'text'))"}
_SQL_TYPES |= {"taken_at": "REAL"}
_COLUMN_DEFS = ", ".join(f"{c} {_SQL_TYPES.get(c, 'TEXT')}" for c in ITEM_COLUMNS)
SCHEMA = (
    f"CREATE TABLE items ({_COLUMN_DEFS});\nCREATE INDEX items_kind ON items(kind);\n"
    f"CREATE TABLE {USER_FIELDS} (id INTEGER NOT NULL, name TEXT NOT NULL, value NOT NULL);\n"
    f"CREATE INDEX fields_id ON {USER_FIELDS}(id);\nCREATE INDEX fields_name ON {USER_FIELDS}(name);\n"
    f"PRAGMA user_version = {ITEMS_FORMAT};\n"
)


REPLACED_SCHEMA = f"CREATE TABLE {REPLACED} (id INTEGER PRIMARY KEY);\n"


def _row(item: Item) -> tuple[Any, ...]:
    return tuple(getattr(item, c) for c in ITEM_COLUMNS)


def _field_rows(items: Iterable[Item]) -> Iterator[tuple[int, str, FieldValue]]:
    for item in items:
        for name, value in item.fields.items():
            for v in value if isinstance(value, tuple) else (value,):
                yield item.id, name, v


def write_items(path: Path, items: Iterable[Item], replaced: Iterable[int] | None = None) -> None:
    """Create `path` holding `items` (a new file: bundles are written once).

    `replaced`: for a delta segment, every id it owns (docs/architecture.md, "Bundle format").
    """
    items = list(items)
    conn = sqlite3.connect(path)
    try:
        conn.executescript(SCHEMA + (REPLACED_SCHEMA if replaced is not None else ""))
        marks = ", ".join("?" * len(ITEM_COLUMNS))
        conn.executemany(
            f"INSERT INTO items ({', '.join(ITEM_COLUMNS)}) VALUES ({marks})", (_row(i) for i in items)
        )
        conn.executemany(f"INSERT INTO {USER_FIELDS} (id, name, value) VALUES (?, ?, ?)", _field_rows(items))
        if replaced is not None:
            conn.executemany(f"INSERT INTO {REPLACED} (id) VALUES (?)", ((int(i),) for i in replaced))
        conn.commit()
    finally:
        conn.close()


def open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection to an immutable items file (no locks, no journal)."""
    return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)


def _collect_fields(rows: Iterable[tuple[int, str, FieldValue]]) -> dict[int, UserFields]:
    """`fields` rows -> each id's user fields; a name with several values is a tuple of them."""
    out: dict[int, dict[str, Any]] = {}
    for item_id, name, value in rows:
        mine = out.setdefault(int(item_id), {})
        if name in mine:
            old = mine[name]
            mine[name] = (*old, value) if isinstance(old, tuple) else (old, value)
        else:
            mine[name] = value
    return out  # type: ignore[return-value]


class ItemStore:
    """Read-only, thread-safe access to a bundle's `items.sqlite` (any format: missing columns read empty)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn = open_readonly(path)
        self._lock = threading.Lock()
        self._have = {r[1] for r in self._conn.execute("PRAGMA table_info(items)")}
        self._select = self._list(ITEM_COLUMNS)
        self._has_fields = self._has_table(USER_FIELDS)

    def _list(self, names: Sequence[str]) -> str:
        return ", ".join(c if c in self._have else f"NULL AS {c}" for c in names)

    def has_column(self, name: str) -> bool:
        return name in self._have

    def _has_table(self, name: str) -> bool:
        sql = "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?"
        return self._conn.execute(sql, (name,)).fetchone() is not None

    def close(self) -> None:
        self._conn.close()

    def count(self, kind: ItemKind) -> int:
        with self._lock:
            row = self._conn.execute("SELECT COUNT(*) FROM items WHERE kind = ?", (kind,)).fetchone()
        return int(row[0])

    def get(self, item_id: int) -> Item | None:
        return self.get_many([item_id]).get(item_id)

    def _items(self, rows: Sequence[Sequence[Any]], user: Mapping[int, UserFields]) -> list[Item]:
        if "folder" in self._have:
            return [
                Item(**dict(zip(ITEM_COLUMNS, r, strict=True)), fields=user.get(int(r[0]), {})) for r in rows
            ]
        items = []  # a format-1 file: the folder is the path's
        for r in rows:
            values = dict(zip(ITEM_COLUMNS, r, strict=True))
            values["folder"] = folder_of(values["path"])
            items.append(Item(**values, fields=user.get(int(r[0]), {})))
        return items

    def _fields_of(self, ids: Sequence[int]) -> dict[int, UserFields]:
        if not self._has_fields or not ids:
            return {}
        rows: list[tuple[int, str, FieldValue]] = []
        for start in range(0, len(ids), _CHUNK):
            part = ids[start : start + _CHUNK]
            sql = f"SELECT id, name, value FROM {USER_FIELDS} WHERE id IN ({','.join('?' * len(part))})"
            with self._lock:
                rows += self._conn.execute(sql + " ORDER BY rowid", part).fetchall()
        return _collect_fields(rows)

    def get_many(self, ids: Sequence[int]) -> dict[int, Item]:
        """Items by id; unknown ids are absent from the result."""
        wanted = [int(i) for i in ids if int(i) >= 0]
        if not wanted:
            return {}
        rows: list[Sequence[Any]] = []
        for start in range(0, len(wanted), _CHUNK):
            part = wanted[start : start + _CHUNK]
            sql = f"SELECT {self._select} FROM items WHERE id IN ({','.join('?' * len(part))})"
            with self._lock:
                rows += self._conn.execute(sql, part).fetchall()
        return {it.id: it for it in self._items(rows, self._fields_of([int(r[0]) for r in rows]))}

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
            has = self._has_table(REPLACED)
            rows = self._conn.execute(f"SELECT id FROM {REPLACED}").fetchall() if has else []
        return [int(r[0]) for r in rows]

    def image_paths(self) -> list[str]:
        """The path of every image item (lighter than `all` for a large collection)."""
        with self._lock:
            rows = self._conn.execute("SELECT path FROM items WHERE kind = 'image' AND path IS NOT NULL")
            return [r[0] for r in rows]

    def all(self, kind: ItemKind | None = None) -> list[Item]:
        """Every item (of `kind`), by id, with its user fields."""
        sql = f"SELECT {self._select} FROM items"
        args: tuple[str, ...] = ()
        if kind is not None:
            sql, args = sql + " WHERE kind = ?", (kind,)
        with self._lock:
            rows = self._conn.execute(sql + " ORDER BY id", args).fetchall()
            user = (
                self._conn.execute(f"SELECT id, name, value FROM {USER_FIELDS} ORDER BY rowid").fetchall()
                if self._has_fields
                else []
            )
        return self._items(rows, _collect_fields(user))

    def columns(self, kind: ItemKind, names: Sequence[str]) -> tuple[list[int], list[tuple[Any, ...]]]:
        """(ids, rows of `names`) of every item of `kind`, by id: the filters' column reader."""
        cols = self._list(["id", *names])
        with self._lock:
            rows = self._conn.execute(f"SELECT {cols} FROM items WHERE kind = ? ORDER BY id", (kind,))
            data = rows.fetchall()
        return [int(r[0]) for r in data], [tuple(r[1:]) for r in data]

    def field_values(self, kind: ItemKind, name: str) -> list[tuple[int, FieldValue]]:
        """(id, value) of every value of user field `name` on items of `kind`."""
        if not self._has_fields:
            return []
        sql = (
            f"SELECT f.id, f.value FROM {USER_FIELDS} f JOIN items i ON i.id = f.id"
            " WHERE f.name = ? AND i.kind = ?"
        )
        with self._lock:
            return [(int(i), v) for i, v in self._conn.execute(sql, (name, kind))]

    def field_types(self) -> dict[str, set[str]]:
        """Every user field name any item has, with the types of its values ("int", "float", "str")."""
        if not self._has_fields:
            return {}
        sql = f"SELECT name, typeof(value) FROM {USER_FIELDS} GROUP BY name, typeof(value)"
        out: dict[str, set[str]] = {}
        with self._lock:
            for name, kind in self._conn.execute(sql):
                out.setdefault(name, set()).add(_VALUE_TYPES.get(kind, kind))
        return out
