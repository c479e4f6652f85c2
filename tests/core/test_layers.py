"""A version with delta segments is searched, counted and looked up exactly as the live items it folds to,
checked against brute force; reopening by difference reuses what is unchanged and hashes only what is new."""

from __future__ import annotations

import numpy as np
import pytest

from indexer.core.bundle.items import Item
from indexer.core.bundle.manifest import BundleError, load_manifest
from indexer.core.bundle.read import live_items, open_bundle, open_bundle_dir
from indexer.index.publish import publish
from indexer.index.segments import SegmentContents, publish_version
from tests.conftest import bundle_contents

DIM = 32


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


class Reference:
    """The live items and vectors a sequence of deltas should leave, kept the naive way."""

    def __init__(self, bundle) -> None:
        self.rows = {it.id: it for it in bundle.items.all()}
        self.vecs = {}
        for target, index in (("images", bundle.image_index), ("texts", bundle.text_index)):
            for it in self.rows.values():
                if (it.kind == "image") == (target == "images"):
                    self.vecs[it.id] = index.reconstruct(it.id)

    def apply(self, delta: SegmentContents) -> None:
        for i in delta.owned:
            self.rows.pop(i, None)
            self.vecs.pop(i, None)
        for row, vec in zip(delta.rows, delta.vectors, strict=True):
            self.rows[row.id], self.vecs[row.id] = row, vec

    def search(self, kind: str, q: np.ndarray, k: int) -> np.ndarray:
        ids = np.array(sorted(i for i, r in self.rows.items() if r.kind == kind), np.int64)
        if not len(ids):
            return np.full((len(q), k), -1)
        scores = q @ np.stack([self.vecs[i] for i in ids]).T
        top = ids[np.argsort(-scores, axis=1, kind="stable")[:, :k]]
        return np.pad(top, ((0, 0), (0, max(0, k - top.shape[1]))), constant_values=-1)


def _delta(rng, ref: Reference, next_id: int, replace=(), delete=(), add_images=0, add_texts=0):
    rows = [ref.rows[i] for i in replace]
    rows += [Item(id=next_id + j, kind="image", path=f"/x/new{next_id + j}.png") for j in range(add_images)]
    n = next_id + add_images
    rows += [Item(id=n + j, kind="text", text=f"new text {n + j}") for j in range(add_texts)]
    owned = frozenset({r.id for r in rows} | set(delete))
    return SegmentContents(owned, rows, _unit(rng, len(rows)))


def _published(bundles, bundle, ref: Reference, delta: SegmentContents):
    """`delta` published on top of `bundle` (closed) and applied to `ref`; the new version, open."""
    ref.apply(delta)
    new = publish_version(bundles, bundle, delta=delta)
    bundle.close()
    return new


@pytest.fixture
def versions(tiny_model_dir, tmp_path):
    """A base of 20 images and 10 texts, then three deltas replacing, deleting and adding items."""
    rng = np.random.default_rng(1)
    root = publish(tmp_path, bundle_contents(tiny_model_dir, n_images=20, n_texts=10))
    bundle = open_bundle_dir(root, mmap=True)
    ref = Reference(bundle)
    steps = [
        dict(replace=[1, 2], delete=[3, 20], add_images=2),
        dict(replace=[30, 5], delete=[31], add_texts=2),  # replaces a new image of the first delta
        dict(replace=[2], delete=[32, 0], add_images=1, add_texts=1),  # deletes a new text of the second
    ]
    next_id = 30
    for step in steps:
        bundle = _published(tmp_path, bundle, ref, _delta(rng, ref, next_id, **step))
        next_id += step.get("add_images", 0) + step.get("add_texts", 0)
    bundle.close()
    return tmp_path, ref


def test_searching_a_layered_version_equals_brute_force_over_its_live_items(versions):
    bundles, ref = versions
    bundle = open_bundle(bundles)
    assert len(bundle.manifest.segments) == 3 and bundle.manifest.schema_version == 2
    q = _unit(np.random.default_rng(9), 16)
    for target, kind in (("images", "image"), ("texts", "text")):
        live = sum(1 for r in ref.rows.values() if r.kind == kind)
        assert bundle.count(target) == live == bundle.items.count(kind)
        for k in (1, 5, live, live + 7):
            scores, ids = bundle.search(target, q, k)
            np.testing.assert_array_equal(ids, ref.search(kind, q, k))
            for row_scores, row_ids in zip(scores, ids, strict=True):
                assert np.all(np.diff(row_scores[row_ids >= 0]) <= 1e-6), "best first"
    bundle.close()


