"""The layers of a bundle version: its base and delta segments, each a pair of FAISS indexes with the
items it defines, and `LayerStack`, which folds them into the one live view a version serves.

A segment owns the ids in its `replaced` table: for those ids every earlier layer's row and vector is
void, and the segment holds the current row and vector of each one that still exists (docs/live.md,
"Delta versions"). A `Layer` is shared, reference-counted, by every opened version holding the same files
(its `key` is their sha256s), so a reload reuses what it already verified instead of reading it again.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import faiss
import numpy as np

from indexer.core.bundle.items import Item, ItemKind, ItemStore

Target = Literal["images", "texts"]
KIND_OF: dict[Target, ItemKind] = {"images": "image", "texts": "text"}
PAD_SCORE = float(-np.finfo(np.float32).max)  # what FAISS returns beside id -1 when a row is short
SearchFn = Callable[[faiss.Index, np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass(eq=False)
class Layer:
    """A base (`store` set, owns nothing) or a delta segment (`rows` in memory, `owned` ids)."""

    key: str
    name: str  # "base" or the segment's name
    image_index: faiss.Index
    text_index: faiss.Index
    store: ItemStore | None = None
    rows: dict[int, Item] = field(default_factory=dict)
    owned: frozenset[int] = frozenset()
    _users: int = 0
    _kinds: dict[int, ItemKind | None] = field(default_factory=dict)
    _folder: tuple[str | None] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def index(self, target: Target) -> faiss.Index:
        return self.image_index if target == "images" else self.text_index

    def kinds(self, ids: Iterable[int]) -> dict[int, ItemKind | None]:
        """The kind of each id's row in this layer (None: it has none); a base remembers what it looked up."""
        wanted = list(ids)
        if self.store is None:
            return {i: (self.rows[i].kind if i in self.rows else None) for i in wanted}
        with self._lock:
            missing = [i for i in wanted if i not in self._kinds]
            if missing:
                found = self.store.kinds(missing)
                self._kinds.update({i: found.get(i) for i in missing})
            return {i: self._kinds[i] for i in wanted}

    def folder(self) -> str | None:
        """The folder all of this layer's images lie under (computed once per layer)."""
        with self._lock:
            if self._folder is None:
                paths = self.store.image_paths() if self.store is not None else []
                paths += [r.path for r in self.rows.values() if r.kind == "image" and r.path]
                self._folder = (common_folder(paths),)
            return self._folder[0]

    def acquire(self) -> None:
        with self._lock:
            self._users += 1

    def release(self) -> None:
        with self._lock:
            self._users -= 1
            close = self._users <= 0 and self.store is not None
        if close and self.store is not None:
            self.store.close()


def common_folder(paths: Sequence[str]) -> str | None:
    """The deepest folder every path lies under, or None for no paths."""
    parents = {os.path.dirname(os.path.abspath(p)) for p in paths}
    return os.path.commonpath(sorted(parents)) if parents else None


