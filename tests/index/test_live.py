"""A live collection: each batch of changed paths (add, change, rename, delete, caption, folders moved in and
out) becomes a delta version that serves exactly what a full run over the folder would, with the same ids;
a full scan catches up on what changed while nothing watched; the base is rebuilt past the threshold."""

from __future__ import annotations

import shutil
from pathlib import Path

from indexer.core.bundle.read import open_bundle, read_current
from indexer.core.encoder import Encoder
from indexer.core.images import load_image
from indexer.data.sources import SourceSpec, folder_changes
from indexer.index import compact
from indexer.index.embed import EmbedConfig
from indexer.index.ids import load_ids
from indexer.index.live import LiveIndexer
from indexer.index.runner import ReindexConfig
from indexer.index.watch import WatchConfig, first_pass
from tests.index.helpers import make_folder, make_image, run_index


def live_indexer(model: Path, folder: Path, bundles: Path) -> LiveIndexer:
    cfg = ReindexConfig(
        model_dir=model, source=SourceSpec(str(folder)), bundles_dir=bundles, embed=EmbedConfig(4, workers=0)
    )
    live = first_pass(cfg, WatchConfig(), None)
    live.catch_up()
    return live


def served(bundles: Path) -> dict[str, object]:
    """What the current version serves: items by (kind, path or text), without ids."""
    b = open_bundle(bundles)
    try:
        return {
            "items": {(it.kind, it.path or it.text): it for it in b.items.all()},
            "counts": (b.count("images"), b.count("texts")),
            "segments": len(b.manifest.segments),
        }
    finally:
        b.close()


def test_each_change_is_a_delta_serving_what_a_full_run_serves(tiny_model_dir, tmp_path):
    folder, bundles = make_folder(tmp_path / "photos", 5), tmp_path / "bundles"
    run_index(tiny_model_dir, folder, bundles)
    live = live_indexer(tiny_model_dir, folder, bundles)
    first_version = read_current(bundles)
    steps = {
        "add": lambda: (make_image(folder / "new.png", 77), (folder / "new.txt").write_text("a new one\n")),
        "change": lambda: make_image(folder / "img01.png", 101),
        "rename": lambda: (folder / "img02.png").rename(folder / "renamed.png"),
        "delete": lambda: (folder / "img03.png").unlink(),
        "caption": lambda: (folder / "img00.txt").write_text("the first caption, rewritten\n"),
    }
    paths = {
        "add": ["new.png", "new.txt"],
        "change": ["img01.png"],
        "rename": ["img02.png", "renamed.png"],
        "delete": ["img03.png"],
        "caption": ["img00.txt"],
    }
    expect = {
        "add": (1, 0, 0),
        "change": (0, 1, 0),
        "rename": (1, 0, 1),
        "delete": (0, 0, 1),
        "caption": (0, 0, 0),
    }
    for name, change in steps.items():
        change()
        result = live.apply(folder_changes(folder, [folder / p for p in paths[name]]))
        assert result is not None and result.kind == "delta", name
        assert (result.added, result.updated, result.removed) == expect[name], name
        # the id record is updated by the change alone, and always equals the state written whole
        assert load_ids(bundles) == live.state.id_state(), name
    live.close()
    after = served(bundles)
    assert after["segments"] == 5 and read_current(bundles) != first_version
    items = after["items"]
    assert ("image", str(folder / "img03.png")) not in items and (
        "image",
        str(folder / "img02.png"),
    ) not in items
    assert items[("image", str(folder / "img00.png"))].text == "the first caption, rewritten"
    assert ("text", "a picture number 0") not in items and ("text", "a new one") in items

    run_index(tiny_model_dir, folder, bundles)  # a plain full run over the same folder
    full = served(bundles)
    assert full["segments"] == 0
    assert full["items"] == after["items"], "same items, same ids, same rows"
    assert full["counts"] == after["counts"]


def test_a_new_image_is_found_by_its_own_picture(tiny_model_dir, tmp_path):
    folder, bundles = make_folder(tmp_path / "photos", 4), tmp_path / "bundles"
    run_index(tiny_model_dir, folder, bundles)
    live = live_indexer(tiny_model_dir, folder, bundles)
    new = make_image(folder / "sub" / "fresh.png", 555)
    live.apply(folder_changes(folder, [new.parent]))
    live.close()
    bundle = open_bundle(bundles)
    query = Encoder.from_dir(bundle.model_dir, "cpu").encode_images([load_image(new)])
    scores, ids = bundle.search("images", query, 3)
    assert bundle.items.get(int(ids[0, 0])).path == str(new) and scores[0, 0] > 0.999
    bundle.close()


