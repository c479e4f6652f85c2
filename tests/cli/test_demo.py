"""The demo's stage logic: each stage runs once, is skipped when valid, resumes or redoes when not."""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

from clipsearch.demo import DemoConfig, DemoError, ensure_font, prepare, serve_argv
from indexer.index.publish import publish
from tests.conftest import bundle_contents, make_colour_dataset


class FakeClipsearch:
    """Stands in for the child `clipsearch` processes, writing the real outputs each stage checks."""

    def __init__(self, cfg: DemoConfig, model_dir: Path, fail: str | None = None) -> None:
        self.cfg, self.model_dir, self.fail, self.calls = cfg, model_dir, fail, []

    def __call__(self, args: Sequence[str]) -> int:
        self.calls.append(list(args))
        stage = args[0]
        if stage == self.fail:
            return 1
        if stage == "data":
            csv = make_colour_dataset(self.cfg.data_dir)
            for split in ("train.csv", "val.csv"):
                shutil.copy(csv, self.cfg.data_dir / split)
        elif stage == "train":
            shutil.copytree(self.model_dir, self.cfg.model_dir, dirs_exist_ok=True)
        elif stage == "index":
            publish(self.cfg.bundles_dir, bundle_contents(self.cfg.model_dir))
        return 0


@pytest.fixture
def cfg(tmp_path, tiny_model_dir) -> DemoConfig:
    font = tmp_path / "font.ttf"
    font.write_bytes(b"x")
    return DemoConfig(workdir=tmp_path / "work", font=font, port=8123)


def test_first_run_runs_every_stage_second_run_none(cfg, tiny_model_dir):
    fake = FakeClipsearch(cfg, tiny_model_dir)
    version = prepare(cfg, say=lambda _: None, run=fake)
    assert [c[0] for c in fake.calls] == ["data", "train", "index"]
    train = fake.calls[1]
    assert train[train.index("--time-budget") + 1] == "3" and train[train.index("--model") + 1] == "small"
    again = FakeClipsearch(cfg, tiny_model_dir)
    assert prepare(cfg, say=lambda _: None, run=again) == version
    assert again.calls == []


def test_interrupted_training_resumes(cfg, tiny_model_dir):
    fake = FakeClipsearch(cfg, tiny_model_dir, fail="train")
    with pytest.raises(DemoError, match="train stage failed"):
        prepare(cfg, say=lambda _: None, run=fake)
    (cfg.run_dir / "checkpoint").mkdir(parents=True)
    fake = FakeClipsearch(cfg, tiny_model_dir)
    prepare(cfg, say=lambda _: None, run=fake)
    assert fake.calls[0] == ["train", "--resume", str(cfg.run_dir)]


def test_changed_model_is_retrained_and_reindexed(cfg, tiny_model_dir, tmp_path):
    import open_clip
    import torch

    from indexer.core.architectures import model_config
    from indexer.core.modeldir import save_model_dir

    first = prepare(cfg, say=lambda _: None, run=FakeClipsearch(cfg, tiny_model_dir))
    weights = cfg.model_dir / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])  # the run's model no longer matches its marker
    torch.manual_seed(1)
    other = save_model_dir(open_clip.create_model("tiny-test"), model_config("tiny-test"), tmp_path / "m2")
    fake = FakeClipsearch(cfg, other)
    second = prepare(cfg, say=lambda _: None, run=fake)
    assert [c[0] for c in fake.calls] == ["train", "index"]
    assert fake.calls[0][:2] == ["train", "--train"]  # started afresh, not resumed
    assert second != first


def test_a_new_architecture_behind_the_same_name_is_retrained(cfg, tiny_model_dir, monkeypatch):
    """A release that changes what `small` is must not keep serving a model of the old architecture."""
    import clipsearch.demo

    prepare(cfg, say=lambda _: None, run=FakeClipsearch(cfg, tiny_model_dir))
    real = clipsearch.demo._architecture
    monkeypatch.setattr(clipsearch.demo, "_architecture", lambda spec: {**real(spec), "embed_dim": 999})
    fake = FakeClipsearch(cfg, tiny_model_dir)
    prepare(cfg, say=lambda _: None, run=fake)
    assert fake.calls[0][:2] == ["train", "--train"]  # retrained from scratch, not resumed or skipped


def test_stage_that_leaves_invalid_output_is_an_error(cfg, tiny_model_dir):
    class NoIndex(FakeClipsearch):
        def __call__(self, args):
            return 0 if args[0] == "index" else super().__call__(args)

    with pytest.raises(DemoError, match="index stage finished but its output is not valid"):
        prepare(cfg, say=lambda _: None, run=NoIndex(cfg, tiny_model_dir))


