"""Exact (flat) inner-product search of a batch of queries in one pass over the stored vectors.

faiss-cpu 1.15.1 ships `distance_compute_blas_threshold = 128000`: a flat index scans every batch of
fewer than 128,000 queries query by query (one core, one pass over the vectors per query), so
micro-batching the service's queries saved nothing at the search step. Measured on the 2-core machine
(docs/benchmarks.md, "Exact search"), a torch GEMM + top-k over the very float32 rows FAISS stores (no
copy) beat both FAISS's default and FAISS's own BLAS path (threshold lowered): it reads the vectors once
per batch, and a single query also uses every intra-op thread. Half-precision storage was measured too
and not taken: torch's CPU fp16 GEMM is slower than fp32 for a batch (it is faster only for one query).

What it returns equals `faiss.IndexFlatIP.search` on the same index: the same ids, scores to float
rounding (a different GEMM kernel sums in a different order), rows padded with id -1 and FAISS's
sentinel score `-FLT_MAX` where fewer than `k` vectors exist (or are allowed). Ties: FAISS's order among
equal scores is an artefact of its heap (it differs with `k`), so ours is defined instead: equal scores
in ascending stored position (for an id-mapped index, position of insertion), and where a tie straddles
the `k`-th place the lowest positions are kept. `canonical` puts a FAISS result in that order, for tests
and benchmarks comparing the two.

Also here: `BLAS_THRESHOLD`, set on import, so FAISS's own flat searches of a batch (a range search in
`duplicates`, an IVF coarse quantiser, an exact copy in `selectors`) go through one GEMM as well.
"""

from __future__ import annotations

import faiss
import numpy as np
import torch

BLAS_THRESHOLD = 20  # FAISS's default before 1.8: batches of this many queries or more share one GEMM
faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
PAD_ID = -1
PAD_SCORE = float(-np.finfo(np.float32).max)  # what FAISS returns beside id -1
SCORES_BYTES = 64 << 20  # the (queries x rows) score block one GEMM writes, at most
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
    rows: np.ndarray, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The `k` best rows of `rows` ((n, d) float32) by inner product with each of `queries` ((m, d)):
    (scores (m, k) float32, positions (m, k) int64), best first, ties by ascending position, padded with
    -1 / `PAD_SCORE`. `allowed`: (n,) bool, the only rows that may be returned."""
    m, n = len(queries), len(rows)
    scores = np.full((m, k), PAD_SCORE, np.float32)
    pos = np.full((m, k), PAD_ID, np.int64)
    available = n if allowed is None else int(np.count_nonzero(allowed))
    if m == 0 or k == 0 or available == 0:
        return scores, pos
    q = torch.from_numpy(np.ascontiguousarray(queries, np.float32))
    x = torch.from_numpy(rows)
    mask = None if allowed is None else torch.from_numpy(np.ascontiguousarray(allowed, bool))
    block = max(4096, SCORES_BYTES // (4 * m))
    take = min(k + EXTRA, available)
    cand_s, cand_p, last = [], [], []  # per block: its best `take`, and its `take`-th score
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
            # a block cut short where more rows remain may hide rows tied with its last candidate
            last.append(v[:, -1] if stop - start > t else torch.full((m,), -torch.inf))
    all_s = torch.cat(cand_s, dim=1).numpy()
    all_p = torch.cat(cand_p, dim=1).numpy()
    got = min(k, available)
    order = np.lexsort((all_p, -all_s))[:, :got]
    scores[:, :got] = np.take_along_axis(all_s, order, axis=1)
    pos[:, :got] = np.take_along_axis(all_p, order, axis=1)
    # rows whose k-th score equals a cut-short block's last candidate: that tie may run past what was
    # taken, so the row is ranked again over every row (rare: exactly equal scores at the boundary)
    hidden = (torch.stack(last, dim=1).numpy() >= scores[:, got - 1 : got]).any(axis=1)
    for r in np.flatnonzero(hidden):
        full = rows @ queries[r]
        if allowed is not None:
            full = np.where(allowed, full, -np.inf)
        best = np.lexsort((np.arange(n), -full))[:got]
        scores[r, :got], pos[r, :got] = full[best], best
    return scores, pos


def search_flat(
    index: faiss.Index, queries: np.ndarray, k: int, allowed: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray] | None:
    """`index.search(queries, k)` for an inner-product flat index (see `flat_storage`), ids mapped;
    `allowed` (per stored row, bool) restricts it to those rows. None for any other layout."""
    storage = flat_storage(index)
    if storage is None:
        return None
    rows, ids = storage
    scores, pos = search_rows(rows, queries, k, allowed)
    if ids is not None:
        pos = np.where(pos >= 0, ids[np.maximum(pos, 0)], PAD_ID)
    return scores, pos


def canonical(scores: np.ndarray, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A FAISS result with equal scores in ascending id order (this module's tie order, for an index
    whose ids ascend with position), padding last."""
    key = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    order = np.lexsort((key, -scores))
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(ids, order, axis=1)
