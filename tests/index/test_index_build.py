"""FAISS building: exact search against brute-force numpy, ANN recall measured and recorded."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.core.bundle.read import open_bundle
from indexer.index.build import (
    IndexBuildError,
    IndexConfig,
    array_blocks,
    auto_candidates,
    build_index,
    choose_factory,
    recall_at_10,
    validate_factory,
)
from tests.index.helpers import make_folder, run_index


def _unit(n: int, d: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_flat_matches_brute_force_with_item_ids():
    xb, xq = _unit(1000, 32, 0), _unit(20, 32, 1)
    ids = np.arange(1000, dtype=np.int64) * 7 + 3  # ids are item ids, not positions
    index, spec = build_index(array_blocks(xb, 128), ids, 32, IndexConfig(kind="flat"))
    assert spec.factory == "Flat" and spec.recall_at_10 is None and spec.count == 1000
    scores, found = index.search(xq, 10)
    order = np.argsort(-(xq @ xb.T), axis=1)[:, :10]
    np.testing.assert_array_equal(found, ids[order])
    np.testing.assert_allclose(scores, np.take_along_axis(xq @ xb.T, order, axis=1), rtol=1e-5)


@pytest.mark.parametrize(
    ("kind", "param"), [("hnsw", "efSearch"), ("ivfpq", "nprobe"), ("IVF16,Flat", "nprobe")]
)
def test_ann_recall_is_measured_against_exact(kind, param):
    xb = _unit(3000, 32, 2)
    ids = np.arange(3000, dtype=np.int64) + 100
    index, spec = build_index(array_blocks(xb, 1000), ids, 32, IndexConfig(kind=kind, recall_queries=100))
    assert spec.recall_at_10 is not None and 0 < spec.recall_at_10 <= 1
    assert param in spec.params
    # The reported figure is the one a user gets with those params on fresh held-out-style queries.
    xq = xb[np.random.default_rng(5).choice(3000, 100, replace=False)]
    truth = ids[np.argsort(-(xq @ xb.T), axis=1)[:, :10]]
    _, found = index.search(xq, 10)
    assert abs(recall_at_10(found, truth) - spec.recall_at_10) < 0.15


def test_auto_stays_exact_while_small_and_measures_past_the_limit():
    cfg = IndexConfig(exact_max=1000, max_memory=1 << 30)
    assert choose_factory(1000, 512, cfg) == "Flat"
    assert choose_factory(1001, 512, cfg) == "auto"
    assert choose_factory(50, 512, IndexConfig(max_memory=10_000)) == "auto", "flat does not fit"
    assert [c.factory for c in auto_candidates(2000, 512, cfg)][:2] == ["HNSW32", "IVF32,SQ8"]


def test_recall_at_10_counts_overlap():
    truth = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
    assert recall_at_10(truth, truth) == 1.0
    assert recall_at_10(np.array([[1, 2, 3, 4, 5, 99, 98, 97, 96, 95]]), truth) == 0.5


def test_invalid_factory_is_a_user_error():
    with pytest.raises(IndexBuildError, match="not a valid FAISS"):
        validate_factory("NotAnIndex123")
    with pytest.raises(IndexBuildError, match="training"):
        build_index(array_blocks(_unit(20, 32, 0)), np.arange(20), 32, IndexConfig(kind="IVF4096,Flat"))


def test_bundle_records_ann_recall_and_params_the_service_applies(tiny_model_dir, tmp_path):
    src = make_folder(tmp_path / "p", 40, captions=False)
    res = run_index(tiny_model_dir, src, tmp_path / "b", index=IndexConfig(exact_max=10), batch_size=16)
    b = open_bundle(tmp_path / "b")
    spec = b.manifest.images
    assert spec.factory != "Flat" and spec.recall_at_10 is not None and spec.recall_at_10 >= 0.95
    assert b.manifest.texts.count == 0 and b.manifest.texts.factory == "Flat"
    import faiss

    if "efSearch" in spec.params:
        assert faiss.downcast_index(b.image_index.index).hnsw.efSearch == spec.params["efSearch"]
    else:
        assert faiss.extract_index_ivf(b.image_index).nprobe == spec.params["nprobe"]
    assert res.images == 40 == b.image_index.ntotal
    b.close()
