"""Exact (flat) inner-product search of a batch of queries in one pass over the stored vectors.

faiss-cpu 1.15.1 ships `distance_compute_blas_threshold = 128000`: a flat index scans every batch of
fewer than 128,000 queries query by query (one core, one pass over the vectors per query), so
micro-batching the service's queries saved nothing at the search step. Here a batch is scanned once:
by FAISS's own BLAS path (`BLAS_THRESHOLD`, set on import) or by a torch GEMM + top-k over the very
float32 rows FAISS stores (no copy; a single query also uses every intra-op thread), whichever measured
faster for the shape class on its first search (`_choose`): on the 2-core machine each won on some runs
(docs/benchmarks.md, "Exact search"). Half-precision storage was measured too and not taken: torch's CPU
fp16 GEMM is much slower than fp32 for a batch (it wins only for one query, and would need a second copy).

What it returns equals `faiss.IndexFlatIP.search` on the same index: the same ids, scores to float
rounding (a different GEMM kernel sums in a different order), rows padded with id -1 and FAISS's
sentinel score `-FLT_MAX` where fewer than `k` vectors exist (or are allowed). Ties: FAISS's order among
equal scores is an artefact of its heap (it differs with `k`), so ours is defined instead: equal scores
in ascending stored position (for an id-mapped index, position of insertion), and where a tie straddles
the `k`-th place the lowest positions are kept. `canonical` puts a FAISS result in that order, for tests
and benchmarks comparing the two.

`BLAS_THRESHOLD` also applies to FAISS's other flat scans of a batch (an IVF coarse quantiser, the
range search in `duplicates`, which it did not speed up: 22.6 s vs 25.9 s for 50k x 50k, load 1.7).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import faiss
import numpy as np
import torch

log = logging.getLogger(__name__)

BLAS_THRESHOLD = 20  # FAISS's default before 1.8: batches of this many queries or more share one GEMM
faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
PAD_ID = -1
PAD_SCORE = float(-np.finfo(np.float32).max)  # what FAISS returns beside id -1
SCORES_BYTES = 64 << 20  # the (queries x rows) score block one GEMM writes, at most
SMALL = 20_000  # collections (a delta segment) under this many rows: FAISS's own scan, not measured
# (5,000 rows: FAISS 0.2 / 2.2 ms for 1 / 16 queries, torch 1.7 / 4.3 ms, its dispatch overhead)
EXTRA = 8  # candidates beyond k taken per block, so a tie at the k-th place is seen whole


def flat_storage(index: faiss.Index) -> tuple[np.ndarray, np.ndarray | None] | None:
    """(rows, ids) of an inner-product flat index, `IndexFlatIP` or an id map over one: its stored
    float32 vectors as an (n, d) view (not a copy) and the id of each row (None: the row number);
    None for any other layout."""
    index = faiss.downcast_index(index)
    ids = None
    if isinstance(index, faiss.IndexIDMap):  # IndexIDMap2 is a subclass
        ids = faiss.rev_swig_ptr(index.id_map.data(), index.id_map.size()) if index.ntotal else None
        index = faiss.downcast_index(index.index)
    if not isinstance(index, faiss.IndexFlat) or index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return None
    n, d = int(index.ntotal), int(index.d)
    if n == 0:
        return np.zeros((0, d), np.float32), None
    rows = faiss.rev_swig_ptr(index.get_xb(), n * d).reshape(n, d)
    return rows, (np.asarray(ids, np.int64) if ids is not None else None)


def search_rows(
    rows: np.ndarray,
    queries: np.ndarray,
    k: int,
    allowed: np.ndarray | None = None,
    flat: faiss.IndexFlat | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The `k` best rows of `rows` ((n, d) float32) by inner product with each of `queries` ((m, d)):
    (scores (m, k) float32, positions (m, k) int64), best first, ties by ascending position, padded with
    -1 / `PAD_SCORE`. `allowed`: (n,) bool, the only rows that may be returned. `flat`: the FAISS
    index storing `rows`, when FAISS's own scan may be chosen (see `_choose`)."""
    m, n = len(queries), len(rows)
    scores = np.full((m, k), PAD_SCORE, np.float32)
    pos = np.full((m, k), PAD_ID, np.int64)
    available = n if allowed is None else int(np.count_nonzero(allowed))
    if m == 0 or k == 0 or available == 0:
        return scores, pos
    take = min(k + EXTRA, available)
    queries = np.ascontiguousarray(queries, np.float32)
    if allowed is not None or flat is None:
        all_s, all_p, last = _torch_candidates(rows, queries, take, allowed)
    else:
        method = _choose(m, n, lambda name: _CANDIDATES[name](rows, queries, take, flat))
        all_s, all_p, last = _CANDIDATES[method](rows, queries, take, flat)
    got = min(k, available)
    order = np.lexsort((all_p, -all_s))[:, :got]
    scores[:, :got] = np.take_along_axis(all_s, order, axis=1)
    pos[:, :got] = np.take_along_axis(all_p, order, axis=1)
    # rows whose k-th score equals a cut-short block's last candidate: that tie may run past what was
    # taken, so the row is ranked again over every row (rare: exactly equal scores at the boundary)
    hidden = (last >= scores[:, got - 1 : got]).any(axis=1)
    for r in np.flatnonzero(hidden):
        full = rows @ queries[r]
        if allowed is not None:
            full = np.where(allowed, full, -np.inf)
        best = np.lexsort((np.arange(n), -full))[:got]
        scores[r, :got], pos[r, :got] = full[best], best
    return scores, pos


