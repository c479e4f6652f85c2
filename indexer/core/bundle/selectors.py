"""Searching one FAISS index over a subset of its ids (a filter's result), inside FAISS.

The ids go in as an `IDSelectorBitmap` through the index type's own search parameters
(`SearchParameters` for flat, `SearchParametersIVF` with `nprobe`, `SearchParametersHNSW` with
`efSearch`), so every result is an allowed id and no result is fetched only to be dropped. Where the
subset is a small share of an HNSW index, a graph walk would pass too few allowed ids to fill `k`, so
it is searched exactly instead: a few thousand vectors from a flat copy kept with the subset, more by
scanning the index's own stored vectors with the selector (FAISS skips the others before computing a
distance). Search-time knobs grow with 1 / selectivity so recall holds. An IVF index's subset is
searched from a flat copy of its decoded vectors instead when that copy is fewer bytes to read than the
lists the raised `nprobe` would scan: at 1M vectors in `IVF1024,SQ8` a 0.5% subset probed 200 lists
for recall@10 0.91 in 1.2 ms, where its 5,000 decoded vectors give 0.985 in 0.5 ms
(docs/benchmarks.md, "Filters").
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, field

import faiss
import numpy as np

from indexer.core.bundle.exact import flat_storage, search_flat, search_rows

log = logging.getLogger(__name__)

EXACT_MAX = 65_536  # subsets up to this many vectors are searched exactly, from a flat copy kept with them
GRAPH_FRACTION = 0.2  # below this share of an HNSW index, its stored vectors are scanned exactly instead
COPY_FRACTION = 0.25  # below this share of a flat index (and up to EXACT_MAX), a copy of the subset is
# scanned; above it, every stored row is scanned once with the others masked (no copy to keep)
MAX_EF = 4096
PAD_ID = -1
PAD_SCORE = float(-np.finfo(np.float32).max)  # what FAISS returns beside id -1


@dataclass(eq=False)
class Subset:
    """The allowed ids of one layer's index, ascending, with what searching them needs (made once)."""

    ids: np.ndarray  # (m,) int64, ascending
    _bitmap: np.ndarray | None = None
    _exact: faiss.IndexFlat | None = None
    _allowed: np.ndarray | None = None
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

    def exact(self, index: faiss.Index) -> faiss.IndexFlat | None:
        """An exact inner-product index of the subset's vectors read back from `index` (row i is
        `ids[i]`), made once; None when `index` cannot reconstruct them."""
        with self._lock:
            if self._exact is None:
                try:
                    vectors = np.ascontiguousarray(reconstruct(index, self.ids), np.float32)
                except RuntimeError:
                    return None
                self._exact = faiss.IndexFlatIP(vectors.shape[1])
                self._exact.add(vectors)
            return self._exact

    def allowed(self, row_ids: np.ndarray | None, n: int) -> np.ndarray:
        """(n,) bool over a flat index's rows: row r is allowed when its id (`row_ids[r]`, or r) is in
        the subset (made once)."""
        with self._lock:
            if self._allowed is None:
                if row_ids is None:
                    mask = np.zeros(n, bool)
                    mask[self.ids[self.ids < n]] = True
                else:
                    mask = np.isin(row_ids, self.ids)
                self._allowed = mask
            return self._allowed


def search_subset(
    index: faiss.Index, queries: np.ndarray, k: int, subset: Subset
) -> tuple[np.ndarray, np.ndarray]:
    """The `k` nearest of `subset` to each query ((n, d) float32): (scores, ids), padded with id -1."""
    n = len(queries)
    if len(subset) == 0 or k == 0:
        return np.full((n, k), PAD_SCORE, np.float32), np.full((n, k), PAD_ID, np.int64)
    frac = len(subset) / max(int(index.ntotal), 1)
    if (found := _search_flat_subset(index, queries, k, subset, frac)) is not None:
        return found
    ivf = _ivf(index)
    graph = ivf is None and not _is_flat(index) and frac < GRAPH_FRACTION  # a walk would find too few
    copy = _copy_is_cheaper(ivf, len(subset), frac) if ivf is not None else graph and len(subset) <= EXACT_MAX
    if copy and (exact := subset.exact(index)) is not None:
        return _search_copy(exact, queries, k, subset)
    bitmap = subset.bitmap()
    if graph and (found := _scan_storage(index, queries, k, bitmap)) is not None:
        return found
    sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
    refine = _inner(index)
    if isinstance(index, faiss.IndexIDMap) and isinstance(refine, faiss.IndexRefine):
        # `auto`'s refined IVF-PQ: the ids are the outer map's, so its base index gets the rows they name;
        # an IndexRefine accepts only its own parameters, wrapping the base index's
        by_row = faiss.IDSelectorTranslated(index.id_map, sel)  # type: ignore[arg-type]
        base = _params(index, ivf, by_row, frac, k)
        refined = faiss.IndexRefineSearchParameters()
        refined.base_index_params, refined.k_factor = base, refine.k_factor
        return index.search(queries, k, params=refined)
    params = _params(index, ivf, sel, frac, k)  # `sel` and `bitmap` live until the search returns
    outer = params
    if _pretransform(index):
        outer = faiss.SearchParametersPreTransform(index_params=params)  # type: ignore[call-arg]
    scores, ids = index.search(queries, k, params=outer)
    return scores, ids