class LayerStack:
    """One version's layers, base first, folded: which layer owns each id, and what is dead where."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        self.layers = list(layers)
        self.owner: dict[int, int] = {}  # id -> position of the newest segment owning it
        for pos, layer in enumerate(self.layers[1:], start=1):
            self.owner.update(dict.fromkeys(layer.owned, pos))
        base_kinds = self.layers[0].kinds(self.owner)
        # dead[pos][target]: ids of vectors in that layer's index that a later layer owns
        self.dead: list[dict[Target, np.ndarray]] = [
            {t: _ids(i for i, k in base_kinds.items() if k == KIND_OF[t]) for t in KIND_OF}
        ]
        for pos, layer in enumerate(self.layers[1:], start=1):
            self.dead.append(
                {
                    t: _ids(i for i, r in layer.rows.items() if r.kind == KIND_OF[t] and self.owner[i] > pos)
                    for t in KIND_OF
                }
            )

    def count(self, target: Target) -> int:
        """Items of `target` the version serves: every layer's vectors, less those a later layer owns."""
        return sum(
            int(layer.index(target).ntotal) - len(d[target])
            for layer, d in zip(self.layers, self.dead, strict=True)
        )

    def search(
        self, target: Target, queries: np.ndarray, k: int, search_one: SearchFn
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each layer asked for `k` plus its dead vectors, those dropped, the rest merged by score."""
        if len(self.layers) == 1:
            return search_one(self.layers[0].index(target), queries, k)
        scores, ids = [], []
        for layer, dead in zip(self.layers, self.dead, strict=True):
            index = layer.index(target)
            if index.ntotal == 0:
                continue
            s, i = search_one(index, queries, min(k + len(dead[target]), int(index.ntotal)))
            if len(dead[target]):
                drop = np.isin(i, dead[target])
                s, i = np.where(drop, PAD_SCORE, s), np.where(drop, -1, i)
            scores.append(s)
            ids.append(i)
        n = len(queries)
        if not scores:
            return np.full((n, k), PAD_SCORE, np.float32), np.full((n, k), -1, np.int64)
        all_s, all_i = np.concatenate(scores, axis=1), np.concatenate(ids, axis=1)
        if all_s.shape[1] < k:
            pad = k - all_s.shape[1]
            all_s = np.pad(all_s, ((0, 0), (0, pad)), constant_values=PAD_SCORE)
            all_i = np.pad(all_i, ((0, 0), (0, pad)), constant_values=-1)
        best = np.argsort(-all_s, axis=1, kind="stable")[:, :k]
        return (
            np.take_along_axis(all_s, best, axis=1).astype(np.float32),
            np.take_along_axis(all_i, best, axis=1).astype(np.int64),
        )

    def folder(self) -> str | None:
        """The folder every image of the version lies under (each layer's is computed once)."""
        folders = sorted({f for f in (layer.folder() for layer in self.layers) if f is not None})
        return os.path.commonpath(folders) if folders else None


def _ids(values: Iterable[int]) -> np.ndarray:
    return np.fromiter(values, dtype=np.int64)


class LayeredItems:
    """The items a version serves, looked up through the newest layer that owns each id.

    The same interface as `ItemStore` (read-only, thread-safe); deleted ids are absent.
    """

    def __init__(self, stack: LayerStack) -> None:
        self.stack = stack
        base = stack.layers[0].store
        assert base is not None, "the first layer is the base"
        self.base = base

    def close(self) -> None:
        """Nothing of its own to close: the bundle releases its layers."""

    def count(self, kind: ItemKind) -> int:
        return self.stack.count("images" if kind == "image" else "texts")

    def get(self, item_id: int) -> Item | None:
        return self.get_many([item_id]).get(item_id)

    def get_many(self, ids: Sequence[int]) -> dict[int, Item]:
        """Items by id; unknown and deleted ids are absent from the result."""
        out: dict[int, Item] = {}
        from_base = []
        for i in (int(x) for x in ids if int(x) >= 0):
            pos = self.stack.owner.get(i)
            if pos is None:
                from_base.append(i)
            elif (row := self.stack.layers[pos].rows.get(i)) is not None:
                out[i] = row
        return out | self.base.get_many(from_base)

    def all(self, kind: ItemKind | None = None) -> list[Item]:
        """Every item (of `kind`) the version serves, by id."""
        owner = self.stack.owner
        items = [it for it in self.base.all(kind) if it.id not in owner]
        for i, pos in owner.items():
            row = self.stack.layers[pos].rows.get(i)
            if row is not None and (kind is None or row.kind == kind):
                items.append(row)
        return sorted(items, key=lambda it: it.id)

    def image_paths(self) -> list[str]:
        """The path of every image item."""
        if not self.stack.owner:
            return self.base.image_paths()
        return [it.path for it in self.all("image") if it.path is not None]
