"""The exact search path (`indexer.core.bundle.exact`) returns what `faiss.IndexFlatIP.search` returns."""

from __future__ import annotations

import faiss
import numpy as np
import pytest

from indexer.core.bundle import exact
from indexer.core.bundle.exact import PAD_SCORE, canonical, search_flat, search_rows
from indexer.core.bundle.read import _search_index
from indexer.core.bundle.selectors import Subset, search_subset


@pytest.fixture(params=["torch", "faiss"])
def method(request, monkeypatch):
    """Each test run with each candidate kernel forced (the measured choice picks one per shape)."""
    monkeypatch.setattr(exact, "_choose", lambda m, n, run: request.param)
    return request.param


def _unit(rng: np.random.Generator, n: int, d: int = 32) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _flat(x: np.ndarray, ids: np.ndarray | None = None) -> faiss.Index:
    inner = faiss.IndexFlatIP(x.shape[1])
    if ids is None:
        inner.add(x)
        return inner
    index = faiss.IndexIDMap2(inner)
    index.add_with_ids(x, ids)
    return index


def _same(ours: tuple[np.ndarray, np.ndarray], theirs: tuple[np.ndarray, np.ndarray]) -> None:
    s, i = ours
    fs, fi = canonical(*theirs)
    assert s.dtype == np.float32 and i.dtype == np.int64 and s.shape == fs.shape
    np.testing.assert_array_equal(i, fi)
    np.testing.assert_allclose(s, fs, rtol=0, atol=1e-5)


@pytest.mark.parametrize("nq", [1, 3, 16, 64])
@pytest.mark.parametrize("k", [1, 10, 100])
def test_equals_faiss_flat_search(nq, k, method):
    rng = np.random.default_rng(nq * 1000 + k)
    x, q = _unit(rng, 2000), _unit(rng, nq)
    index = _flat(x)
    _same(search_flat(index, q, k), index.search(q, k))


def test_id_mapped_index_returns_its_ids(monkeypatch, method):
    rng = np.random.default_rng(1)
    x, q = _unit(rng, 10_000), _unit(rng, 5)
    index = _flat(x, np.arange(10_000, dtype=np.int64) * 7 + 3)
    monkeypatch.setattr(exact, "SCORES_BYTES", 4 * 5 * 4096)  # several blocks, merged
    _same(_search_index(index, q, 20), index.search(q, 20))


def test_k_larger_than_the_collection_pads_like_faiss(method):
    rng = np.random.default_rng(2)
    x, q = _unit(rng, 7), _unit(rng, 4)
    index = _flat(x, np.arange(10, 17, dtype=np.int64))
    s, i = search_flat(index, q, 12)
    fs, fi = index.search(q, 12)
    _same((s, i), (fs, fi))
    assert (i[:, 7:] == -1).all() and (s[:, 7:] == PAD_SCORE).all() and (fs[:, 7:] == PAD_SCORE).all()


def test_empty_index_and_empty_batch(method):
    index = faiss.IndexFlatIP(8)
    q = _unit(np.random.default_rng(3), 2, 8)
    _same(search_flat(index, q, 3), index.search(q, 3))
    s, i = search_flat(_flat(_unit(np.random.default_rng(4), 5, 8)), np.zeros((0, 8), np.float32), 3)
    assert s.shape == i.shape == (0, 3)


def test_ties_are_in_ascending_position_and_a_straddling_tie_keeps_the_lowest(monkeypatch, method):
    """FAISS's order among equal scores changes with k (its heap); ours is by position, and the set
    FAISS returns agrees wherever the tie is wholly inside k."""
    x = np.zeros((40, 4), np.float32)
    x[:, 0] = 1.0
    x[5, 0] = 2.0
    x[30:, 0] = 0.5
    q = np.array([[1.0, 0, 0, 0]], np.float32)
    index = _flat(x)
    s, i = search_flat(index, q, 4)
    assert i.tolist() == [[5, 0, 1, 2]] and s.tolist() == [[2.0, 1.0, 1.0, 1.0]]
    _same(search_flat(index, q, 30), index.search(q, 30))  # the 1.0 tie (29 rows) wholly inside k
    # a tie far longer than the candidates taken per block, cut by blocks: still the lowest positions
    monkeypatch.setattr(exact, "SCORES_BYTES", 4 * 4096)
    big = np.zeros((10_000, 4), np.float32)
    big[:, 0] = 1.0
    big[7777, 0] = 3.0
    s, i = search_flat(_flat(big), q, 5)
    assert i.tolist() == [[7777, 0, 1, 2, 3]]


