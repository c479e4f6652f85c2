"""A full disk while the cache is written or a bundle is published: one `DiskFullError` line naming the
filesystem and the space the run needed, no leftovers, CURRENT whole, and the next run resumes."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from indexer.core.bundle.layout import TMP_PREFIX, WORK_DIR
from indexer.core.bundle.read import open_bundle, read_current
from indexer.core.diskspace import DiskFullError, describe, is_disk_full
from indexer.index.cache import EmbeddingCache
from tests.cli.test_index_cli import call
from tests.conftest import REPO
from tests.index.helpers import make_folder, make_image, run_index


def test_every_way_a_full_disk_is_reported_is_recognised() -> None:
    assert is_disk_full(OSError(28, "No space left on device"))
    assert is_disk_full(sqlite3.OperationalError("database or disk is full"))
    faiss_msg = (
        "Error in faiss::write_index: write error in /x/i.faiss: 57299 != 128000 (No space left on device)"
    )
    assert is_disk_full(RuntimeError(faiss_msg))
    assert not is_disk_full(OSError(13, "Permission denied")) and not is_disk_full(RuntimeError("other"))


def test_the_message_names_the_filesystem_and_the_space(tmp_path: Path) -> None:
    line = describe(tmp_path / "b" / "not-yet", "writing the cache", needed=3 << 20, free_at_start=1 << 20)
    assert line.startswith("no space left on /") and "free) while writing the cache" in line
    assert "needs about 3.0 MiB and 1.0 MiB was free when it started" in line and "\n" not in line


@pytest.fixture
def grown(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, Path, str]:
    """A published bundle of 3 images, then 6 more images waiting to be indexed."""
    src = make_folder(tmp_path / "photos", 3)
    bundles = tmp_path / "b"
    first = run_index(tiny_model_dir, src, bundles).bundle
    for i in range(6):
        make_image(src / f"new{i}.png", seed=40 + i)
    return src, bundles, first


def _assert_whole(bundles: Path, version: str) -> None:
    assert read_current(bundles) == version
    open_bundle(bundles).close()  # checksums, counts, dimensions, fingerprint
    assert not list(bundles.glob(f"{TMP_PREFIX}*")) and not (bundles / "CURRENT.tmp").exists()
    assert not list((bundles / WORK_DIR).rglob("*-wal")) and not list((bundles / WORK_DIR).rglob("*-shm"))


def test_full_disk_during_cache_writes(tiny_model_dir, grown, monkeypatch):
    src, bundles, first = grown
    real_put, calls = EmbeddingCache.put, []

    def put(self: EmbeddingCache, kind: str, rows: object, *facts: object) -> None:
        calls.append(kind)
        if len(calls) == 2:
            raise sqlite3.OperationalError("database or disk is full")
        real_put(self, kind, rows, *facts)  # type: ignore[arg-type]

    monkeypatch.setattr(EmbeddingCache, "put", put)
    with pytest.raises(DiskFullError, match=r"no space left on .* while writing the embedding cache") as e:
        run_index(tiny_model_dir, src, bundles, batch_size=2)
    assert "this run needs about" in str(e.value)
    _assert_whole(bundles, first)
    monkeypatch.undo()
    res = run_index(tiny_model_dir, src, bundles, batch_size=2)
    assert res.images == 9 and res.embedded == 4, "the batch committed before the disk filled is kept"


def test_full_disk_while_publishing(tiny_model_dir, grown, monkeypatch):
    import indexer.index.publish as publish

    src, bundles, first = grown

    def write_index(index: object, path: str) -> None:
        Path(path).write_bytes(b"partial")
        raise RuntimeError(f"Error in write_index: write error in {path}: 7 != 999 (No space left on device)")

    monkeypatch.setattr(publish.faiss, "write_index", write_index)
    with pytest.raises(DiskFullError, match="while publishing the new bundle"):
        run_index(tiny_model_dir, src, bundles)
    _assert_whole(bundles, first)
    monkeypatch.undo()
    assert run_index(tiny_model_dir, src, bundles).embedded == 0, "every vector was cached before publishing"


def test_command_line_error_is_one_line_and_verbose_gives_the_traceback(
    tiny_model_dir, grown, monkeypatch, capsys
):
    import indexer.index.publish as publish

    src, bundles, first = grown

    def write_index(index: object, path: str) -> None:
        raise RuntimeError(f"write error in {path}: 0 != 999 (No space left on device)")

    monkeypatch.setattr(publish.faiss, "write_index", write_index)
    args = ["index", "--model", str(tiny_model_dir), "--images", str(src), "--bundles", str(bundles)]
    rc, out, err = call([*args, "--workers", "0"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert rc == 1 and out == "" and len(errors) == 1 and "Traceback" not in err
    assert "no space left on" in errors[0] and "publishing the new bundle" in errors[0]
    rc, _, err = call([*args, "--workers", "0", "--verbose"], capsys)
    assert (
        rc == 1
        and "Traceback (most recent call last)" in err
        and err.rstrip().splitlines()[-1].startswith("error:")
    )
    _assert_whole(bundles, first)


def test_an_unexpected_error_is_one_line_naming_where(tiny_model_dir, grown, monkeypatch, capsys):
    import indexer.index.runner as runner

    src, bundles, _ = grown

    def boom(*a: object, **k: object) -> None:
        raise KeyError("surprise")

    monkeypatch.setattr(runner, "build_index", boom)
    args = ["index", "--model", str(tiny_model_dir), "--images", str(src), "--bundles", str(bundles)]
    rc, _, err = call([*args, "--workers", "0"], capsys)
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert (
        rc == 1
        and "unexpected KeyError" in line
        and "indexer/index/runner.py:" in line
        and "--verbose" in line
    )
    assert "Traceback" not in err
    rc, _, err = call(["--verbose", *args, "--workers", "0"], capsys)
    assert rc == 1 and "Traceback" in err, "the root --verbose works for every command"


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_real_full_disk_on_a_tmpfs(tmp_path: Path) -> None:
    """The suite's disk-full scenario: a tmpfs filled by another process while the run writes its cache,
    or just before it publishes, or too small from the start (`benchmarks/faults.py`, needs root)."""
    out = tmp_path / "disk.json"
    cmd = [
        sys.executable,
        str(REPO / "benchmarks" / "faults.py"),
        "--only",
        "disk-full",
        "--disk-trials",
        "1",
    ]
    subprocess.run(
        [*cmd, "--work", str(tmp_path / "work"), "--out", str(out)], capture_output=True, timeout=850
    )
    (row,) = json.loads(out.read_text())["rows"]
    if row["trials"] == 0:
        pytest.skip(row["figure"])  # "not run: cannot mount a tmpfs (needs root): ..."
    trials = row["details"]["trials"]
    assert [t["moment"] for t in trials] == ["cache-write#2", "publish-model", "before the run"]
    for t in trials:
        assert t["ok"], t
        assert t["exit"] == 1 and len(t["error"]) == 1 and "(tmpfs" in t["error"][0]
    assert "while writing the embedding cache" in trials[0]["error"][0]
    assert "while publishing the new bundle" in trials[1]["error"][0]
    assert "not enough space" in trials[2]["error"][0] and "needs about" in trials[2]["error"][0]
