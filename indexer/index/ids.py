"""Item ids that never change meaning: the indexer's own record of the ids it gave out, and the highest
id any bundle in the directory has used.

`.work/ids.sqlite` holds the id of every item of the last run and the next unused id. It is written
before the run publishes (so it is never behind a published bundle; ids it reserves for a run that then
fails are simply used by the next run for the same items). A run continues from it even when CURRENT is
dangling, empty or names a damaged bundle; without it, from the newest bundle that verifies
(`indexer.index.scan.read_previous`).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from indexer.core.bundle.items import Item, open_readonly
from indexer.core.bundle.layout import ITEMS_DB, WORK_DIR
from indexer.core.bundle.manifest import BundleError, load_manifest
from indexer.core.bundle.read import list_versions
from indexer.core.errors import ClipsearchError

log = logging.getLogger(__name__)

IDS_DB = "ids.sqlite"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS ids (
    kind TEXT NOT NULL, key TEXT NOT NULL, id INTEGER NOT NULL, sha256 TEXT, PRIMARY KEY (kind, key)
) WITHOUT ROWID;
"""


class IdStateError(ClipsearchError, RuntimeError):
    """The ids already given out cannot be established, so a run could give an old id to another item."""


@dataclass
class IdState:
    """Which id each image (by path) and text (by its text) has, and the next id never used."""

    images: dict[str, tuple[int, str]] = field(default_factory=dict)  # key -> (id, sha256)
    texts: dict[str, int] = field(default_factory=dict)  # text -> id
    next_id: int = 0

    @classmethod
    def from_items(cls, items: Iterable[Item], next_id: int = 0) -> IdState:
        state = cls(next_id=next_id)
        top = -1
        for item in items:
            top = max(top, item.id)
            if item.kind == "image" and item.path is not None:
                state.images[item.path] = (item.id, item.sha256 or "")
            elif item.text is not None:
                state.texts[item.text] = item.id
        state.next_id = max(state.next_id, top + 1)
        return state


def ids_path(bundles_dir: Path) -> Path:
    return Path(bundles_dir) / WORK_DIR / IDS_DB


def load_ids(bundles_dir: Path) -> IdState | None:
    """The recorded id state, or None when there is none or it cannot be read (said in the log)."""
    path = ids_path(bundles_dir)
    if not path.exists():
        return None
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
            state = IdState(next_id=int(meta["next_id"]))
            for kind, key, item_id, sha in conn.execute("SELECT kind, key, id, sha256 FROM ids"):
                if kind == "image":
                    state.images[key] = (int(item_id), sha or "")
                else:
                    state.texts[key] = int(item_id)
        finally:
            conn.close()
    except (sqlite3.DatabaseError, KeyError, ValueError) as e:
        log.warning("%s is unreadable (%s); not using it", path, e)
        return None
    return state


def save_ids(bundles_dir: Path, items: Iterable[Item], next_id: int) -> None:
    """Record the ids of `items` and `next_id` in one transaction (replacing the previous record)."""
    save_state(bundles_dir, IdState.from_items(items, next_id))


def save_state(bundles_dir: Path, state: IdState) -> None:
    """Record `state` in one transaction (replacing the previous record); every publish does this first."""
    path = ids_path(bundles_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str, int, str | None]] = [
        ("image", key, item_id, sha) for key, (item_id, sha) in state.images.items()
    ]
    rows += [("text", text, item_id, None) for text, item_id in state.texts.items()]
    next_id = state.next_id
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_SCHEMA)
        with conn:
            conn.execute("DELETE FROM ids")
            conn.executemany("INSERT OR REPLACE INTO ids VALUES (?, ?, ?, ?)", rows)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('next_id', ?)", (str(next_id),))
    finally:
        conn.close()


def update_state(
    bundles_dir: Path,
    images: Mapping[str, tuple[int, str] | None],
    texts: Mapping[str, int | None],
    next_id: int,
) -> None:
    """Apply a change to the record `save_state` wrote, in one transaction: each key of `images` (path)
    and `texts` (text) gets its new (id, sha256) or id, or is dropped (None). It costs the change, not
    the collection (a watcher's delta at 1M items: milliseconds, against seconds for `save_state`)."""
    path = ids_path(bundles_dir)
    if not path.exists():
        raise FileNotFoundError(path)
    drop = [("image", k) for k, v in images.items() if v is None]
    drop += [("text", k) for k, v in texts.items() if v is None]
    put: list[tuple[str, str, int, str | None]] = [
        ("image", k, v[0], v[1]) for k, v in images.items() if v is not None
    ]
    put += [("text", k, v, None) for k, v in texts.items() if v is not None]
    conn = sqlite3.connect(path)
    try:
        with conn:
            conn.executemany("DELETE FROM ids WHERE kind = ? AND key = ?", drop)
            conn.executemany("INSERT OR REPLACE INTO ids VALUES (?, ?, ?, ?)", put)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('next_id', ?)", (str(next_id),))
    finally:
        conn.close()


def high_water(bundles_dir: Path) -> int:
    """One past the highest id any bundle dir here records (manifest `next_id` or items.sqlite), even a
    bundle that no longer verifies: a damaged bundle may still have been served."""
    top = 0
    for version in list_versions(bundles_dir):
        root = Path(bundles_dir) / version
        with contextlib.suppress(BundleError, OSError, ValueError, TypeError):
            top = max(top, int(load_manifest(root).stats.get("next_id", 0)))
        with contextlib.suppress(sqlite3.DatabaseError):
            top = max(top, _max_item_id(root / ITEMS_DB) + 1)
    return top


def _max_item_id(path: Path) -> int:
    conn = open_readonly(path)
    try:
        row = conn.execute("SELECT MAX(id) FROM items").fetchone()
    finally:
        conn.close()
    return int(row[0]) if row and row[0] is not None else -1
