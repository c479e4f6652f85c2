"""The bundle format: publish is atomic, open verifies everything the manifest claims."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from indexer.bundle import (
    CURRENT,
    BundleContents,
    BundleError,
    IndexSpec,
    Item,
    ModelRef,
    clean_temp,
    leased_versions,
    list_versions,
    open_bundle,
    publish,
    read_current,
    write_lease,
)
from indexer.model import Encoder


def _contents(model_dir, n_images=3, n_texts=2, dim=32) -> BundleContents:
    enc = Encoder.from_dir(model_dir, "cpu")
    rng = np.random.default_rng(0)

    def index(ids):
        x = rng.normal(size=(len(ids), dim)).astype(np.float32)
        faiss.normalize_L2(x)
        idx = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        idx.add_with_ids(x, np.asarray(ids, dtype=np.int64))
        return idx

    img_ids, txt_ids = list(range(n_images)), list(range(n_images, n_images + n_texts))
    items = [Item(id=i, kind="image", path=f"/x/{i}.png") for i in img_ids]
    items += [Item(id=i, kind="text", text=f"text {i}") for i in txt_ids]
    i = enc.info
    return BundleContents(
        model_dir=model_dir,
        model=ModelRef(
            name=i.name,
            fingerprint=i.fingerprint,
            embed_dim=i.embed_dim,
            image_size=i.image_size,
            context_length=i.context_length,
        ),
        image_index=index(img_ids),
        text_index=index(txt_ids),
        images=IndexSpec(file="images.faiss", count=n_images),
        texts=IndexSpec(file="texts.faiss", count=n_texts),
        items=items,
        skipped=[{"path": "/x/bad.png", "reason": "truncated"}],
    )


def test_publish_then_open_roundtrip(tiny_model_dir, tmp_path):
    root = publish(tmp_path, _contents(tiny_model_dir))
    assert read_current(tmp_path) == root.name
    b = open_bundle(tmp_path)
    assert b.version == root.name and b.image_index.ntotal == 3 and b.text_index.ntotal == 2
    assert b.items.get(4).text == "text 4" and b.items.get(99) is None
    assert b.items.get_many([0, 1, -1]).keys() == {0, 1}
    assert (b.model_dir / "open_clip_model.safetensors").is_file()
    assert json.loads((root / "skipped.jsonl").read_text())["reason"] == "truncated"
    b.close()


def test_tampered_file_is_refused(tiny_model_dir, tmp_path):
    root = publish(tmp_path, _contents(tiny_model_dir))
    data = bytearray((root / "images.faiss").read_bytes())
    data[-1] ^= 0xFF
    (root / "images.faiss").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        open_bundle(tmp_path)


def test_count_mismatch_is_refused_at_publish(tiny_model_dir, tmp_path):
    good = publish(tmp_path, _contents(tiny_model_dir))
    bad = _contents(tiny_model_dir)
    bad = BundleContents(**{**bad.__dict__, "images": IndexSpec(file="images.faiss", count=7)})
    with pytest.raises(BundleError, match="holds 3 vectors, manifest says 7"):
        publish(tmp_path, bad)
    assert read_current(tmp_path) == good.name
    assert list_versions(tmp_path) == [good.name]
    assert not list(tmp_path.glob(".tmp-*"))


def test_missing_current_and_leftovers(tiny_model_dir, tmp_path):
    with pytest.raises(BundleError, match="no bundle published"):
        open_bundle(tmp_path)
    (tmp_path / ".tmp-crashed").mkdir()
    (tmp_path / f"{CURRENT}.tmp").write_text("x")
    assert clean_temp(tmp_path) == [".tmp-crashed"]
    assert not (tmp_path / f"{CURRENT}.tmp").exists()


def test_leases(tmp_path):
    assert write_lease(tmp_path, "v1")
    assert leased_versions(tmp_path) == {"v1"}
    assert leased_versions(tmp_path, ttl_s=-1) == set()
