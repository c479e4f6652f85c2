"""Searching one FAISS index over a subset of its ids (a filter's result), inside FAISS.

The ids go in as an `IDSelectorBitmap` through the index type's own search parameters
(`SearchParameters` for flat, `SearchParametersIVF` with `nprobe`, `SearchParametersHNSW` with
`efSearch`), so every result is an allowed id and no result is fetched only to be dropped. Where the
subset is small (`EXACT_MAX`), a graph or list walk would pass too few allowed ids to fill `k`, so it
is searched exactly instead: its vectors are read back from the index once (kept with the subset) and
compared by one matrix product. Search-time knobs grow with 1 / selectivity so recall holds.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field

import faiss
import numpy as np

log = logging.getLogger(__name__)

EXACT_MAX = 20_000  # subsets up to this many vectors are searched exactly
EXACT_FRACTION = 0.02  # ... and any subset under this share of its index
MAX_EF = 4096
PAD_ID = -1
PAD_SCORE = float(-np.finfo(np.float32).max)  # what FAISS returns beside id -1


@dataclass(eq=False)
class Subset:
    """The allowed ids of one layer's index, ascending, with what searching them needs (made once)."""

    ids: np.ndarray  # (m,) int64, ascending
    _bitmap: np.ndarray | None = None
    _vectors: np.ndarray | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __len__(self) -> int:
        return len(self.ids)

    def bitmap(self) -> np.ndarray:
        """Bit i set for id i (FAISS's `IDSelectorBitmap` layout: byte i >> 3, bit i & 7)."""
        with self._lock:
            if self._bitmap is None:
                top = int(self.ids[-1]) + 1 if len(self.ids) else 0
                bits = np.zeros(top, dtype=bool)
                bits[self.ids] = True
                self._bitmap = np.packbits(bits, bitorder="little")
            return self._bitmap

    def vectors(self, index: faiss.Index) -> np.ndarray | None:
        """(m, d) float32 of the subset read back from `index`, or None when it cannot reconstruct."""
        with self._lock:
            if self._vectors is None:
                try:
                    self._vectors = np.ascontiguousarray(index.reconstruct_batch(self.ids), np.float32)
                except RuntimeError:
                    return None
            return self._vectors


def search_subset(
    index: faiss.Index, queries: np.ndarray, k: int, subset: Subset
) -> tuple[np.ndarray, np.ndarray]:
    """The `k` nearest of `subset` to each query ((n, d) float32): (scores, ids), padded with id -1."""
    n = len(queries)
    if len(subset) == 0 or k == 0:
        return np.full((n, k), PAD_SCORE, np.float32), np.full((n, k), PAD_ID, np.int64)
    frac = len(subset) / max(int(index.ntotal), 1)
    ivf = _ivf(index)
    if ivf is None and (len(subset) <= EXACT_MAX or frac < EXACT_FRACTION) and not _is_flat(index):
        vectors = subset.vectors(index)
        if vectors is not None:
            return exact_top_k(queries, vectors, subset.ids, k)
    bitmap = subset.bitmap()
    sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
    params = _params(index, ivf, sel, frac, k)  # `sel` and `bitmap` live until the search returns
    outer = params
    if _pretransform(index):
        outer = faiss.SearchParametersPreTransform(index_params=params)  # type: ignore[call-arg]
    scores, ids = index.search(queries, k, params=outer)
    return scores, ids


def exact_top_k(
    queries: np.ndarray, vectors: np.ndarray, ids: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Inner-product top-k of `queries` against `vectors` (row i has id `ids[i]`), best first."""
    sims = queries @ vectors.T  # (n, m)
    kk = min(k, sims.shape[1])
    top = (
        np.argpartition(-sims, kk - 1, axis=1)[:, :kk]
        if kk < sims.shape[1]
        else np.tile(np.arange(sims.shape[1]), (len(sims), 1))
    )
    part = np.take_along_axis(sims, top, axis=1)
    order = np.argsort(-part, axis=1, kind="stable")
    top = np.take_along_axis(top, order, axis=1)
    scores = np.take_along_axis(sims, top, axis=1).astype(np.float32)
    found = ids[top].astype(np.int64)
    if kk < k:
        scores = np.pad(scores, ((0, 0), (0, k - kk)), constant_values=PAD_SCORE)
        found = np.pad(found, ((0, 0), (0, k - kk)), constant_values=PAD_ID)
    return scores, found


def _ivf(index: faiss.Index) -> faiss.IndexIVF | None:
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _inner(index: faiss.Index) -> faiss.Index:
    return faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index


def _is_flat(index: faiss.Index) -> bool:
    return isinstance(_inner(index), faiss.IndexFlat)


def _params(
    index: faiss.Index, ivf: faiss.IndexIVF | None, sel: faiss.IDSelector, frac: float, k: int
) -> faiss.SearchParameters:
    """The index type's search parameters with `sel`, its tuned knob raised by 1 / `frac`."""
    if ivf is not None:
        nprobe = min(int(ivf.nlist), max(int(ivf.nprobe), math.ceil(ivf.nprobe / frac)))
        params: faiss.SearchParameters = faiss.SearchParametersIVF(sel=sel, nprobe=nprobe)  # type: ignore[call-arg]
    elif isinstance(inner := _inner(index), faiss.IndexHNSW):
        ef = int(inner.hnsw.efSearch)
        ef = min(MAX_EF, max(ef, k, math.ceil(ef / frac)))
        params = faiss.SearchParametersHNSW(sel=sel, efSearch=ef)  # type: ignore[attr-defined]
    else:
        params = faiss.SearchParameters(sel=sel)  # type: ignore[call-arg]
    return params


def _pretransform(index: faiss.Index) -> bool:
    return isinstance(faiss.downcast_index(index), faiss.IndexPreTransform)
