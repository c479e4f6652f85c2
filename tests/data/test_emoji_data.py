"""`clipsearch data emoji`: rendering, captions, the by-concept split, determinism and the manifest."""

from __future__ import annotations

import csv
import filecmp
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from indexer.core.images import load_image
from indexer.data.emoji import (
    DEFAULT_FONT,
    EmojiDataConfig,
    FontError,
    build_emoji_dataset,
    caption_of,
    catalogue,
    concept_of,
    load_font,
    render,
    split_by_concept,
)
from indexer.data.emoji_manifest import check_emoji_dataset
from indexer.data.sources import DataError, SourceSpec, read_records
from tests.conftest import run_cli
from tests.data.conftest import EMOJI_ARGS, build_emoji

DEJAVU = Path("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf")


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- the catalogue and the concept key (no rendering) ---


def test_catalogue_has_dog_face_and_clean_english_captions() -> None:
    captions = {e.chars: e.caption for e in catalogue()}
    assert captions["🐶"] == "dog face"
    assert captions["👋🏽"] == "waving hand medium skin tone"
    assert captions["🇯🇵"] == "flag Japan"
    assert captions["#️⃣"] == "keycap #"
    assert all(":" not in c and "_" not in c for c in captions.values())
    assert "\u2603" not in captions  # only fully-qualified forms ("☃️" is, bare "☃" is not)
    assert caption_of("\u00a9\ufe0f") == "copyright"


def test_variants_of_one_emoji_share_a_concept_and_different_emoji_do_not() -> None:
    assert len({concept_of(c) for c in ["👋", "👋🏻", "👋🏽", "👋🏿"]}) == 1
    assert concept_of("🏃‍♀️") == concept_of("🏃‍♂️") == concept_of("🏃")
    assert concept_of("👩‍🍳") == concept_of("👨🏾‍🍳") == concept_of("🧑‍🍳")
    assert concept_of("👩‍❤️‍💋‍👨") == concept_of("👨🏻‍❤️‍💋‍👨🏿")
    assert len({concept_of(c) for c in ["🐶", "🐱", "👨", "👩", "🇯🇵", "🇫🇷"]}) == 6


def test_full_split_holds_whole_concepts_out_and_respects_the_fraction() -> None:
    entries = catalogue()
    train, val = split_by_concept(entries, 0.1, seed=0)
    assert len(train) + len(val) == len(entries)
    assert not {e.concept for e in train} & {e.concept for e in val}
    assert 0.09 <= len(val) / len(entries) <= 0.13
    _, val_other_seed = split_by_concept(entries, 0.1, seed=1)
    assert {e.chars for e in val} != {e.chars for e in val_other_seed}
    assert split_by_concept(entries, 0.0, seed=0)[1] == []


def test_render_draws_dog_face_and_skips_what_the_font_lacks() -> None:
    font = load_font(DEFAULT_FONT)
    png = render(font, "🐶", 32, tofu=None)
    assert isinstance(png, bytes)
    img = load_image(png)
    assert img.size == (32, 32) and img.mode == "RGB"
    assert np.asarray(img).std() > 20  # a drawing, not a white square
    assert render(font, "A", 32, tofu=None) == "blank"  # a letter: not in the emoji font


# --- the command, on a small build shared by the session ---


@pytest.mark.slow
def test_tables_have_the_documented_shape(emoji_dir: Path) -> None:
    captions = read_csv(emoji_dir / "captions.csv")
    train, val = read_csv(emoji_dir / "train.csv"), read_csv(emoji_dir / "val.csv")
    for table in (captions, train, val):
        assert table and all(list(row) == ["filepath", "caption"] for row in table)
    assert sorted(r["filepath"] for r in captions) == sorted(r["filepath"] for r in train + val)
    assert all(r["filepath"].startswith("images/") and r["caption"] for r in captions)
    assert len(list((emoji_dir / "images").glob("*.png"))) == len(captions)
    records = read_records(SourceSpec(str(emoji_dir / "train.csv")))
    assert len(records) == len(train) and all(r.path and r.path.is_file() for r in records)


@pytest.mark.slow
def test_val_concepts_never_appear_in_train(emoji_dir: Path) -> None:
    meta = read_csv(emoji_dir / "metadata.csv")
    by_split: dict[str, set[str]] = {"train": set(), "val": set()}
    for row in meta:
        assert row["concept"] == concept_of(row["emoji"])
        by_split[row["split"]].add(row["concept"])
    assert by_split["train"] and by_split["val"]
    assert not by_split["train"] & by_split["val"]
    # The build has a concept with several variants, so the check above had something to catch.
    assert max(sum(r["concept"] == c for r in meta) for c in by_split["train"] | by_split["val"]) >= 3
    val_files = {r["filepath"] for r in read_csv(emoji_dir / "val.csv")}
    assert val_files == {r["filepath"] for r in meta if r["split"] == "val"}


@pytest.mark.slow
def test_images_decode_with_the_shared_decoder(emoji_dir: Path) -> None:
    for row in read_csv(emoji_dir / "captions.csv"):
        img = load_image(emoji_dir / row["filepath"])
        assert img.size == (48, 48) and img.mode == "RGB"
        pixels = np.asarray(img)
        assert pixels[0, 0].tolist() == [255, 255, 255]  # composited on white, with a margin
        assert pixels.std() > 5


