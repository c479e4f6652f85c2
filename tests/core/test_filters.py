"""Metadata filters: parsing and validation, and filtered search inside FAISS checked against brute force
over the same filtered set, for every index type the indexer builds and across base + delta layers."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer.core.bundle.filters import FilterError, parse_filter
from indexer.core.bundle.items import Item, ItemStore, write_items
from indexer.core.bundle.layers import Layer, LayerStack
from indexer.core.bundle.read import _search_index
from indexer.index.build import IndexConfig, array_blocks, build_index
from indexer.index.segments import SegmentContents

DIM = 32
N = 4000
CATEGORIES = ("shoes", "bags", "hats", "coats")


def _item(i: int) -> Item:
    folder = f"/photos/{2020 + i % 5}"
    return Item(
        id=i,
        kind="image",
        path=f"{folder}/img{i:05d}.jpg",
        folder=folder,
        size=1000 + i,
        mtime=1_700_000_000.0 + i * 3600,
        width=100 + i % 300,
        height=50 + i % 7,
        taken_at=1_600_000_000.0 + i * 86400 if i % 2 else None,
        camera="Pixel 8" if i % 3 == 0 else ("iPhone 15" if i % 3 == 1 else None),
        fields={"category": CATEGORIES[i % 4], "price": float(i % 100), "tags": ("a", f"t{i % 10}")},
    )


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, list[Item]]:
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(20, DIM))
    x = (centers[rng.integers(0, 20, N)] + 0.3 * rng.normal(size=(N, DIM))).astype(np.float32)
    faiss.normalize_L2(x)
    return x, [_item(i) for i in range(N)]


def _stack(tmp: Path, x: np.ndarray, items: list[Item], kind: str, delta: int = 0) -> LayerStack:
    """A base over the first N - delta items (index `kind`), and a segment re-owning ids in it + new ones."""
    n_base = N - delta
    ids = np.arange(n_base, dtype=np.int64)
    cfg = IndexConfig(kind=kind, train_sample=n_base, recall_queries=50)
    index, spec = build_index(array_blocks(x[:n_base]), ids, DIM, cfg)
    if spec.params:
        faiss.ParameterSpace().set_index_parameters(
            index, ",".join(f"{k}={v}" for k, v in spec.params.items())
        )
    path = tmp / f"{kind}-{delta}.sqlite"
    write_items(path, items[:n_base])
    empty = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    layers = [Layer("base", "base", index, empty, store=ItemStore(path))]
    if delta:
        owned = list(range(n_base - delta, N))  # replaces `delta` base items, adds `delta` new ones
        rows = [items[i] for i in owned]
        seg = SegmentContents(frozenset(owned), rows, x[owned])
        layers.append(seg.layer(DIM, "seg"))
    return LayerStack(layers)


def _brute(x: np.ndarray, q: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
    sims = q @ x[allowed].T
    return allowed[np.argsort(-sims, axis=1)[:, :k]]


def _keep(items: list[Item], flt: dict) -> np.ndarray:
    """The ids a filter keeps, evaluated by hand in Python (the reference)."""
    return np.asarray([it.id for it in items if _match(it, flt)], np.int64)


def _match(it: Item, flt: dict) -> bool:
    for name, ops in flt.items():
        if name == "any":
            if not any(_match(it, f) for f in ops):
                return False
            continue
        raw = getattr(it, name, None) if name != "category" and name != "price" else it.fields.get(name)
        for op, v in ops.items():
            if raw is None:
                return False
            if op == "eq" and raw != v:
                return False
            if op == "in" and raw not in v:
                return False
            if op == "prefix" and not str(raw).startswith(v):
                return False
            if (
                op in ("gte", "gt", "lt", "lte")
                and not {
                    "gte": raw >= v,
                    "gt": raw > v,
                    "lt": raw < v,
                    "lte": raw <= v,
                }[op]
            ):
                return False
    return True


FILTERS = [
    {"category": {"in": ["shoes", "bags"]}},  # 50%
    {"folder": {"eq": "/photos/2021"}, "price": {"lt": 50}},  # 10%
    {"path": {"prefix": "/photos/2022/"}, "camera": {"eq": "Pixel 8"}, "width": {"gte": 200}},  # ~2%
    {"any": [{"size": {"lt": 1004}}, {"size": {"gte": 4998}}]},  # 0.1%: 4 items + the top two
]


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivfpq"])
@pytest.mark.parametrize("delta", [0, 200])
def test_filtered_search_matches_brute_force_over_the_filtered_set(tmp_path, data, kind, delta) -> None:
    x, items = data
    stack = _stack(tmp_path, x, items, kind, delta)
    rng = np.random.default_rng(1)
    q = x[rng.choice(N, 20, replace=False)] + 0.05 * rng.normal(size=(20, DIM)).astype(np.float32)
    faiss.normalize_L2(q)
    k = 10
    # An approximate index is held to the recall it reaches without a filter (IVF-PQ's codes are lossy).
    _, plain = stack.search("images", q, k, _search_index)
    floor = 1.0 if kind == "flat" else min(0.9, _recall(plain, _brute(x, q, _keep(items, {}), k)) - 0.05)
    for raw in FILTERS:
        allowed = _keep(items, raw)
        flt = parse_filter(raw, {"category", "price", "tags"})
        selection = stack.select("images", flt)
        assert sorted(np.concatenate([s.ids for s in selection]).tolist()) == allowed.tolist(), raw
        _, ids = stack.search("images", q, k, _search_index, selection)
        want = min(k, len(allowed))
        assert ((ids[:, :want] >= 0) & np.isin(ids[:, :want], allowed)).all(), raw  # k results, all allowed
        assert (ids[:, want:] == -1).all()
        truth = _brute(x, q, allowed, want)
        assert _recall(ids[:, :want], truth) >= floor, (raw, _recall(ids[:, :want], truth), floor)


def _recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found[:, :k], truth, strict=True)]))


def test_a_filter_keeping_a_tenth_of_a_percent_still_returns_k(tmp_path, data) -> None:
    x, items = data
    stack = _stack(tmp_path, x, items, "hnsw")
    raw = {"size": {"lt": 1000 + 10}, "tags": {"eq": "a"}}  # 10 of 4000 items: 0.25%; k = 4 of them
    flt = parse_filter(raw, {"tags"})
    _, ids = stack.search("images", x[3000:3005], 4, _search_index, stack.select("images", flt))
    assert (ids >= 0).all() and (ids < 10).all()


def test_list_fields_match_any_of_their_values(tmp_path, data) -> None:
    x, items = data
    stack = _stack(tmp_path, x, items, "flat")
    ids = np.concatenate([s.ids for s in stack.select("images", parse_filter({"tags": {"eq": "t3"}}))])
    assert ids.tolist() == [i for i in range(N) if i % 10 == 3]


def test_dates_cover_whole_days() -> None:
    day = parse_filter({"mtime": {"lte": "2024-06-30", "gte": "2024-06-01"}})
    bounds = {c.op: c.value for c in day.conds}
    assert bounds["gte"] == 1717200000.0  # 2024-06-01T00:00Z
    assert bounds["lte"] == 1719792000.0  # 2024-07-01T00:00Z: the 30th counts
    assert parse_filter({"taken_at": {"eq": "2024-06-01"}}).conds[0].value == (
        1717200000.0,
        1717286399.999999,
    )


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        ({"size": {"prefix": "1"}}, "size.prefix"),
        ({"width": {"gt": "wide"}}, "width.gt"),
        ({"path": {"eq": 3}}, "path.eq"),
        ({"path": {"between": [1, 2]}}, "path"),
        ({"path": "x"}, "path"),
        ({"colour": {"eq": "red"}}, "colour"),
        ({"any": []}, "any"),
        ({"any": [{"size": {"eq": "big"}}]}, "any[0].size.eq"),
        ({"taken_at": {"gte": "last summer"}}, "taken_at.gte"),
        ({"category": {"in": []}}, "category.in"),
        ([1, 2], ""),
    ],
)
def test_invalid_filters_name_the_field(raw, where) -> None:
    with pytest.raises(FilterError) as e:
        parse_filter(raw, {"category"})
    assert e.value.field == where
    assert str(e.value).startswith(f"filter.{where}" if where else "filter:")


@pytest.mark.parametrize("exact_max", [0, 1_000_000])  # HNSW's own storage scanned / a kept flat copy
def test_hnsw_exact_paths_match_brute_force(tmp_path, data, monkeypatch, exact_max) -> None:
    from indexer.core.bundle import selectors

    monkeypatch.setattr(selectors, "EXACT_MAX", exact_max)
    x, items = data
    stack = _stack(tmp_path, x, items, "hnsw", delta=200)
    raw = {"folder": {"eq": "/photos/2021"}, "price": {"lt": 50}}  # 10% of the items
    allowed = _keep(items, raw)
    _, ids = stack.search("images", x[:20], 10, _search_index, stack.select("images", parse_filter(raw)))
    want = _brute(x, x[:20], allowed, 10)
    assert np.isin(ids, allowed).all()
    # the same neighbours: their similarities equal to float rounding (the exact kernel may order two
    # scores within 1e-7 of each other differently from numpy's)
    got_s, want_s = (np.einsum("qd,qkd->qk", x[:20], x[i]) for i in (ids, want))
    np.testing.assert_allclose(got_s, want_s, atol=1e-6)


def test_field_names_are_read_from_the_item_store_once(tmp_path, data, monkeypatch) -> None:
    x, items = data
    stack = _stack(tmp_path, x, items, "flat", delta=100)
    reads = []
    real = ItemStore.field_types
    monkeypatch.setattr(ItemStore, "field_types", lambda self: reads.append(1) or real(self))
    names = [stack.field_names() for _ in range(5)]
    assert names[0] == {"category", "price", "tags"} and all(n == names[0] for n in names)
    assert stack.field_types() == {"category": ["str"], "price": ["float"], "tags": ["str"]}
    assert len(reads) == 1  # a layer never changes: every filtered search asked the store again


def test_field_types_name_every_type_a_field_holds_in_the_store_and_in_a_segment(tmp_path) -> None:
    x = np.eye(4, DIM, dtype=np.float32)
    base = [_item(0), _item(1)]
    base[0] = dataclasses.replace(base[0], fields={"code": 7, "note": "a"})
    base[1] = dataclasses.replace(base[1], fields={"code": "A7", "size_cm": 1.5})
    write_items(tmp_path / "b.sqlite", base)
    store = ItemStore(tmp_path / "b.sqlite")
    assert store.field_types() == {"code": {"int", "str"}, "note": {"str"}, "size_cm": {"float"}}
    empty = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    seg_item = dataclasses.replace(_item(2), fields={"size_cm": 3, "tags": ("x", "y")})
    seg = SegmentContents(frozenset([2]), [seg_item], x[2:3]).layer(DIM, "seg")
    stack = LayerStack([Layer("base", "base", empty, empty, store=store), seg])
    assert stack.field_types() == {
        "code": ["int", "str"],
        "note": ["str"],
        "size_cm": ["float", "int"],
        "tags": ["str"],
    }
    store.close()


@pytest.mark.parametrize("mmap", [False, True])
def test_a_small_subset_of_an_ivf_index_is_searched_exactly_from_its_decoded_vectors(tmp_path, mmap) -> None:
    """Probing 1 / selectivity times the lists misses neighbours a small subset spreads over all lists
    (uniform data: 50 of 256 lists hold about a fifth of them); the subset's decoded vectors, fewer bytes
    than those lists, are scanned exactly instead, from an index read as the service reads it."""
    from indexer.core.bundle.selectors import Subset, search_subset

    rng = np.random.default_rng(3)
    x = rng.normal(size=(20_000, DIM)).astype(np.float32)
    faiss.normalize_L2(x)
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(DIM), DIM, 256, faiss.METRIC_INNER_PRODUCT)
    ivf.train(x)
    ivf.add(x)  # no direct map: reconstructing needs one, made when the subset first needs it
    faiss.write_index(ivf, str(tmp_path / "ivf.faiss"))
    flags = faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0
    index = faiss.read_index(str(tmp_path / "ivf.faiss"), flags)
    index.nprobe = 1
    q = x[:20]
    small = np.sort(rng.choice(20_000, 400, replace=False)).astype(np.int64)  # 2%
    _, ids = search_subset(index, q, 10, Subset(small))
    np.testing.assert_array_equal(ids, _brute(x, q, small, 10))
    half = Subset(np.arange(0, 20_000, 2, dtype=np.int64))  # 50%: two lists are fewer bytes than a copy
    _, ids = search_subset(index, q, 10, half)
    assert np.isin(ids, half.ids).all() and half._exact is None
