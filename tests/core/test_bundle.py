"""The bundle format: publish is atomic, open verifies everything the manifest claims."""

from __future__ import annotations

import json

import pytest

from indexer.core.bundle.layout import CURRENT
from indexer.core.bundle.leases import leased_versions, write_lease
from indexer.core.bundle.manifest import BundleError, IndexSpec, load_manifest
from indexer.core.bundle.read import list_versions, open_bundle, read_current, verify_files
from indexer.core.hashing import hash_file
from indexer.index.publish import BundleContents, clean_temp, publish
from tests.conftest import bundle_contents


def test_publish_then_open_roundtrip(tiny_model_dir, tmp_path):
    root = publish(tmp_path, bundle_contents(tiny_model_dir))
    assert read_current(tmp_path) == root.name
    b = open_bundle(tmp_path)
    assert b.version == root.name and b.image_index.ntotal == 3 and b.text_index.ntotal == 2
    assert b.items.get(4).text == "text 4" and b.items.get(99) is None
    assert b.items.get_many([0, 1, -1]).keys() == {0, 1}
    assert (b.model_dir / "open_clip_model.safetensors").is_file()
    assert json.loads((root / "skipped.jsonl").read_text())["reason"] == "truncated"
    b.close()


def test_tampered_file_is_refused(tiny_model_dir, tmp_path):
    root = publish(tmp_path, bundle_contents(tiny_model_dir))
    data = bytearray((root / "images.faiss").read_bytes())
    data[-1] ^= 0xFF
    (root / "images.faiss").write_bytes(bytes(data))
    with pytest.raises(BundleError, match="sha256"):
        open_bundle(tmp_path)


def test_known_sha256_is_trusted_only_while_the_file_is_unchanged(tiny_model_dir, tmp_path):
    """The indexer's verify-on-publish skips files it has just hashed, but never one rewritten since."""
    root = publish(tmp_path, bundle_contents(tiny_model_dir))
    manifest = load_manifest(root)
    known = {rel: hash_file(root / rel) for rel in manifest.files}
    verify_files(root, manifest, known=known)
    data = bytearray((root / "images.faiss").read_bytes())
    data[-1] ^= 0xFF
    (root / "images.faiss.new").write_bytes(bytes(data))
    (root / "images.faiss.new").replace(root / "images.faiss")  # same size, new inode
    with pytest.raises(BundleError, match=r"images\.faiss does not match its sha256"):
        verify_files(root, manifest, known=known)


def test_count_mismatch_is_refused_at_publish(tiny_model_dir, tmp_path):
    good = publish(tmp_path, bundle_contents(tiny_model_dir))
    bad = bundle_contents(tiny_model_dir)
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


def test_a_format_1_item_store_still_reads_every_item(tmp_path):
    """Bundles written before user fields existed (no `fields` table, no folder column) stay servable."""
    import sqlite3

    from indexer.core.bundle.items import ItemStore

    path = tmp_path / "items.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE items (id INTEGER PRIMARY KEY, kind TEXT NOT NULL, path TEXT, text TEXT, sha256 TEXT);"
        "INSERT INTO items VALUES (0, 'image', '/p/a.jpg', 'a cat', NULL);"
        "INSERT INTO items VALUES (1, 'text', NULL, 'a dog', NULL);"
        "PRAGMA user_version = 1;"
    )
    conn.commit()
    conn.close()
    store = ItemStore(path)
    items = store.all()
    assert [(it.id, it.kind, it.path, it.text) for it in items] == [
        (0, "image", "/p/a.jpg", "a cat"),
        (1, "text", None, "a dog"),
    ]
    assert items[0].folder == "/p" and dict(items[0].fields) == {}
    assert [it.id for it in store.all("image")] == [0]
