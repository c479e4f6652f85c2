"""A full disk while the cache is written or a bundle is published: one `DiskFullError` line naming the
filesystem and the space the run needed, no leftovers, CURRENT whole, and the next run resumes."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from indexer.core.bundle.layout import TMP_PREFIX, WORK_DIR
from indexer.core.bundle.read import open_bundle, read_current
from indexer.core.diskspace import DiskFullError, describe, is_disk_full
from indexer.index.cache import EmbeddingCache
from indexer.index.stages import PAUSE_DIR_ENV, PAUSE_ENV, RESUME_ENV
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

    def put(self: EmbeddingCache, kind: str, rows: object) -> None:
        calls.append(kind)
        if len(calls) == 2:
            raise sqlite3.OperationalError("database or disk is full")
        real_put(self, kind, rows)  # type: ignore[arg-type]

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


# A real full disk: a small tmpfs holds the bundles dir; the run is paused at a named moment, the disk
# is filled by another file meanwhile, and the run resumes into it. Needs root (mount).


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mnt)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave: int = 0) -> Path:
    filler = mnt / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
        except OSError:
            pass
    free = os.statvfs(mnt).f_bavail * os.statvfs(mnt).f_frsize
    if leave:
        os.truncate(filler, max(0, filler.stat().st_size - leave + free))
    return filler


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("stage", "what"), [("embedded-batch#1", "embedding cache"), ("embedded", "publishing")]
)
def test_a_real_full_disk_is_one_line_and_current_stays_whole(tiny_model_dir, tmp_path, tmpfs, stage, what):
    src = make_folder(tmp_path / "photos", 4)
    bundles = tmpfs / "b"
    first = run_index(tiny_model_dir, src, bundles).bundle
    for i in range(60):
        make_image(src / f"new{i:02d}.png", seed=100 + i, size=64)
    pause = tmp_path / "pause"
    pause.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        PAUSE_ENV: stage,
        PAUSE_DIR_ENV: str(pause),
        RESUME_ENV: "1",
    }
    cmd = [sys.executable, "-m", "clipsearch", "index", "--model", str(tiny_model_dir), "--images", str(src)]
    cmd += ["--bundles", str(bundles), "--batch-size", "2", "--workers", "0"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker = pause / f"paused-{stage.split('#')[0]}"
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    filler = _fill(tmpfs)
    marker.unlink()
    out, err = proc.communicate(timeout=120)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 1 and out == "" and "Traceback" not in err, err
    assert len(errors) == 1 and f"no space left on {tmpfs} (tmpfs" in errors[0] and what in errors[0], errors
    assert read_current(bundles) == first
    open_bundle(bundles).close()
    assert not list(bundles.glob(f"{TMP_PREFIX}*"))
    filler.unlink()
    res = run_index(tiny_model_dir, src, bundles)
    assert res.images == 64 and read_current(bundles) == res.bundle
    assert not list((bundles / WORK_DIR).rglob("*-wal")), "the next run merged what the full disk left"
