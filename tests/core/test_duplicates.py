"""Near-duplicate groups by FAISS range search, checked against brute force over a collection with a known
set of copies, exact and through the IVF path, and one item's group."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest

from indexer.core.bundle import duplicates
from indexer.core.bundle.duplicates import duplicate_groups, group_of
from indexer.core.bundle.items import Item
from indexer.core.bundle.manifest import IndexSpec
from indexer.core.bundle.read import open_bundle
from indexer.core.encoder import Encoder
from indexer.index.publish import BundleContents, publish
from tests.conftest import run_cli

DIM = 32
N = 3000
GROUPS = [[5, 17, 2999], [100, 101], [7, 8, 9, 10]]  # ids whose vectors are (near) copies of the first


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, DIM)).astype(np.float32)
    for group in GROUPS:
        for i in group[1:]:
            x[i] = x[group[0]] + 0.01 * rng.normal(size=DIM)
    faiss.normalize_L2(x)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    index.add_with_ids(x, np.arange(N, dtype=np.int64))
    texts = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    out = tmp_path_factory.mktemp("dups")
    publish(
        out,
        BundleContents(
            model_dir=tiny_model_dir,
            model=Encoder.from_dir(tiny_model_dir, "cpu").info,
            image_index=index,
            text_index=texts,
            images=IndexSpec(file="images.faiss", count=N),
            texts=IndexSpec(file="texts.faiss", count=0),
            items=[Item(id=i, kind="image", path=f"/p/{i}.jpg") for i in range(N)],
        ),
    )
    return out


def _brute_groups(x: np.ndarray, threshold: float) -> list[list[int]]:
    sims = x @ x.T
    parent = list(range(len(x)))

    def find(i: int) -> int:
        while parent[i] != i:
            i = parent[i]
        return i

    for a, b in zip(*np.nonzero(sims >= threshold), strict=True):
        parent[max(find(a), find(b))] = min(find(a), find(b))
    groups: dict[int, list[int]] = {}
    for i in range(len(x)):
        groups.setdefault(find(i), []).append(i)
    return sorted((g for g in groups.values() if len(g) > 1), key=lambda g: (-len(g), g[0]))


@pytest.mark.parametrize("exact_max", [100_000, 100])  # exact, and the IVF path
def test_groups_match_brute_force(bundles: Path, monkeypatch: pytest.MonkeyPatch, exact_max: int) -> None:
    monkeypatch.setattr(duplicates, "EXACT_MAX", exact_max)
    b = open_bundle(bundles)
    try:
        x = b.stack.vectors("images", list(range(N)))
        groups = duplicate_groups(b, 0.95)
        assert (
            [[m.id for m in g] for g in groups]
            == _brute_groups(x, 0.95)
            == sorted(GROUPS, key=lambda g: (-len(g), g[0]))
        )
        first = groups[0]
        assert first[0].score == pytest.approx(1.0) and all(m.score >= 0.95 for m in first)
        assert first[1].path == f"/p/{first[1].id}.jpg"
        assert [m.id for m in group_of(b, 17, 0.95)] == [5, 17, 2999]
        assert [m.id for m in group_of(b, 42, 0.95)] == [42]
    finally:
        b.close()


@pytest.mark.slow  # two `clipsearch` processes
def test_cli_prints_groups_as_json(bundles: Path) -> None:
    r = run_cli(["duplicates", "--bundles", str(bundles), "--threshold", "0.95", "--json"])
    assert r.returncode == 0, r.stderr
    groups = json.loads(r.stdout)["groups"]
    assert [[m["id"] for m in g] for g in groups] == [[7, 8, 9, 10], [5, 17, 2999], [100, 101]]
    assert set(groups[0][0]) == {"id", "path", "score"}
    bad = run_cli(["duplicates", "--bundles", str(bundles), "--threshold", "1.5"])
    assert bad.returncode == 1 and bad.stderr.startswith("error: --threshold")
