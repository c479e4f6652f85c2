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
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import faiss
import numpy as np

from indexer.core.bundle.filters import Filter, Table, facet_counts
from indexer.core.bundle.items import FieldValue, Item, ItemKind, ItemStore, folder_of, value_type
from indexer.core.bundle.selectors import Subset, reconstruct

Target = Literal["images", "texts"]
KIND_OF: dict[Target, ItemKind] = {"images": "image", "texts": "text"}
PAD_SCORE = float(-np.finfo(np.float32).max)  # what FAISS returns beside id -1 when a row is short
# One index's search: (index, queries, k, subset) -> (scores, ids); `subset` None searches every id.
SearchFn = Callable[[faiss.Index, np.ndarray, int, Subset | None], tuple[np.ndarray, np.ndarray]]
SELECTIONS_KEPT = 16  # filter results remembered per version (each with its exact copy, if any)


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
    _tables: dict[Target, Table] = field(default_factory=dict)
    _field_types: dict[str, frozenset[str]] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def index(self, target: Target) -> faiss.Index:
        return self.image_index if target == "images" else self.text_index

    def table(self, target: Target) -> Table:
        """This layer's items of `target` as filter columns (each column read on first use, then kept)."""
        with self._lock:
            if target not in self._tables:
                self._tables[target] = self._make_table(KIND_OF[target])
            return self._tables[target]

    def _make_table(self, kind: ItemKind) -> Table:
        if self.store is not None:
            store = self.store
            ids, _ = store.columns(kind, [])

            def builtin(name: str) -> list[FieldValue | None]:
                if name == "folder" and not store.has_column("folder"):  # a format-1 items file
                    return [folder_of(p) for (p,) in store.columns(kind, ["path"])[1]]
                return [r[0] for r in store.columns(kind, [name])[1]]

            return Table(np.asarray(ids, np.int64), builtin, lambda name: store.field_values(kind, name))
        rows = sorted((r for r in self.rows.values() if r.kind == kind), key=lambda r: r.id)

        def user(name: str) -> list[tuple[int, FieldValue]]:
            out: list[tuple[int, FieldValue]] = []
            for r in rows:
                v = r.fields.get(name)
                out += [(r.id, x) for x in (v if isinstance(v, tuple) else (v,)) if x is not None]
            return out

        row_ids = np.asarray([r.id for r in rows], np.int64)
        return Table(row_ids, lambda name: [getattr(r, name) for r in rows], user)

    def vectors(self, target: Target, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), d) float32: the stored vectors of `ids` in this layer's index of `target`."""
        return np.asarray(reconstruct(self.index(target), np.asarray(ids, np.int64)), np.float32)

    def field_types(self) -> dict[str, frozenset[str]]:
        """The user field names of this layer's items with their value types (read once: a layer never
        changes, and every filtered search asks; a `GROUP BY` over a million items' fields costs
        0.2-0.5 s)."""
        with self._lock:
            if self._field_types is None:
                found = self.store.field_types() if self.store is not None else {}
                for r in self.rows.values():
                    for name, value in r.fields.items():
                        values = value if isinstance(value, tuple) else (value,)
                        found.setdefault(name, set()).update(value_type(v) for v in values if v is not None)
                self._field_types = {name: frozenset(kinds) for name, kinds in found.items()}
            return dict(self._field_types)

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

        self._selections: OrderedDict[tuple[Target, str], list[Subset]] = OrderedDict()
        self._select_lock = threading.Lock()

    def select(self, target: Target, flt: Filter) -> list[Subset]:
        """Each layer's ids of `target` that `flt` keeps and no later layer owns (remembered per filter)."""
        key = (target, flt.key)
        with self._select_lock:
            if key in self._selections:
                self._selections.move_to_end(key)
                return self._selections[key]
        subsets = []
        for layer, dead in zip(self.layers, self.dead, strict=True):
            table = layer.table(target)
            keep = table.mask(flt)
            if len(dead[target]):
                keep &= ~np.isin(table.ids, dead[target])
            subsets.append(Subset(table.ids[keep]))
        with self._select_lock:
            self._selections[key] = subsets
            while len(self._selections) > SELECTIONS_KEPT:
                self._selections.popitem(last=False)
        return subsets

    def facets(self, target: Target, name: str, flt: Filter) -> dict[FieldValue, int]:
        """Value -> count of field `name` over the items of `target` that `flt` keeps."""
        total: dict[FieldValue, int] = {}
        for layer, subset in zip(self.layers, self.select(target, flt), strict=True):
            table = layer.table(target)
            for value, n in facet_counts(table, name, np.isin(table.ids, subset.ids)).items():
                total[value] = total.get(value, 0) + n
        return total

    def vectors(self, target: Target, ids: Sequence[int]) -> np.ndarray:
        """(len(ids), d) float32: the vectors the version serves for `ids` (items of `target`), each
        from the newest layer owning it."""
        dim = int(self.layers[0].index(target).d)
        out = np.zeros((len(ids), dim), np.float32)
        by_layer: dict[int, list[int]] = {}
        for row, i in enumerate(ids):
            by_layer.setdefault(self.owner.get(int(i), 0), []).append(row)
        for pos, rows in by_layer.items():
            out[rows] = self.layers[pos].vectors(target, [int(ids[r]) for r in rows])
        return out

    def field_types(self) -> dict[str, list[str]]:
        """Every user field name an item of the version may have, with its value types, sorted."""
        out: dict[str, set[str]] = {}
        for layer in self.layers:
            for name, kinds in layer.field_types().items():
                out.setdefault(name, set()).update(kinds)
        return {name: sorted(out[name]) for name in sorted(out)}

    def field_names(self) -> set[str]:
        """Every user field name an item of the version may have."""
        return {name for layer in self.layers for name in layer.field_types()}

    def count(self, target: Target) -> int:
        """Items of `target` the version serves: every layer's vectors, less those a later layer owns."""
        return sum(
            int(layer.index(target).ntotal) - len(d[target])
            for layer, d in zip(self.layers, self.dead, strict=True)
        )

    def search(
        self,
        target: Target,
        queries: np.ndarray,
        k: int,
        search_one: SearchFn,
        selection: Sequence[Subset] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each layer asked for `k` plus its dead vectors, those dropped, the rest merged by score.

        `selection` (from `select`): each layer searched over its subset only, inside FAISS; dead
        vectors are outside it already.
        """
        if selection is not None:
            return self._search_selected(target, queries, k, search_one, selection)
        if len(self.layers) == 1:
            return search_one(self.layers[0].index(target), queries, k, None)
        scores, ids = [], []
        for layer, dead in zip(self.layers, self.dead, strict=True):
            index = layer.index(target)
            if index.ntotal == 0:
                continue
            s, i = search_one(index, queries, min(k + len(dead[target]), int(index.ntotal)), None)
            if len(dead[target]):
                drop = np.isin(i, dead[target])
                s, i = np.where(drop, PAD_SCORE, s), np.where(drop, -1, i)
            scores.append(s)
            ids.append(i)
        return _merge(scores, ids, len(queries), k)

    def _search_selected(
        self, target: Target, queries: np.ndarray, k: int, search_one: SearchFn, selection: Sequence[Subset]
    ) -> tuple[np.ndarray, np.ndarray]:
        scores, ids = [], []
        for layer, subset in zip(self.layers, selection, strict=True):
            if len(subset):
                s, i = search_one(layer.index(target), queries, min(k, len(subset)), subset)
                scores.append(s)
                ids.append(i)
        return _merge(scores, ids, len(queries), k)

    def folder(self) -> str | None:
        """The folder every image of the version lies under (each layer's is computed once)."""
        folders = sorted({f for f in (layer.folder() for layer in self.layers) if f is not None})
        return os.path.commonpath(folders) if folders else None


def _merge(scores: list[np.ndarray], ids: list[np.ndarray], n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The best `k` of each row across the layers' (n, k_i) results, padded with id -1."""
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