Candidates = tuple[np.ndarray, np.ndarray, np.ndarray]  # (m, c) scores, (m, c) positions, (m, b) lasts


def _torch_candidates(
    rows: np.ndarray, queries: np.ndarray, take: int, allowed: np.ndarray | None = None
) -> Candidates:
    """A torch GEMM + top-k per block of rows: each block's best `take` per query, and, per block cut
    short, its `take`-th score (a row tied with it may be missing; -inf where the block was whole)."""
    m, n = len(queries), len(rows)
    q, x = torch.from_numpy(queries), torch.from_numpy(rows)
    mask = None if allowed is None else torch.from_numpy(np.ascontiguousarray(allowed, bool))
    block = max(4096, SCORES_BYTES // (4 * m))
    cand_s, cand_p, last = [], [], []
    with torch.inference_mode():
        for start in range(0, n, block):
            stop = min(n, start + block)
            s = q @ x[start:stop].T
            if mask is not None:
                s.masked_fill_(~mask[start:stop], -torch.inf)
            t = min(take, stop - start)
            v, i = torch.topk(s, t, dim=1, sorted=True)
            cand_s.append(v)
            cand_p.append(i + start)
            last.append(v[:, -1] if stop - start > t else torch.full((m,), -torch.inf))
    return torch.cat(cand_s, 1).numpy(), torch.cat(cand_p, 1).numpy(), torch.stack(last, 1).numpy()


def _faiss_candidates(rows: np.ndarray, queries: np.ndarray, take: int, flat: faiss.IndexFlat) -> Candidates:
    """FAISS's own scan of `flat` (one GEMM for `BLAS_THRESHOLD` queries or more): the best `take`."""
    s, p = flat.search(queries, take)
    last = s[:, -1:] if take < len(rows) else np.full((len(queries), 1), -np.inf, np.float32)
    return s, p, last


# the candidates for an unfiltered search: (rows, queries, take, flat) -> Candidates
_CANDIDATES: dict[str, Callable[[np.ndarray, np.ndarray, int, faiss.IndexFlat], Candidates]] = {
    "torch": lambda rows, queries, take, _flat: _torch_candidates(rows, queries, take),
    "faiss": _faiss_candidates,
}
_chosen: dict[tuple[int, int], str] = {}
_choose_lock = threading.Lock()


def _shape_class(m: int, n: int) -> tuple[int, int]:
    """Batches by power of two (1, 2-3, ..., 64+), collections by power of four."""
    return min(m.bit_length(), 7), (max(n, 1).bit_length() + 1) // 2


def _choose(m: int, n: int, run: Callable[[str], object]) -> str:
    """The faster candidate for this shape class, measured on its first search (each timed once, after a
    warm-up run) and then kept for the process: which wins depends on the BLAS builds and the cores
    (docs/benchmarks.md, "Exact search"). Small collections are left to FAISS (no measurement)."""
    if n < SMALL:
        return "faiss"
    key = _shape_class(m, n)
    with _choose_lock:
        if key in _chosen:
            return _chosen[key]
    times = {}
    for name in _CANDIDATES:
        run(name)
        start = time.perf_counter()
        run(name)
        times[name] = time.perf_counter() - start
    best = min(times, key=lambda name: times[name])
    with _choose_lock:
        _chosen.setdefault(key, best)
        log.info("exact search, %d queries over %d vectors: %s (%s)", m, n, _chosen[key],
                 ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in times.items()))  # fmt: skip
        return _chosen[key]


def search_flat(
    index: faiss.Index, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """`index.search(queries, k)` for an inner-product flat index (see `flat_storage`), ids mapped;
    `allowed` (per stored row, bool) restricts it to those rows. None for any other layout."""
    storage = flat_storage(index)
    if storage is None:
        return None
    rows, ids = storage
    outer = faiss.downcast_index(index)
    inner = faiss.downcast_index(outer.index) if isinstance(outer, faiss.IndexIDMap) else outer
    assert isinstance(inner, faiss.IndexFlat), "flat_storage checked the layout"
    scores, pos = search_rows(rows, queries, k, allowed, inner)
    if ids is not None:
        pos = np.where(pos >= 0, ids[np.maximum(pos, 0)], PAD_ID)
    return scores, pos


def canonical(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A FAISS result with equal scores in ascending id order (this module's tie order, for an index
    whose ids ascend with position), padding last."""
    key = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((key, -scores))
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
