"""Incremental re-indexing: only what changed is embedded, ids stay stable, deletions drop out."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import open_clip
import torch

from indexer.core.architectures import model_config
from indexer.core.bundle.read import open_bundle
from indexer.core.encoder import Encoder
from indexer.core.modeldir import save_model_dir
from tests.index.helpers import make_folder, make_image, run_index


def _ids_by_path(bundles: Path) -> dict[str, int]:
    b = open_bundle(bundles)
    try:
        items = b.items.get_many(list(range(1000)))
        return {it.path: it.id for it in items.values() if it.kind == "image"}
    finally:
        b.close()


def test_first_run_indexes_everything_and_vectors_match_the_encoder(tiny_model_dir, folder, tmp_path):
    bundles = tmp_path / "bundles"
    res = run_index(tiny_model_dir, folder, bundles)
    assert (res.added, res.updated, res.removed, res.unchanged, res.skipped) == (6, 0, 0, 0, 0)
    assert res.images == 6 and res.texts == 6 and res.embedded == 6
    b = open_bundle(bundles)
    enc = Encoder.from_dir(b.model_dir, "cpu")
    ids = _ids_by_path(bundles)
    path = str(folder / "img03.png")
    stored = b.image_index.reconstruct(ids[path])
    from indexer.core.images import load_image

    np.testing.assert_allclose(stored, enc.encode_images([load_image(path)])[0], atol=1e-5)
    texts = {it.text for it in b.items.get_many(list(range(100))).values() if it.kind == "text"}
    assert texts == {f"a picture number {i}" for i in range(6)}
    b.close()


def test_rerun_embeds_nothing_and_keeps_ids(tiny_model_dir, folder, tmp_path):
    bundles = tmp_path / "bundles"
    run_index(tiny_model_dir, folder, bundles)
    before = _ids_by_path(bundles)
    res = run_index(tiny_model_dir, folder, bundles)
    assert (res.added, res.updated, res.removed, res.unchanged, res.embedded) == (0, 0, 0, 6, 0)
    assert _ids_by_path(bundles) == before


def test_add_change_remove_rename_duplicate(tiny_model_dir, folder, tmp_path):
    bundles = tmp_path / "bundles"
    run_index(tiny_model_dir, folder, bundles)
    before = _ids_by_path(bundles)
    make_image(folder / "new.png", seed=100)  # added
    make_image(folder / "img01.png", seed=101)  # changed content, same path
    (folder / "img02.png").unlink()  # removed
    (folder / "img03.png").rename(folder / "renamed.png")  # rename: new path, known content
    shutil.copy(folder / "img04.png", folder / "dup.png")  # duplicate content
    res = run_index(tiny_model_dir, folder, bundles)
    # added: new, renamed, dup; updated: img01; removed: img02 and the old img03 path
    assert (res.added, res.updated, res.removed, res.unchanged) == (3, 1, 2, 3)
    assert res.embedded == 2, "only new.png and the changed img01.png need the model"
    after = _ids_by_path(bundles)
    assert str(folder / "img02.png") not in after and str(folder / "img03.png") not in after
    for name in ("img00.png", "img01.png", "img04.png", "img05.png"):
        assert after[str(folder / name)] == before[str(folder / name)], name
    new_ids = {after[str(folder / n)] for n in ("new.png", "renamed.png", "dup.png")}
    assert not new_ids & set(before.values()), "new items never reuse an old id"
    b = open_bundle(bundles)
    dup, orig = (
        b.image_index.reconstruct(after[str(folder / "dup.png")]),
        b.image_index.reconstruct(after[str(folder / "img04.png")]),
    )
    np.testing.assert_array_equal(dup, orig)
    b.close()


def test_touched_file_is_rehashed_but_not_reembedded(tiny_model_dir, folder, tmp_path):
    bundles = tmp_path / "bundles"
    run_index(tiny_model_dir, folder, bundles)
    st = (folder / "img00.png").stat()
    os.utime(folder / "img00.png", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    res = run_index(tiny_model_dir, folder, bundles)
    assert (res.unchanged, res.updated, res.embedded) == (6, 0, 0)


def test_model_change_reembeds_everything(tiny_model_dir, folder, tmp_path):
    bundles = tmp_path / "bundles"
    run_index(tiny_model_dir, folder, bundles)
    torch.manual_seed(123)
    other = save_model_dir(open_clip.create_model("tiny-test"), model_config("tiny-test"), tmp_path / "m2")
    res = run_index(other, folder, bundles)
    assert res.embedded == 6
    b = open_bundle(bundles)
    enc = Encoder.from_dir(other, "cpu")
    assert b.manifest.model.fingerprint == enc.info.fingerprint
    b.close()


def test_full_reembeds_everything(tiny_model_dir, folder, tmp_path):
    bundles = tmp_path / "bundles"
    run_index(tiny_model_dir, folder, bundles)
    res = run_index(tiny_model_dir, folder, bundles, full=True)
    assert res.embedded == 6 and res.unchanged == 6


def test_csv_source_with_extra_texts_file(tiny_model_dir, colour_csv, tmp_path):
    extra = tmp_path / "more.txt"
    extra.write_text("a red square\n\nsomething else entirely\n")
    res = run_index(tiny_model_dir, colour_csv, tmp_path / "b", texts_file=extra)
    assert res.images == 8
    assert res.texts == 9, "8 captions + 1 new text; the duplicate caption is kept once"
    b = open_bundle(tmp_path / "b")
    try:
        images = [it for it in b.items.get_many(list(range(100))).values() if it.kind == "image"]
        assert {Path(it.path).stem: it.text for it in images}["red"] == "a red square", (
            "image keeps its caption"
        )
    finally:
        b.close()


def test_keep_prunes_old_bundles_but_not_current(tiny_model_dir, tmp_path):
    src = make_folder(tmp_path / "p", 2)
    bundles = tmp_path / "b"
    names = [run_index(tiny_model_dir, src, bundles, keep=2).bundle for _ in range(4)]
    kept = sorted(p.name for p in bundles.iterdir() if not p.name.startswith(".") and p.is_dir())
    assert kept == names[-2:]
    assert open_bundle(bundles).version == names[-1]


def test_int8_fast_path_vectors_never_mix_with_fp32(tiny_model_dir, folder, tmp_path):
    bundles = tmp_path / "bundles"
    first = run_index(tiny_model_dir, folder, bundles)
    b = open_bundle(bundles)
    fp32 = {i: b.image_index.reconstruct(i) for i in _ids_by_path(bundles).values()}
    b.close()
    quant = run_index(tiny_model_dir, folder, bundles, cpu_int8=True, device="cpu")
    assert quant.embedded == 6, "int8 vectors come from their own cache"
    b = open_bundle(bundles)
    assert b.manifest.stats["numerics"] == "int8"
    b.close()
    again = run_index(tiny_model_dir, folder, bundles, device="cpu")
    assert again.embedded == 0 and again.bundle != first.bundle
    b = open_bundle(bundles)
    assert b.manifest.stats["numerics"] == "default"
    for i, v in fp32.items():
        np.testing.assert_array_equal(b.image_index.reconstruct(i), v)
    b.close()


def _write_shard(path: Path, folder: Path, names: list[str]) -> Path:
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name in names:
            tar.add(folder / f"{name}.png", arcname=f"{name}.png")
            tar.add(folder / f"{name}.txt", arcname=f"{name}.txt")
    return path


def test_webdataset_shards_are_incremental_too(tiny_model_dir, tmp_path):
    folder = make_folder(tmp_path / "p", 4)
    shard = _write_shard(tmp_path / "s.tar", folder, ["img00", "img01", "img02"])
    bundles = tmp_path / "b"
    first = run_index(tiny_model_dir, shard, bundles, workers=1)
    assert (first.images, first.texts, first.embedded) == (3, 3, 3)
    assert run_index(tiny_model_dir, shard, bundles).embedded == 0
    _write_shard(shard, folder, ["img00", "img01", "img02", "img03"])  # the shard changed: one new member
    res = run_index(tiny_model_dir, shard, bundles, workers=1)
    assert (res.added, res.unchanged, res.embedded) == (1, 3, 1)
    b = open_bundle(bundles)
    paths = {it.path for it in b.items.get_many(list(range(20))).values() if it.kind == "image"}
    assert f"{shard.resolve()}::img03.png" in paths
    b.close()
