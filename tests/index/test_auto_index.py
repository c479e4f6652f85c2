"""`--index auto` spends its memory budget on recall: candidates measured, the budget kept, and a layout
below the recall target published only when the user accepts it."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from indexer.core.bundle.manifest import BundleManifest, IndexSpec
from indexer.core.bundle.selectors import Subset, search_subset
from indexer.index.build import (
    IndexBuildError,
    IndexConfig,
    LowRecallError,
    array_blocks,
    auto_candidates,
    build_index,
    build_index_trials,
    recall_at_10,
)


def clustered(n: int, d: int, clusters: int, seed: int = 0) -> np.ndarray:
    """Unit vectors around Gaussian centres, spread within a cluster about the spread between them."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


N, D = 6_000, 64
IDS = np.arange(N, dtype=np.int64) * 3 + 5  # item ids, not positions


@pytest.fixture(scope="module")
def xb() -> np.ndarray:
    return clustered(N, D, 60)


def _recall(index: faiss.Index, xb: np.ndarray, seed: int = 9) -> float:
    xq = xb[np.random.default_rng(seed).choice(N, 200, replace=False)]
    truth = IDS[np.argsort(-(xq @ xb.T), axis=1)[:, :10]]
    _, found = index.search(xq, 10)
    return recall_at_10(found, truth)


def test_auto_reaches_the_target_where_plain_pq_does_not(xb):
    budget = 2 << 20  # 2 MiB: flat vectors (1.5 MiB + ids) are left out by exact_max, HNSW does not fit
    cfg = IndexConfig(exact_max=0, max_memory=budget, recall_queries=200)
    plain, plain_spec = build_index(
        array_blocks(xb), IDS, D, IndexConfig(kind="IVF64,PQ8x4", recall_queries=200)
    )
    assert plain_spec.recall_at_10 is not None and plain_spec.recall_at_10 < cfg.recall_target
    index, spec, trials = build_index_trials(array_blocks(xb), IDS, D, cfg)
    assert spec.recall_at_10 is not None and spec.recall_at_10 >= cfg.recall_target
    assert spec.recall_warning is None
    assert not spec.factory.startswith("HNSW") and spec.factory != "Flat"
    chosen = next(t for t in trials if t.factory == spec.factory)
    reaching = [t for t in trials if t.recall >= cfg.recall_target]
    assert chosen.p50_ms == min(t.p50_ms for t in reaching), "the fastest layout reaching the target"
    # the budget holds: each candidate's estimate, and the index as FAISS serialises it
    assert all(t.bytes <= budget for t in trials)
    assert len(faiss.serialize_index(index)) <= budget
    # the recorded recall is what searching with the recorded params gives on other queries
    assert abs(_recall(index, xb) - spec.recall_at_10) < 0.05
    assert _recall(index, xb) > _recall(plain, xb) + 0.1


def test_candidates_fit_the_budget_and_train_enough_points():
    cands = auto_candidates(1_000_000, 512, IndexConfig(max_memory=1 << 30))
    names = [c.factory for c in cands]
    assert all(c.bytes <= 1 << 30 for c in cands) and names
    assert not any(n.startswith("HNSW") for n in names), "HNSW over 1M float vectors needs > 2 GiB"
    assert any("Refine(" in n for n in names) and any(n.endswith(",SQ8") for n in names)
    from indexer.index.build import nlist_for, train_size

    nlist = nlist_for(1_000_000)
    assert train_size(1_000_000, nlist, IndexConfig()) >= 39 * nlist
    assert auto_candidates(1_000_000, 512, IndexConfig(max_memory=1 << 20)) == []


def test_refined_layout_serves_filtered_search(xb):
    cfg = IndexConfig(kind="IVF64,PQ8x4,Refine(SQ8)", recall_queries=100)
    index, spec = build_index(array_blocks(xb), IDS, D, cfg)
    assert "k_factor_rf" in spec.params
    allowed = IDS[::7]
    _, found = search_subset(index, xb[:5], 10, Subset(np.sort(allowed)))
    assert set(found.ravel()) - {-1} <= set(allowed.tolist())
    assert (found[:, 0] >= 0).all()


def test_below_target_fails_unless_accepted(xb):
    tight = IndexConfig(exact_max=0, max_memory=100_000, recall_queries=200)  # room for plain PQ only
    assert [c.factory for c in auto_candidates(N, D, tight)] == ["IVF64,PQ8x4"]
    with pytest.raises(LowRecallError, match="--accept-low-recall"):
        build_index(array_blocks(xb), IDS, D, tight)
    index, spec = build_index(
        array_blocks(xb), IDS, D, IndexConfig(**{**tight.__dict__, "accept_low_recall": True})
    )
    assert spec.recall_at_10 is not None and spec.recall_at_10 < tight.recall_target
    assert spec.recall_warning and f"{spec.recall_at_10:.3f}" in spec.recall_warning
    assert index.ntotal == N


