"""Item ids never change meaning, whatever happened to CURRENT: a run continues from the indexer's own id
record, else the newest bundle that verifies, and stops rather than number items from 0 again."""

from __future__ import annotations

from pathlib import Path

import pytest

from indexer.core.bundle.layout import CURRENT, MANIFEST
from indexer.core.bundle.read import list_versions, open_bundle
from indexer.index.ids import IdStateError, ids_path
from tests.index.helpers import make_folder, make_image, run_index


def _ids(bundles: Path, version: str | None = None) -> dict[str, int]:
    """key -> id of every item (image path or text) of the bundle CURRENT names (or `version`)."""
    b = open_bundle(bundles, version)
    try:
        return {(it.path if it.kind == "image" else it.text) or "": it.id for it in b.items.all()}
    finally:
        b.close()


def _break_current(bundles: Path, how: str) -> None:
    current = bundles / (bundles / CURRENT).read_text().strip()
    if how == "dangling":
        (bundles / CURRENT).write_text("20990101T000000000000Z-ffffff\n")
    elif how == "empty":
        (bundles / CURRENT).write_text("")
    elif how == "missing":
        (bundles / CURRENT).unlink()
    elif how == "truncated-manifest":
        data = (current / MANIFEST).read_bytes()
        (current / MANIFEST).write_bytes(data[: len(data) // 2])


@pytest.fixture
def history(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, Path, dict[str, int]]:
    """Two bundles: the second added two images (new ids) to the first's four."""
    src = make_folder(tmp_path / "photos", 4)
    bundles = tmp_path / "bundles"
    run_index(tiny_model_dir, src, bundles, keep=0)
    make_image(src / "later0.png", seed=70)
    make_image(src / "later1.png", seed=71)
    run_index(tiny_model_dir, src, bundles, keep=0)
    return src, bundles, _ids(bundles)


@pytest.mark.parametrize("how", ["dangling", "empty", "missing", "truncated-manifest"])
@pytest.mark.parametrize("with_record", [True, False])
def test_a_broken_current_never_renumbers_items(tiny_model_dir, history, how, with_record):
    src, bundles, before = history
    if not with_record:  # e.g. a bundles dir from before the record existed: the bundles must do
        ids_path(bundles).unlink()
    _break_current(bundles, how)
    make_image(src / "after.png", seed=90)
    res = run_index(tiny_model_dir, src, bundles, keep=0)
    after = _ids(bundles)
    if with_record or how != "truncated-manifest":
        # the record, or the newest bundle that verifies (the second): every id is kept
        assert {k: after[k] for k in before} == before
        assert res.added == 1
    else:
        # only the first bundle verifies: items it had keep their ids; the two added by the damaged
        # second bundle get new ones, past every id the damaged bundle used (never reused)
        first = _ids(bundles, list_versions(bundles)[0])
        assert {k: after[k] for k in first} == first
    reused = {i for k, i in after.items() if k not in before or before[k] != i} & set(before.values())
    assert not reused, "an id that named one item now names another"
    assert after[str(src / "after.png")] >= max(before.values()) + 1


def test_no_readable_state_stops_with_one_error_and_a_reset_is_explicit(tiny_model_dir, history):
    src, bundles, _ = history
    ids_path(bundles).unlink()
    for v in list_versions(bundles):
        (bundles / v / MANIFEST).write_text("{")  # no bundle can be read
    with pytest.raises(IdStateError, match="--reset-ids"):
        run_index(tiny_model_dir, src, bundles)
    res = run_index(tiny_model_dir, src, bundles, reset_ids=True)
    assert sorted(_ids(bundles).values()) == list(range(res.images + res.texts))


def test_the_record_survives_a_failed_publish_without_reusing_ids(tiny_model_dir, history, monkeypatch):
    """Ids reserved by a run that then failed to publish are given to the same items next time."""
    import indexer.index.runner as runner

    src, bundles, before = history
    make_image(src / "failed.png", seed=91)

    def boom(*a: object, **k: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner, "publish", boom)
    with pytest.raises(OSError):
        run_index(tiny_model_dir, src, bundles)
    monkeypatch.undo()
    make_image(src / "second.png", seed=92)
    run_index(tiny_model_dir, src, bundles)
    after = _ids(bundles)
    assert {k: after[k] for k in before} == before
    assert after[str(src / "second.png")] > after[str(src / "failed.png")] > max(before.values())
