"""FAISS index building: exact inner product over L2-normalised vectors, or an ANN index chosen to fit a
memory budget, trained on a sample and scored against exact search (recall@10) on held-out queries.

FAISS ids are item ids. `D, I, xb, xq` keep FAISS's meaning inside this module only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from indexer.core.bundle.manifest import IndexSpec
from indexer.core.errors import ClipsearchError

log = logging.getLogger(__name__)

NAMED = ("auto", "flat", "hnsw", "ivfpq")
HNSW_M = 32
# Search-time knobs tried in order; the first that reaches the recall target is written to the manifest.
EF_SEARCH = (16, 32, 64, 128, 256, 512)
NPROBE = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class IndexBuildError(ClipsearchError, ValueError):
    """An index type that cannot be built for this collection (bad factory string, too few vectors)."""


@dataclass(frozen=True)
class IndexConfig:
    kind: str = "auto"  # auto | flat | hnsw | ivfpq | any faiss.index_factory string
    max_memory: int = 4 << 30  # bytes the index may take in RAM (`--max-index-memory`)
    exact_max: int = 200_000  # `auto` keeps exact search up to this many vectors (~10 ms/query at 512-d)
    train_sample: int = 100_000  # vectors used to train IVF/PQ
    recall_target: float = 0.95  # `auto` tunes nprobe/efSearch until recall@10 reaches this
    recall_queries: int = 500  # held-out queries for measuring recall@10
    seed: int = 0


def flat_bytes(n: int, d: int) -> int:
    return n * d * 4 + n * 8


def hnsw_bytes(n: int, d: int) -> int:
    # vectors + level-0 links (2M int32) + upper levels (~M/ (M-1) extra) + the id map
    return n * (d * 4 + HNSW_M * 2 * 4 + HNSW_M * 4 // 2 + 8)


def ivfpq_factory(n: int, d: int, max_memory: int) -> str:
    """`IVF{nlist},PQ{m}x{nbits}` with nlist ~ 4 sqrt(n) and the largest PQ code that fits memory."""
    nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
    nbits = 8 if n >= 256 * 39 else 4  # k-means needs ~39 points per centroid
    budget = max_memory - nlist * d * 4
    for m in (64, 48, 32, 24, 16, 12, 8, 4, 2, 1):
        if d % m == 0 and m <= d and n * (m * nbits // 8 + 8) <= budget:
            return f"IVF{nlist},PQ{m}x{nbits}"
    raise IndexBuildError(
        f"{n:,} vectors do not fit in --max-index-memory={max_memory:,} bytes even as IVF-PQ; raise it"
    )


def choose_factory(n: int, d: int, cfg: IndexConfig) -> str:
    """The FAISS factory string for `cfg.kind` at this collection size."""
    kind = cfg.kind
    if kind == "flat" or n == 0:
        return "Flat"
    if kind == "hnsw":
        return f"HNSW{HNSW_M}"
    if kind == "ivfpq":
        return ivfpq_factory(n, d, cfg.max_memory)
    if kind != "auto":
        return kind
    if n <= cfg.exact_max and flat_bytes(n, d) <= cfg.max_memory:
        return "Flat"
    if hnsw_bytes(n, d) <= cfg.max_memory:
        return f"HNSW{HNSW_M}"
    return ivfpq_factory(n, d, cfg.max_memory)


def validate_factory(kind: str, d: int = 64) -> None:
    """Raise `IndexBuildError` now (before any embedding) if `kind` is not something FAISS can build."""
    if kind in NAMED:
        return
    try:
        faiss.index_factory(d, kind, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else "invalid"
        raise IndexBuildError(f"--index {kind!r} is not a valid FAISS index_factory string ({msg})") from None


def _is_exact(factory: str) -> bool:
    return factory.replace("IDMap2,", "").replace("IDMap,", "") in ("Flat", "FlatIP")


def _new_index(d: int, factory: str) -> faiss.Index:
    if _is_exact(factory):
        return faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    try:
        return faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise IndexBuildError(f"cannot build FAISS index {factory!r}: {str(e).strip()[-200:]}") from None


Blocks = Callable[[], Iterator[np.ndarray]]  # a fresh pass over the (n, d) vectors, in `ids` order


def _train(index: faiss.Index, blocks: Blocks, n: int, cfg: IndexConfig) -> np.ndarray:
    """Train on a random sample; returns a mask of the rows used (they are not used as recall queries)."""
    rng = np.random.default_rng(cfg.seed)
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=min(n, cfg.train_sample), replace=False)] = True
    if index.is_trained:
        return mask
    sample, start = [], 0
    for xb in blocks():
        sample.append(xb[mask[start : start + len(xb)]])
        start += len(xb)
    try:
        index.train(np.concatenate(sample))
    except RuntimeError as e:
        raise IndexBuildError(
            f"training the index failed on {mask.sum()} vectors: {str(e).strip()[-200:]}"
        ) from None
    return mask


def _add(index: faiss.Index, blocks: Blocks, ids: np.ndarray) -> faiss.Index:
    start = 0
    for xb in blocks():
        part = ids[start : start + len(xb)]
        try:
            index.add_with_ids(xb, part)
        except RuntimeError:
            if start or isinstance(index, faiss.IndexIDMap):
                raise
            index = faiss.IndexIDMap2(index)  # e.g. HNSW stores no ids itself
            index.add_with_ids(xb, part)
        start += len(xb)
    return index


def build_index(blocks: Blocks, ids: np.ndarray, d: int, cfg: IndexConfig) -> tuple[faiss.Index, IndexSpec]:
    """Build the index for the vectors `blocks()` yields, with FAISS ids = `ids`.

    Returns the index and its IndexSpec (without `file`, which the caller names).
    """
    n = len(ids)
    factory = choose_factory(n, d, cfg)
    index = _new_index(d, factory)
    if _is_exact(factory):
        index = _add(index, blocks, ids)
        return index, IndexSpec(file="", count=n, factory="Flat", recall_at_10=None)
    trained = _train(index, blocks, n, cfg)
    index = _add(index, blocks, ids)
    recall, params = tune_recall(index, blocks, ids, trained, cfg)
    log.info("%s over %d vectors: recall@10 %.3f vs exact with %s", factory, n, recall, params or "defaults")
    return index, IndexSpec(file="", count=n, factory=factory, recall_at_10=recall, params=params)


def _queries(blocks: Blocks, trained: np.ndarray, cfg: IndexConfig) -> np.ndarray:
    """Held-out vectors (not in the training sample when there are enough of them) used as queries."""
    n = len(trained)
    pool = np.flatnonzero(~trained) if (~trained).sum() >= min(cfg.recall_queries, n) else np.arange(n)
    rng = np.random.default_rng(cfg.seed + 1)
    pick = np.zeros(n, dtype=bool)
    pick[rng.choice(pool, size=min(cfg.recall_queries, len(pool)), replace=False)] = True
    out, start = [], 0
    for xb in blocks():
        out.append(xb[pick[start : start + len(xb)]])
        start += len(xb)
    return np.concatenate(out)


def recall_at_10(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of the true top-10 ids found in the returned top-10 (both (nq, 10) id arrays)."""
    k = min(10, truth.shape[1])
    hits = [len(set(f[:k]) & set(t[:k]) - {-1}) / k for f, t in zip(found, truth, strict=True)]
    return float(np.mean(hits)) if hits else 1.0