def test_allowed_rows_only():
    rng = np.random.default_rng(5)
    x, q = _unit(rng, 500), _unit(rng, 6)
    allowed = rng.random(500) < 0.3
    s, i = search_rows(x, q, 400, allowed)
    n = int(allowed.sum())
    ref = faiss.IndexFlatIP(32)
    ref.add(x[allowed])
    fs, fi = canonical(*ref.search(q, 400))
    np.testing.assert_array_equal(i[:, :n], np.flatnonzero(allowed)[fi[:, :n]])
    np.testing.assert_allclose(s[:, :n], fs[:, :n], atol=1e-5)
    assert (i[:, n:] == -1).all() and (s[:, n:] == PAD_SCORE).all()


@pytest.mark.parametrize("share", [0.05, 0.6])  # a copy of the subset / every row with a mask
def test_filtered_flat_search_equals_faiss_with_a_selector(share):
    rng = np.random.default_rng(6)
    x, q = _unit(rng, 4000), _unit(rng, 9)
    ids = np.arange(4000, dtype=np.int64) * 2
    index = _flat(x, ids)
    keep = np.sort(rng.choice(ids, size=int(share * 4000), replace=False))
    bits = np.zeros(int(ids[-1]) + 1, bool)
    bits[keep] = True
    bitmap = np.packbits(bits, bitorder="little")
    sel = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
    want = index.search(q, 15, params=faiss.SearchParameters(sel=sel))
    _same(search_subset(index, q, 15, Subset(keep)), want)
    few = Subset(keep[:3])
    _, i = search_subset(index, q, 5, few)
    assert set(i[0, :3].tolist()) == set(keep[:3].tolist()) and (i[:, 3:] == -1).all()


def test_other_layouts_are_left_to_faiss():
    index = faiss.IndexFlatL2(8)
    index.add(_unit(np.random.default_rng(7), 10, 8))
    assert search_flat(index, _unit(np.random.default_rng(8), 1, 8), 3) is None
    hnsw = faiss.IndexHNSWFlat(8, 8, faiss.METRIC_INNER_PRODUCT)
    assert search_flat(hnsw, _unit(np.random.default_rng(8), 1, 8), 3) is None


def test_mapped_index_read_from_a_file(tmp_path, method):
    rng = np.random.default_rng(9)
    x, q = _unit(rng, 1000), _unit(rng, 16)
    faiss.write_index(_flat(x, np.arange(1000, dtype=np.int64) + 100), str(tmp_path / "i.faiss"))
    index = faiss.read_index(str(tmp_path / "i.faiss"), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
    _same(search_flat(index, q, 10), index.search(q, 10))


def test_the_bundle_searches_flat_layers_with_this_kernel_and_faiss_batches_share_a_gemm():
    """`_search_index` (every layer's search) gives this module's tie order, which FAISS's heap does not,
    and FAISS's own flat scans of 20 queries or more take its BLAS path (threshold set on import)."""
    x = np.zeros((6, 4), np.float32)
    x[:, 0] = 1.0
    x[2, 0] = 2.0
    q = np.array([[1.0, 0, 0, 0]], np.float32)
    index = _flat(x, np.arange(6, dtype=np.int64) + 10)
    assert _search_index(index, q, 4)[1].tolist() == [[12, 10, 11, 13]]
    assert faiss.cvar.distance_compute_blas_threshold == exact.BLAS_THRESHOLD == 20


def test_the_choice_is_measured_once_per_shape_class_and_small_ones_go_to_faiss(monkeypatch):
    calls: list[str] = []
    monkeypatch.setattr(exact, "_chosen", {})
    assert exact._choose(64, 1000, calls.append) == "faiss" and calls == []  # small: no measurement
    first = exact._choose(16, 100_000, calls.append)
    assert first in ("torch", "faiss") and sorted(calls) == ["faiss", "faiss", "torch", "torch"]
    assert exact._choose(17, 120_000, calls.append) == first and len(calls) == 4  # same class, kept
    exact._choose(1, 100_000, calls.append)
    assert len(calls) == 8  # another class is measured


def test_a_large_search_measures_then_equals_faiss(monkeypatch):
    monkeypatch.setattr(exact, "_chosen", {})
    rng = np.random.default_rng(10)
    x, q = _unit(rng, 70_000, 16), _unit(rng, 16, 16)
    index = _flat(x, np.arange(70_000, dtype=np.int64) + 1)
    _same(search_flat(index, q, 10), index.search(q, 10))
    assert next(iter(exact._chosen.values())) in ("torch", "faiss")