def _search_copy(
    exact: faiss.IndexFlat, queries: np.ndarray, k: int, subset: Subset
) -> tuple[np.ndarray, np.ndarray]:
    found = search_flat(exact, queries, k)
    assert found is not None, "the subset's copy is an IndexFlatIP"
    scores, pos = found
    return scores, np.where(pos >= 0, subset.ids[np.maximum(pos, 0)], PAD_ID)


def _search_flat_subset(
    index: faiss.Index, queries: np.ndarray, k: int, subset: Subset, frac: float
) -> tuple[np.ndarray, np.ndarray] | None:
    """A flat inner-product index searched over `subset` in one pass for the batch (`exact`): a copy of
    the subset's vectors where it is small, else every row with the others masked; None otherwise."""
    storage = flat_storage(index)
    if storage is None:
        return None
    if len(subset) <= EXACT_MAX and frac < COPY_FRACTION and (exact := subset.exact(index)) is not None:
        return _search_copy(exact, queries, k, subset)
    rows, row_ids = storage
    scores, pos = search_rows(rows, queries, k, subset.allowed(row_ids, len(rows)))
    if row_ids is not None:
        pos = np.where(pos >= 0, row_ids[np.maximum(pos, 0)], PAD_ID)
    return scores, pos


def _scan_storage(
    index: faiss.Index, queries: np.ndarray, k: int, bitmap: np.ndarray
) -> tuple[np.ndarray, np.ndarray] | None:
    """Exact search of an id-mapped HNSW index's own flat storage over the allowed ids only (FAISS skips
    the others before computing a distance); None for any other layout."""
    inner = _inner(index)
    storage = faiss.downcast_index(inner.storage) if isinstance(inner, faiss.IndexHNSW) else None
    if not isinstance(index, faiss.IndexIDMap) or not isinstance(storage, faiss.IndexFlat):
        return None
    sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
    by_position = faiss.IDSelectorTranslated(index.id_map, sel)  # type: ignore[arg-type]  # rows -> ids
    scores, pos = storage.search(queries, k, params=faiss.SearchParameters(sel=by_position))  # type: ignore[call-arg]
    id_map = faiss.rev_swig_ptr(index.id_map.data(), index.id_map.size())  # a view, not a copy
    return scores, np.where(pos >= 0, id_map[np.maximum(pos, 0)], PAD_ID)


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
        params: faiss.SearchParameters = faiss.SearchParametersIVF(sel=sel, nprobe=_nprobe(ivf, frac))  # type: ignore[call-arg]
    elif isinstance(inner := _inner(index), faiss.IndexHNSW):
        ef = int(inner.hnsw.efSearch)
        ef = min(MAX_EF, max(ef, k, math.ceil(ef / frac)))
        params = faiss.SearchParametersHNSW(sel=sel, efSearch=ef)  # type: ignore[attr-defined]
    else:
        params = faiss.SearchParameters(sel=sel)  # type: ignore[call-arg]
    return params


def _nprobe(ivf: faiss.IndexIVF, frac: float) -> int:
    """The lists to probe for a subset of `frac` of the index: its tuned nprobe raised by 1 / `frac`."""
    return min(int(ivf.nlist), max(int(ivf.nprobe), math.ceil(ivf.nprobe / frac)))


def _copy_is_cheaper(ivf: faiss.IndexIVF, m: int, frac: float) -> bool:
    """Whether `m` decoded float32 vectors are fewer bytes to scan than the lists `_nprobe` would."""
    probed = _nprobe(ivf, frac) / int(ivf.nlist) * int(ivf.ntotal) * int(ivf.code_size)
    return m <= EXACT_MAX and m * int(ivf.d) * 4 <= probed


_DIRECT_MAP_LOCK = threading.Lock()


def reconstruct(index: faiss.Index, ids: np.ndarray) -> np.ndarray:
    """The stored (decoded) vectors of `ids` ((m,) int64) in `index`. An IVF index that keeps no id ->
    list map is given one (8 bytes a vector, made once; searches do not read it)."""
    try:
        return index.reconstruct_batch(ids)
    except RuntimeError:
        ivf = _ivf(index)
        if ivf is None or not ivf.direct_map.no():
            raise
    with _DIRECT_MAP_LOCK:
        if ivf.direct_map.no():
            ivf.make_direct_map()
    return index.reconstruct_batch(ids)


def _pretransform(index: faiss.Index) -> bool:
    return isinstance(faiss.downcast_index(index), faiss.IndexPreTransform)