def tune_recall(
    index: faiss.Index, blocks: Blocks, ids: np.ndarray, trained: np.ndarray, cfg: IndexConfig
) -> tuple[float, dict[str, int]]:
    """Measured recall@10 vs exact search, after choosing the cheapest nprobe/efSearch reaching the target."""
    xq = _queries(blocks, trained, cfg)
    k = min(10, len(ids))
    _, gt_pos = knn_ground_truth(xq, blocks(), k, metric_type=faiss.METRIC_INNER_PRODUCT)  # type: ignore[no-untyped-call]
    truth = ids[gt_pos]
    ladder = _ladder(index)
    best: tuple[float, dict[str, int]] = (0.0, {})
    ps = faiss.ParameterSpace()
    for name, value in ladder:
        ps.set_index_parameters(index, f"{name}={value}")  # type: ignore[arg-type]
        _, found = index.search(xq, k)
        best = (recall_at_10(found, truth), {name: value})
        if best[0] >= cfg.recall_target:
            break
    if not ladder:
        _, found = index.search(xq, k)
        best = (recall_at_10(found, truth), {})
    return round(best[0], 4), best[1]


def _ladder(index: faiss.Index) -> list[tuple[str, int]]:
    try:
        nlist = faiss.extract_index_ivf(index).nlist
        return [("nprobe", p) for p in NPROBE if p <= nlist]
    except RuntimeError:
        pass
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexHNSW):
        return [("efSearch", e) for e in EF_SEARCH]
    return []


def array_blocks(x: np.ndarray, block: int = 4096) -> Blocks:
    """`Blocks` over an in-memory array (tests and small collections)."""

    def gen() -> Iterator[np.ndarray]:
        for i in range(0, len(x), block):
            yield x[i : i + block]

    return gen


def search_ids(index: faiss.Index, queries: np.ndarray, k: int) -> Iterable[np.ndarray]:
    """Top-k item ids per query row (convenience for tests and benchmarks)."""
    _, found = index.search(np.ascontiguousarray(queries, np.float32), k)
    return found
