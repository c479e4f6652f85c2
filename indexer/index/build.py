"""FAISS index building: exact inner product over L2-normalised vectors, or an ANN index chosen to fit a
memory budget, trained on a sample and scored against exact search (recall@10) on held-out queries.

FAISS ids are item ids. `D, I, xb, xq` keep FAISS's meaning inside this module only.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import faiss
import numpy as np
from faiss.contrib.exhaustive_search import knn_ground_truth

from indexer.core.bundle import exact  # noqa: F401  (sets FAISS's BLAS threshold: batches share one GEMM)
from indexer.core.bundle.manifest import IndexSpec
from indexer.core.errors import ClipsearchError

log = logging.getLogger(__name__)

NAMED = ("auto", "flat", "hnsw", "ivfpq")
HNSW_M = 32
HNSW_MAX = 100_000  # `auto` builds HNSW up to this many vectors (200k x 512-d took 297 s on 2 busy cores)
REFINE_K_FACTOR = 8  # a refined IVF-PQ re-ranks k * this many of its candidates exactly
# Search-time knobs tried in order; the first that reaches the recall target is written to the manifest.
EF_SEARCH = (16, 32, 64, 128, 256, 512)
NPROBE = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
PCA_MIN_DIMS = 16  # `auto` does not consider projecting to fewer dimensions than this


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
    accept_low_recall: bool = False  # `auto` publishes below the target instead of failing (warns)
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
    """The FAISS factory string for `cfg.kind` at this collection size ("auto": measured in `_choose`)."""
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
    return "auto"  # chosen by measurement among `auto_candidates`


def validate_factory(kind: str, d: int = 64) -> None:
    """Raise `IndexBuildError` now (before any embedding) if `kind` is not something FAISS can build."""
    if kind in NAMED:
        return
    try:
        faiss.index_factory(d, kind, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else "invalid"
        raise IndexBuildError(f"--index {kind!r} is not a valid FAISS index_factory string ({msg})") from None


def _nlist_of(index: faiss.Index) -> int:
    try:
        return int(faiss.extract_index_ivf(index).nlist)
    except RuntimeError:
        return 0


def _is_exact(factory: str) -> bool:
    return factory.replace("IDMap2,", "").replace("IDMap,", "") in ("Flat", "FlatIP")


_PCA = re.compile(r"PCA(\d+),(.+)")


def _new_index(d: int, factory: str) -> faiss.Index:
    if _is_exact(factory):
        return faiss.IndexIDMap2(faiss.IndexFlatIP(d))
    try:
        if pca := _PCA.fullmatch(factory):
            # not FAISS's own PCA stage, which centres the vectors: under inner product that adds a
            # per-item bias <mean, x> to every score; `_fit_projection` sets the matrix when training
            p = int(pca.group(1))
            if not 0 < p < d:
                raise IndexBuildError(
                    f"--index {factory!r}: PCA must project to between 1 and {d - 1} dimensions"
                )
            projection = faiss.LinearTransform(d, p, False)
            projection.is_trained = False
            return faiss.IndexPreTransform(
                projection, faiss.index_factory(p, pca.group(2), faiss.METRIC_INNER_PRODUCT)
            )
        return faiss.index_factory(d, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as e:
        raise IndexBuildError(f"cannot build FAISS index {factory!r}: {str(e).strip()[-200:]}") from None


Blocks = Callable[[], Iterator[np.ndarray]]  # a fresh pass over the (n, d) vectors, in `ids` order


def _sample_mask(n: int, size: int, cfg: IndexConfig) -> np.ndarray:
    rng = np.random.default_rng(cfg.seed)
    mask = np.zeros(n, dtype=bool)
    mask[rng.choice(n, size=min(n, size), replace=False)] = True
    return mask


def _train(
    index: faiss.Index, blocks: Blocks, n: int, cfg: IndexConfig, size: int, mask: np.ndarray | None = None
) -> np.ndarray:
    """Train on a random sample (streamed from `blocks`); returns a mask of the rows used (they are not
    used as recall queries)."""
    mask = _sample_mask(n, size, cfg) if mask is None else mask
    if index.is_trained:
        return mask
    try:
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        if isinstance(ivf, faiss.IndexIVFPQ):
            ivf.do_polysemous_training = False  # minutes at 512-d, and nothing here searches by Hamming
    except RuntimeError:
        pass
    sample, start = [], 0
    for xb in blocks():
        sample.append(xb[mask[start : start + len(xb)]])
        start += len(xb)
    xt = np.concatenate(sample)
    _fit_projection(index, xt)
    try:
        index.train(xt)
    except RuntimeError as e:
        raise IndexBuildError(
            f"training the index failed on {mask.sum()} vectors: {str(e).strip()[-200:]}"
        ) from None
    return mask


def _fit_projection(index: faiss.Index, xt: np.ndarray) -> None:
    """Set the matrix of a `PCA<p>,...` layout's untrained projection from the training sample `xt`.

    Inner products must survive the projection, so nothing is subtracted: x = mean + v gives
    <q, x> = <q, mean> + <q, v>, whose first term is the same for every item. The rows are the mean's
    direction and then the p - 1 principal directions of the centred sample orthogonal to it: the
    projection keeps the part all items share and the most of what tells them apart. Orthonormal rows,
    so `reconstruct` maps a code back into the original space."""
    if not isinstance(index, faiss.IndexPreTransform) or index.chain.size() == 0:
        return
    projection = faiss.downcast_VectorTransform(index.chain.at(0))
    if type(projection) is not faiss.LinearTransform or projection.is_trained:
        return
    p = projection.d_out
    x = xt.astype(np.float64)
    mean = x.mean(axis=0)
    rows = [mean / n] if (n := np.linalg.norm(mean)) > 1e-6 else []
    v = x - mean
    if rows:
        v -= np.outer(v @ rows[0], rows[0])  # the centred variance orthogonal to the mean
    _, vecs = np.linalg.eigh(v.T @ v)  # ascending eigenvalues
    a = np.vstack([*rows, vecs[:, ::-1][:, : p - len(rows)].T])
    faiss.copy_array_to_vector(np.ascontiguousarray(a, dtype=np.float32).ravel(), projection.A)
    projection.is_trained = True
    projection.set_is_orthonormal()


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


@dataclass(frozen=True)
class Candidate:
    """A layout `auto` may build: its factory string and the bytes it will take, estimated beforehand."""

    factory: str
    bytes: int
    fallback: bool = False  # tried only when no earlier candidate reached the recall target


@dataclass
class Trial:
    """One candidate as built and measured (benchmarks print these)."""

    factory: str
    bytes: int
    build_s: float
    recall: float
    params: dict[str, int]
    p50_ms: float


class LowRecallError(IndexBuildError):
    """No layout within the memory budget reaches the recall target (and it was not accepted)."""


def nlist_for(n: int) -> int:
    """Inverted lists ~ sqrt(n), a power of two, with at least 39 points per centroid."""
    want = 2 ** round(math.log2(max(1.0, math.sqrt(n))))
    return int(max(1, min(want, n // 39)))


def train_size(n: int, nlist: int, cfg: IndexConfig) -> int:
    """Training points: `cfg.train_sample`, raised to 64 per coarse centroid (FAISS wants 39-256)."""
    return min(n, max(cfg.train_sample, 64 * nlist, 256 * 39 if n >= 256 * 39 else 0))


IDMAP2_BYTES = 56  # per vector: the id array plus the reverse hash map of an IndexIDMap2


def _pca_bytes(n: int, d: int, p: int, nlist: int) -> int:
    return d * p * 4 + nlist * p * 4 + n * (p + 8)


def auto_candidates(n: int, d: int, cfg: IndexConfig) -> list[Candidate]:
    """The layouts `auto` considers past the exact limit that fit `cfg.max_memory`, cheapest to build first.

    Memory is estimated from the layout (codes + ids + centroids) before anything is built."""
    nlist = nlist_for(n)
    coarse = nlist * d * 4
    m = max(x for x in (64, 48, 32, 24, 16, 12, 8, 4, 2, 1) if d % x == 0 and x <= max(1, d // 8))
    nbits = 8 if n >= 256 * 39 else 4  # k-means needs ~39 points per centroid
    pq = f"PQ{m}x{nbits}"
    code = (m * nbits + 7) // 8
    out: list[Candidate] = []
    if n <= HNSW_MAX:
        out.append(Candidate(f"HNSW{HNSW_M}", hnsw_bytes(n, d) + n * IDMAP2_BYTES))
    # IVF over 8-bit scalar codes first: cheap to build (it trains the coarse centroids the others reuse)
    out.append(Candidate(f"IVF{nlist},SQ8", coarse + n * (d + 8)))
    # An IVF-PQ scan (m bytes a vector) re-ranked exactly by a finer copy: the first refinement that fits.
    for refine, per in (("Flat", 4 * d), ("SQfp16", 2 * d), ("SQ8", d)):
        size = coarse + n * (code + 8 + per + IDMAP2_BYTES)
        if size <= cfg.max_memory:
            out.append(Candidate(f"IVF{nlist},{pq},Refine({refine})", size))
            break
    out.append(Candidate(f"IVF{nlist},SQfp16", coarse + n * (2 * d + 8), fallback=True))
    # where full 8-bit codes do not fit: 8-bit codes of a projection onto the p dimensions the budget has
    # room for (not FAISS's own PCA: see `_new_index`); near-exact where the collection's spread lives in
    # few dimensions, cheap to try, and measured like every other candidate
    dims = [p for p in range(PCA_MIN_DIMS, d, 16) if _pca_bytes(n, d, p, nlist) <= cfg.max_memory]
    if dims and coarse + n * (d + 8) > cfg.max_memory:
        out.append(
            Candidate(f"PCA{dims[-1]},IVF{nlist},SQ8", _pca_bytes(n, d, dims[-1], nlist), fallback=True)
        )
    out.append(Candidate(f"OPQ{m},IVF{nlist},{pq}", coarse + d * d * 4 + n * (code + 8), fallback=True))
    out.append(Candidate(f"IVF{nlist},{pq}", coarse + n * (code + 8), fallback=True))
    return [c for c in out if c.bytes <= cfg.max_memory]


def build_index(blocks: Blocks, ids: np.ndarray, d: int, cfg: IndexConfig) -> tuple[faiss.Index, IndexSpec]:
    """Build the index for the vectors `blocks()` yields, with FAISS ids = `ids`.

    Returns the index and its IndexSpec (without `file`, which the caller names).
    """
    index, spec, _ = build_index_trials(blocks, ids, d, cfg)
    return index, spec


def build_index_trials(
    blocks: Blocks, ids: np.ndarray, d: int, cfg: IndexConfig
) -> tuple[faiss.Index, IndexSpec, list[Trial]]:
    """`build_index`, also returning what `auto` measured for each candidate it built."""
    n = len(ids)
    factory = choose_factory(n, d, cfg)
    if _is_exact(factory):
        index = _add(_new_index(d, factory), blocks, ids)
        return index, IndexSpec(file="", count=n, factory="Flat", recall_at_10=None), []
    if cfg.kind == "auto":
        return _choose(blocks, ids, d, cfg)
    index = _new_index(d, factory)
    trained = _train(index, blocks, n, cfg, train_size(n, _nlist_of(index), cfg))
    index = _add(index, blocks, ids)
    recall, params = tune_recall(index, blocks, ids, trained, cfg)
    log.info("%s over %d vectors: recall@10 %.3f vs exact with %s", factory, n, recall, params or "defaults")
    return index, IndexSpec(file="", count=n, factory=factory, recall_at_10=recall, params=params), []


def _choose(
    blocks: Blocks, ids: np.ndarray, d: int, cfg: IndexConfig
) -> tuple[faiss.Index, IndexSpec, list[Trial]]:
    """Build each candidate that fits, measure recall@10 (after tuning its knob) and single-query latency;
    keep the fastest reaching the target, else (with `accept_low_recall`) the one with the best recall."""
    n = len(ids)
    cands = auto_candidates(n, d, cfg)
    if not cands:
        raise IndexBuildError(
            f"{n:,} vectors do not fit in --max-index-memory={cfg.max_memory:,} bytes even as IVF-PQ; "
            "raise it"
        )
    nlist = nlist_for(n)
    trained = _sample_mask(n, train_size(n, nlist, cfg), cfg)
    xq, truth = _ground_truth(blocks, ids, trained, cfg)
    centroids: np.ndarray | None = None
    best: tuple[faiss.Index, Trial] | None = None
    trials: list[Trial] = []
    for cand in cands:
        if cand.fallback and best is not None and best[1].recall >= cfg.recall_target:
            continue
        start = time.perf_counter()
        index = _new_index(d, cand.factory)
        if centroids is not None and not _transformed(cand.factory):
            faiss.extract_index_ivf(index).quantizer.add(centroids)  # k-means once for all IVF layouts
        _train(index, blocks, n, cfg, int(trained.sum()), trained)
        index = _add(index, blocks, ids)
        built = time.perf_counter() - start
        if centroids is None and "IVF" in cand.factory and not _transformed(cand.factory):
            q = faiss.extract_index_ivf(index).quantizer
            centroids = q.reconstruct_n(0, q.ntotal)
        recall, params = _tune(index, xq, truth, cfg)
        trial = Trial(cand.factory, cand.bytes, round(built, 2), round(recall, 4), params, _p50_ms(index, xq))
        trials.append(trial)
        log.info(
            "auto: %s (%.0f MiB) built in %.1f s: recall@10 %.3f with %s, p50 %.2f ms a query",
            cand.factory, cand.bytes / 2**20, built, recall, params or "defaults", trial.p50_ms,
        )  # fmt: skip
        if best is None or _better(trial, best[1], cfg.recall_target):
            best = (index, trial)
        del index
    assert best is not None
    index, trial = best
    warning = None
    if trial.recall < cfg.recall_target:
        warning = (
            f"no index layout within --max-index-memory={cfg.max_memory / 2**30:.2f} GiB reaches recall@10 "
            f"{cfg.recall_target} on these {n:,} vectors; the best, {trial.factory}, reaches "
            f"{trial.recall:.3f}"
        )
        if not cfg.accept_low_recall:
            raise LowRecallError(f"{warning}: raise --max-index-memory, or pass --accept-low-recall")
        log.warning("LOW RECALL: %s (accepted with --accept-low-recall)", warning)
    log.info("auto chose %s: recall@10 %.3f, p50 %.2f ms", trial.factory, trial.recall, trial.p50_ms)
    spec = IndexSpec(
        file="",
        count=n,
        factory=trial.factory,
        recall_at_10=trial.recall,
        params=trial.params,
        recall_warning=warning,
    )
    return index, spec, trials


def _transformed(factory: str) -> bool:
    """A layout whose IVF lists live in another space than the vectors (their centroids are its own)."""
    return factory.startswith(("OPQ", "PCA"))


def _better(a: Trial, b: Trial, target: float) -> bool:
    """Reaching the target first, then lower latency; below it, higher recall."""
    if (a.recall >= target) != (b.recall >= target):
        return a.recall >= target
    if a.recall >= target:
        return a.p50_ms < b.p50_ms
    return a.recall > b.recall


def _p50_ms(index: faiss.Index, xq: np.ndarray, queries: int = 200) -> float:
    """Median time of one query at a time (k=10), after a few warm-up queries."""
    k = min(10, int(index.ntotal))
    for q in xq[:5]:
        index.search(q[None], k)
    times = []
    for q in xq[:queries]:
        t = time.perf_counter()
        index.search(q[None], k)
        times.append(time.perf_counter() - t)
    return round(float(np.median(times)) * 1000, 3)


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


def _ground_truth(
    blocks: Blocks, ids: np.ndarray, trained: np.ndarray, cfg: IndexConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Held-out queries and their exact top-10 item ids (one BLAS pass per block: FAISS's BLAS threshold
    is set for the process by `indexer.core.bundle.exact`)."""
    xq = _queries(blocks, trained, cfg)
    k = min(10, len(ids))
    _, gt_pos = knn_ground_truth(xq, blocks(), k, metric_type=faiss.METRIC_INNER_PRODUCT)  # type: ignore[no-untyped-call]
    return xq, ids[gt_pos]