def test_folders_moved_in_and_out_are_whole_batches(tiny_model_dir, tmp_path):
    folder, bundles = make_folder(tmp_path / "photos", 2), tmp_path / "bundles"
    outside = make_folder(tmp_path / "elsewhere" / "trip", 3)
    run_index(tiny_model_dir, folder, bundles)
    live = live_indexer(tiny_model_dir, folder, bundles)
    moved = folder / "trip"
    shutil.move(outside, moved)  # a folder event only: nothing is said about the files inside
    assert live.apply(folder_changes(folder, [moved])).added == 3
    shutil.move(moved, tmp_path / "elsewhere" / "back")
    assert live.apply(folder_changes(folder, [moved])).removed == 3
    live.close()
    assert served(bundles)["counts"] == (2, 2)


def test_catch_up_publishes_exactly_what_changed_while_nothing_watched(tiny_model_dir, tmp_path):
    folder, bundles = make_folder(tmp_path / "photos", 4), tmp_path / "bundles"
    run_index(tiny_model_dir, folder, bundles)
    make_image(folder / "offline.png", 9)
    (folder / "img00.png").unlink()
    live = live_indexer(tiny_model_dir, folder, bundles)
    bundle = open_bundle(bundles)
    assert len(bundle.manifest.segments) == 1 and bundle.count("images") == 4
    assert bundle.manifest.stats["added"] == 1 and bundle.manifest.stats["removed"] == 1
    bundle.close()
    version = read_current(bundles)
    assert live.catch_up() is None and read_current(bundles) == version, "no change, no version"
    assert live.apply(folder_changes(folder, [folder / "img01.png"])) is None, "an event without a change"
    live.close()


def test_a_broken_image_is_skipped_and_listed(tiny_model_dir, tmp_path):
    folder, bundles = make_folder(tmp_path / "photos", 2), tmp_path / "bundles"
    run_index(tiny_model_dir, folder, bundles)
    live = live_indexer(tiny_model_dir, folder, bundles)
    (folder / "broken.png").write_bytes(b"\x89PNG not really")
    result = live.apply(folder_changes(folder, [folder / "broken.png"]))
    assert result is not None and result.skipped == 1 and result.images == 2
    assert (
        '"path": "' + str(folder / "broken.png")
        in (bundles / read_current(bundles) / "skipped.jsonl").read_text()
    )
    make_image(folder / "broken.png", 3)  # the copy finished
    result = live.apply(folder_changes(folder, [folder / "broken.png"]))
    assert result.skipped == 0 and result.added == 1
    live.close()


def test_past_the_threshold_the_base_is_rebuilt_in_the_background(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(compact, "MIN_REBUILD", 2)
    folder, bundles = make_folder(tmp_path / "photos", 3), tmp_path / "bundles"
    run_index(tiny_model_dir, folder, bundles)
    live = live_indexer(tiny_model_dir, folder, bundles)
    for i in range(3):
        make_image(folder / f"n{i}.png", 40 + i)
        live.apply(folder_changes(folder, [folder / f"n{i}.png"]))
    assert live.compactor.running or live.compactor._result is not None, "owning 3 ids > 2 starts a rebuild"
    before = served(bundles)
    live.compactor.wait(60)
    make_image(folder / "during.png", 60)  # published on top of the old base, kept on top of the new one
    live.apply(folder_changes(folder, [folder / "during.png"]))
    result = live.collect_rebuild()
    assert result is not None and result.kind == "base"
    live.close()
    after = served(bundles)
    assert after["segments"] == 1, "only the delta written after the rebuild began"
    assert before["items"].items() <= after["items"].items()
    assert after["counts"] == (7, 3)
    assert not list((bundles / ".work" / "compact").iterdir()), "the staging dir is cleaned up"
    b = open_bundle(bundles)
    assert b.image_index.ntotal == 6, "the rebuilt base holds what the version held when it began"
    b.close()


def test_gc_keeps_the_vectors_of_delta_items(tiny_model_dir, tmp_path):
    from indexer.index.gc import prune_cache

    folder, bundles = make_folder(tmp_path / "photos", 2), tmp_path / "bundles"
    run_index(tiny_model_dir, folder, bundles)
    live = live_indexer(tiny_model_dir, folder, bundles)
    make_image(folder / "delta-only.png", 21)
    live.apply(folder_changes(folder, [folder / "delta-only.png"]))
    live.close()
    prune_cache(bundles)
    assert run_index(tiny_model_dir, folder, bundles).embedded == 0, "the delta's vector was kept"