def test_missing_explicit_font(tmp_path):
    with pytest.raises(DemoError, match="does not exist"):
        ensure_font(DemoConfig(workdir=tmp_path, font=tmp_path / "nope.ttf"), say=lambda _: None)


def test_serve_argv_names_bundles_and_port(cfg):
    argv = serve_argv(cfg)
    assert argv[1:4] == ["-m", "clipsearch", "serve"]
    assert argv[argv.index("--port") + 1] == "8123"
    assert argv[argv.index("--bundles") + 1] == str(cfg.bundles_dir)


# --- --images: the user's own folder (the compose indexer's photo mount) ---


def _index_calls(fake: FakeClipsearch) -> list[list[str]]:
    return [c for c in fake.calls if c[0] == "index"]


def test_own_folder_is_indexed_with_the_demo_model_on_every_run(cfg, tiny_model_dir, tmp_path):
    photos = tmp_path / "photos"
    make_colour_dataset(photos)
    own = DemoConfig(workdir=cfg.workdir, font=cfg.font, images=photos)
    fake = FakeClipsearch(own, tiny_model_dir)
    first = prepare(own, say=lambda _: None, run=fake)
    (call,) = _index_calls(fake)
    assert call[call.index("--images") + 1] == str(photos)
    assert call[call.index("--model") + 1] == str(own.model_dir)
    # The next run skips data and training but indexes again: `clipsearch index` finds what changed.
    again = FakeClipsearch(own, tiny_model_dir)
    second = prepare(own, say=lambda _: None, run=again)
    assert [c[0] for c in again.calls] == ["index"] and second != first


def test_back_to_the_emoji_set_after_the_own_folder_reindexes_it(cfg, tiny_model_dir, tmp_path):
    """The photos bundle must not pass for the emoji one: the emoji index marker still names its own."""
    emoji_version = prepare(cfg, say=lambda _: None, run=FakeClipsearch(cfg, tiny_model_dir))
    photos = tmp_path / "photos"
    make_colour_dataset(photos)
    own = DemoConfig(workdir=cfg.workdir, font=cfg.font, images=photos)
    photos_version = prepare(own, say=lambda _: None, run=FakeClipsearch(own, tiny_model_dir))
    back = FakeClipsearch(cfg, tiny_model_dir)
    final = prepare(cfg, say=lambda _: None, run=back)
    assert [c[0] for c in back.calls] == ["index"]
    assert back.calls[0][back.calls[0].index("--images") + 1] == str(cfg.data_dir / "captions.csv")
    assert len({emoji_version, photos_version, final}) == 3


def test_an_empty_folder_means_the_emoji_set_and_says_so(cfg, tiny_model_dir, tmp_path):
    empty = tmp_path / "photos"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("not an image")
    own = DemoConfig(workdir=cfg.workdir, font=cfg.font, images=empty)
    said: list[str] = []
    fake = FakeClipsearch(own, tiny_model_dir)
    prepare(own, say=said.append, run=fake)
    (call,) = _index_calls(fake)
    assert call[call.index("--images") + 1] == str(own.data_dir / "captions.csv")
    assert any("holds no images" in s and "emoji" in s for s in said)


def test_a_missing_folder_is_an_error_before_any_stage(cfg, tiny_model_dir, tmp_path):
    own = DemoConfig(workdir=cfg.workdir, font=cfg.font, images=tmp_path / "nope")
    fake = FakeClipsearch(own, tiny_model_dir)
    with pytest.raises(DemoError, match="not a folder"):
        prepare(own, say=lambda _: None, run=fake)
    assert fake.calls == []


def test_the_data_set_is_rebuilt_when_raqm_becomes_available(cfg, tiny_model_dir, monkeypatch):
    """A set drawn without raqm lacks the emoji sequences: once raqm works, it is drawn again."""
    import indexer.data.emoji

    monkeypatch.setattr(indexer.data.emoji, "text_layout", lambda: "basic")
    prepare(cfg, say=lambda _: None, run=FakeClipsearch(cfg, tiny_model_dir))
    monkeypatch.setattr(indexer.data.emoji, "text_layout", lambda: "raqm")
    fake = FakeClipsearch(cfg, tiny_model_dir)
    prepare(cfg, say=lambda _: None, run=fake)
    # The fake draws the same images again, so training and indexing stay up to date.
    assert [c[0] for c in fake.calls] == ["data"]