def tune_recall(
    index: faiss.Index, blocks: Blocks, ids: np.ndarray, trained: np.ndarray, cfg: IndexConfig
) -> tuple[float, dict[str, int]]:
    """Measured recall@10 vs exact search, after choosing the cheapest nprobe/efSearch reaching the target."""
    xq, truth = _ground_truth(blocks, ids, trained, cfg)
    return _tune(index, xq, truth, cfg)


def _tune(
    index: faiss.Index, xq: np.ndarray, truth: np.ndarray, cfg: IndexConfig
) -> tuple[float, dict[str, int]]:
    k = truth.shape[1]
    ladder = _ladder(index)
    best: tuple[float, dict[str, int]] = (0.0, {})
    ps = faiss.ParameterSpace()
    for setting in ladder:
        ps.set_index_parameters(index, ",".join(f"{n}={v}" for n, v in setting.items()))  # type: ignore[arg-type]
        _, found = index.search(xq, k)
        best = (recall_at_10(found, truth), setting)
        if best[0] >= cfg.recall_target:
            break
    if not ladder:
        _, found = index.search(xq, k)
        best = (recall_at_10(found, truth), {})
    return round(best[0], 4), best[1]


def _ladder(index: faiss.Index) -> list[dict[str, int]]:
    refine = _refine(index)
    try:
        nlist = faiss.extract_index_ivf(index).nlist
        extra = {"k_factor_rf": REFINE_K_FACTOR} if refine else {}
        return [{"nprobe": p, **extra} for p in NPROBE if p <= nlist]
    except RuntimeError:
        pass
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    if isinstance(inner, faiss.IndexHNSW):
        return [{"efSearch": e} for e in EF_SEARCH]
    return []


def _refine(index: faiss.Index) -> bool:
    inner = faiss.downcast_index(index.index) if isinstance(index, faiss.IndexIDMap) else index
    return isinstance(inner, faiss.IndexRefine)


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