def _manifest(spec: IndexSpec) -> BundleManifest:
    return BundleManifest.model_validate(
        {
            "version": "v1",
            "created_at": "2026-01-01T00:00:00Z",
            "model": {"name": "m", "fingerprint": "f", "embed_dim": 4, "image_size": 8, "context_length": 4},
            "images": spec.model_dump(),
            "texts": {"file": "texts.faiss", "count": 0},
            "files": {},
        }
    )


def test_manifest_round_trip_keeps_the_warning_and_old_manifests_read():
    warned = IndexSpec(
        file="images.faiss", count=9, factory="IVF1,PQ2", recall_at_10=0.4, recall_warning="low"
    )
    m = _manifest(warned)
    back = BundleManifest.model_validate_json(m.to_json())
    assert back.images.recall_warning == "low" and back == m
    plain = _manifest(IndexSpec(file="images.faiss", count=9))
    assert "recall_warning" not in plain.to_json(), "bundles without a warning read in older versions"
    assert BundleManifest.model_validate_json(plain.to_json()).images.recall_warning is None


def low_rank(n: int, d: int, rank: int, seed: int = 0) -> np.ndarray:
    """Unit vectors whose spread lives in `rank` dimensions, all offset by one shared direction (as CLIP
    embeddings share a large common component): a projection can keep nearly all of it."""
    rng = np.random.default_rng(seed)
    mean = rng.standard_normal(d).astype(np.float32)
    basis = rng.standard_normal((rank, d)).astype(np.float32) / np.sqrt(rank)
    x = rng.standard_normal((n, rank)).astype(np.float32) @ basis * 0.5 + mean / np.linalg.norm(mean)
    x += 0.02 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def xl() -> np.ndarray:
    return low_rank(N, D, 8)


def test_a_projection_keeps_inner_products_where_faiss_pca_does_not(xl):
    index, spec = build_index(
        array_blocks(xl), IDS, D, IndexConfig(kind="PCA16,IVF64,SQ8", recall_queries=200)
    )
    assert spec.factory == "PCA16,IVF64,SQ8" and spec.recall_at_10 is not None
    assert _recall(index, xl) >= 0.9
    # FAISS's own PCA stage centres the vectors; under inner product every item's score then carries a
    # bias of its own (<mean, x>), which costs most of the recall on data with a common component
    theirs = faiss.index_factory(D, "PCA16,IVF64,SQ8", faiss.METRIC_INNER_PRODUCT)
    theirs.train(xl)
    theirs.add_with_ids(xl, IDS)
    faiss.extract_index_ivf(theirs).nprobe = 64  # every list: only the projection is compared
    faiss.extract_index_ivf(index).nprobe = 64
    assert _recall(index, xl) > _recall(theirs, xl) + 0.1
    # what is written is what is read: same results, and codes map back into the vectors' own space
    back = faiss.deserialize_index(faiss.serialize_index(index))
    np.testing.assert_array_equal(back.search(xl[:20], 10)[1], index.search(xl[:20], 10)[1])
    allowed = np.sort(IDS[::50])
    scores, found = search_subset(back, xl[:5], 10, Subset(allowed))
    truth = allowed[np.argsort(-(xl[:5] @ xl[::50].T), axis=1)[:, :10]]
    assert recall_at_10(found, truth) >= 0.9
    np.testing.assert_allclose(scores[:, 0], np.sort(xl[:5] @ xl[::50].T, axis=1)[:, -1], atol=0.02)


def test_auto_projects_where_full_codes_do_not_fit(xl):
    budget = 220_000  # 8-bit codes of all 64 dimensions (6000 x 72 B = 432 kB) do not fit, 16 of them do
    cfg = IndexConfig(exact_max=0, max_memory=budget, recall_queries=200)
    names = [c.factory for c in auto_candidates(N, D, cfg)]
    assert not any(n.endswith(",SQ8") and not n.startswith("PCA") for n in names)
    index, spec, trials = build_index_trials(array_blocks(xl), IDS, D, cfg)
    assert spec.factory.startswith("PCA") and spec.recall_at_10 is not None
    assert spec.recall_at_10 >= cfg.recall_target and spec.recall_warning is None
    assert len(faiss.serialize_index(index)) <= budget
    assert abs(_recall(index, xl) - spec.recall_at_10) < 0.05
    # it was tried first among the layouts for small budgets, and reached the target: none after it ran
    assert [t.factory for t in trials] == [spec.factory]


def test_the_projection_is_offered_only_when_full_codes_do_not_fit():
    big = [c.factory for c in auto_candidates(1_000_000, 512, IndexConfig(max_memory=1 << 30))]
    assert not any(n.startswith("PCA") for n in big), "8-bit codes of every dimension fit 1M in 1 GiB"
    ten = auto_candidates(10_000_000, 512, IndexConfig(max_memory=1 << 30))
    assert ten[0].factory == "PCA96,IVF4096,SQ8" and ten[0].bytes <= 1 << 30
    with pytest.raises(IndexBuildError, match="PCA"):
        build_index(array_blocks(low_rank(500, D, 4)), np.arange(500), D, IndexConfig(kind="PCA64,IVF4,SQ8"))