@pytest.mark.slow
def test_dataset_json_describes_the_build(emoji_dir: Path) -> None:
    info = json.loads((emoji_dir / "dataset.json").read_text())
    assert info["font"] == str(DEFAULT_FONT) and info["size"] == 48 and info["seed"] == 0
    assert info["images"] == len(read_csv(emoji_dir / "captions.csv"))
    assert info["train"]["images"] + info["val"]["images"] == info["images"]
    assert info["images"] + sum(info["skipped"].values()) == info["catalogue"]
    assert check_emoji_dataset(emoji_dir).images == info["images"]


@pytest.mark.slow
def test_rebuilding_gives_identical_bytes(emoji_dir: Path, tmp_path: Path) -> None:
    build_emoji(tmp_path / "again")
    assert tree_bytes(tmp_path / "again") == tree_bytes(emoji_dir)
    # Re-running into the same folder rewrites nothing.
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "again").rglob("*.png")}
    build_emoji(tmp_path / "again", "--workers", "2")
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "again").rglob("*.png")} == mtimes
    assert tree_bytes(tmp_path / "again") == tree_bytes(emoji_dir)


@pytest.mark.slow
def test_seed_changes_the_split_only(emoji_dir: Path, tmp_path: Path) -> None:
    build_emoji(tmp_path / "seed1", "--seed", "1")
    assert filecmp.cmp(tmp_path / "seed1" / "captions.csv", emoji_dir / "captions.csv", shallow=False)
    assert (tmp_path / "seed1" / "val.csv").read_bytes() != (emoji_dir / "val.csv").read_bytes()


@pytest.mark.slow
def test_a_smaller_rebuild_removes_images_it_no_longer_lists(emoji_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    shutil.copytree(emoji_dir, out)
    info = build_emoji_dataset(EmojiDataConfig(out=out, size=48, limit=10, val_fraction=0.3))
    assert len(list((out / "images").glob("*.png"))) == info.images == len(read_csv(out / "captions.csv"))


@pytest.mark.slow
def test_check_notices_a_changed_or_missing_image(emoji_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "data"
    shutil.copytree(emoji_dir, out)
    first = sorted((out / "images").glob("*.png"))[0]
    first.write_bytes((out / "images" / sorted((out / "images").glob("*.png"))[1].name).read_bytes())
    with pytest.raises(DataError, match="images have changed"):
        check_emoji_dataset(out)
    first.unlink()
    with pytest.raises(DataError, match="missing"):
        check_emoji_dataset(out)


# --- bad input ---


@pytest.mark.slow
def test_missing_font_is_a_one_line_error_that_says_how_to_fix_it(tmp_path: Path) -> None:
    result = run_cli(["data", "emoji", "--out", str(tmp_path / "d"), "--font", str(tmp_path / "no.ttf")])
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "apt-get install fonts-noto-color-emoji" in result.stderr and "--font" in result.stderr
    assert not (tmp_path / "d").exists()


def test_emoji_a_font_cannot_draw_are_skipped_and_counted(tmp_path: Path) -> None:
    if not DEJAVU.is_file():
        pytest.fail(f"{DEJAVU} is missing (Debian's fonts-dejavu-core)")
    # DejaVu Sans draws a few emoji as black symbols, a box (tofu) for most, and ZWJ sequences in parts.
    info = build_emoji_dataset(EmojiDataConfig(out=tmp_path / "d", font=DEJAVU, limit=30))
    assert info.skipped.tofu > 0 and info.skipped.unsupported > 0
    assert 0 < info.images < info.catalogue == info.images + info.skipped.tofu + info.skipped.unsupported
    assert len(read_csv(tmp_path / "d" / "captions.csv")) == info.images
    with pytest.raises(FontError, match="rendered none"):
        build_emoji_dataset(EmojiDataConfig(out=tmp_path / "none", font=DEJAVU, limit=5))
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_an_unrelated_folder_is_never_written_into(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    result = run_cli(["data", "emoji", "--out", str(tmp_path), *EMOJI_ARGS])
    assert result.returncode == 1 and "notes.txt" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_without_raqm_the_command_says_what_to_install(
    emoji_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pillow without raqm (no libfribidi0) draws single emoji only: the command warns and names the fix."""
    from PIL import features
    from typer.testing import CliRunner

    from clipsearch.commands import data as data_cmd  # noqa: F401  (registers the command)
    from clipsearch.commands.app import app

    real = features.check
    monkeypatch.setattr(features, "check", lambda name: False if name == "raqm" else real(name))
    result = CliRunner().invoke(app, ["data", "emoji", "--out", str(tmp_path / "d"), *EMOJI_ARGS])
    assert result.exit_code == 0, result.output
    with_raqm = check_emoji_dataset(emoji_dir)
    without = check_emoji_dataset(tmp_path / "d")
    assert (with_raqm.layout, without.layout) == ("raqm", "basic")
    # The 6 skin tones of 👌 and the ZWJ family variants are sequences: only their bases are drawn.
    assert without.images < with_raqm.images and without.skipped.unsupported > 0
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 2 and all("apt-get install libfribidi0" in w for w in warnings)
    assert f"only {without.images} of {without.catalogue} emoji drawn" in warnings[1]
    assert "the font cannot draw them" not in result.stdout and "no raqm" in result.stdout


@pytest.mark.slow
def test_with_raqm_there_is_no_warning(tmp_path: Path) -> None:
    result = run_cli(["data", "emoji", "--out", str(tmp_path / "d"), *EMOJI_ARGS])
    assert result.returncode == 0 and "warning" not in result.stderr
    assert "the font cannot draw them" in result.stdout