def test_items_resolve_through_the_newest_owner(versions):
    bundles, ref = versions
    bundle = open_bundle(bundles)
    assert bundle.items.get(3) is None and bundle.items.get(0) is None, "deleted ids are gone"
    assert bundle.items.get(2) == ref.rows[2]
    assert bundle.items.get_many([1, 3, 31, 33]).keys() == {1, 33}
    assert bundle.items.all() == sorted(ref.rows.values(), key=lambda r: r.id)
    assert live_items(bundle.root, bundle.manifest) == bundle.items.all()
    bundle.close()


def test_reopening_by_difference_reuses_layers_and_hashes_only_new_files(versions, hashed):
    bundles, _ = versions
    old = open_bundle(bundles)
    hashed.clear()
    rng = np.random.default_rng(3)
    delta = SegmentContents(frozenset({7, 50}), [Item(id=50, kind="image", path="/x/50.png")], _unit(rng, 1))
    new = publish_version(bundles, old, delta=delta)
    heavy = [p for p in hashed if p.suffix in (".faiss", ".sqlite", ".safetensors")]
    assert sorted(p.name for p in heavy) == ["images.faiss", "items.sqlite", "texts.faiss"]
    assert all("segments" in p.parts for p in heavy), (
        "the delta's own files only: not the base, not the weights"
    )
    hashed.clear()
    served = open_bundle_dir(new.root, reuse=old)  # what the service does on a reload
    heavy = [p for p in hashed if p.suffix in (".faiss", ".sqlite", ".safetensors")]
    newest = new.manifest.segments[-1].name
    assert heavy and {p.parent.name for p in heavy} == {newest}, "base, older segments, weights: not read"
    assert served.layers[0] is old.layers[0] and served.layers[1] is old.layers[1]
    assert served.count("images") == old.count("images")  # one added, one (id 7) deleted
    old.close()  # the old snapshot retires; the shared base stays open for the new one
    assert served.items.get(8) is not None and served.search("images", _unit(rng, 1), 3)[1].shape == (1, 3)
    served.close()
    new.close()


def test_a_damaged_segment_or_wrong_count_is_refused(versions):
    bundles, _ = versions
    bundle = open_bundle(bundles)
    manifest = load_manifest(bundle.root)
    seg = bundle.root / "segments" / manifest.segments[0].name / "items.sqlite"
    data = bytearray(seg.read_bytes())
    data[-10] ^= 0xFF
    seg.unlink()  # a hard link shared with older versions: replace, not rewrite
    seg.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="does not match its sha256"):
        open_bundle_dir(bundle.root)
    bad = manifest.model_copy(update={"images": manifest.images.model_copy(update={"count": 99})})
    (bundle.root / "manifest.json").write_text(bad.to_json())
    with pytest.raises(BundleError, match=r"holds \d+ vectors \(base and segments\), manifest says 99"):
        open_bundle_dir(bundle.root, checksums=False)
    bundle.close()


def test_more_than_eight_segments_are_merged_into_one(tiny_model_dir, tmp_path):
    rng = np.random.default_rng(5)
    root = publish(tmp_path, bundle_contents(tiny_model_dir, n_images=4, n_texts=2))
    bundle = open_bundle_dir(root, mmap=True)
    ref = Reference(bundle)
    for n in range(10):
        bundle = _published(tmp_path, bundle, ref, _delta(rng, ref, 100 + n, replace=[n % 4], add_images=1))
    assert len(bundle.manifest.segments) == 2, "the ninth delta merged all nine into one"
    served = open_bundle(tmp_path)
    q = _unit(rng, 4)
    np.testing.assert_array_equal(served.search("images", q, 20)[1], ref.search("image", q, 20))
    assert served.items.all() == sorted(ref.rows.values(), key=lambda r: r.id)
    served.close()
    bundle.close()


def test_a_segment_the_manifest_has_no_checksum_for_is_never_read(versions):
    bundles, _ = versions
    bundle = open_bundle(bundles)
    manifest = load_manifest(bundle.root)
    rel = f"segments/{manifest.segments[1].name}/images.faiss"
    files = {k: v for k, v in manifest.files.items() if k != rel}
    (bundle.root / "manifest.json").write_text(manifest.model_copy(update={"files": files}).to_json())
    with pytest.raises(BundleError, match=f"{rel} is not listed in the manifest's files"):
        open_bundle_dir(bundle.root)
    bundle.close()
