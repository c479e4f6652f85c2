"""A real `kill -9` of a child `clipsearch index` at several points: CURRENT stays a complete, verifiable
bundle, and the next run cleans up and resumes from the embedding cache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from indexer.core.bundle.layout import TMP_PREFIX
from indexer.core.bundle.read import open_bundle, read_current
from indexer.index.stages import PAUSE_DIR_ENV, PAUSE_ENV
from tests.conftest import REPO
from tests.index.helpers import make_folder, make_image, run_index

pytestmark = pytest.mark.slow

NEW = 6  # images added after the baseline bundle; the killed run embeds them 2 per batch


def _start(model: Path, src: Path, bundles: Path, stage: str) -> subprocess.Popen[bytes]:
    args = ["index", "--model", str(model), "--images", str(src), "--bundles", str(bundles)]
    env = {**os.environ, "PYTHONPATH": str(REPO), PAUSE_ENV: stage, PAUSE_DIR_ENV: str(bundles / ".work")}
    cmd = [sys.executable, "-m", "clipsearch", *args, "--batch-size", "2", "--workers", "1"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _ids(bundles: Path) -> dict[str, int]:
    b = open_bundle(bundles)
    try:
        return {(it.path or it.text or ""): it.id for it in b.items.all()}
    finally:
        b.close()


def _kill_at(proc: subprocess.Popen[bytes], marker: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert proc.poll() is None, f"indexer exited ({proc.returncode}) before reaching {marker.name}"
        assert time.monotonic() < deadline, f"never reached {marker.name}"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    marker.unlink()


@pytest.mark.parametrize(
    ("stage", "expect_current_new", "expect_resumed"),
    [
        ("scan-hashed#2", False, False),
        ("scanned", False, False),
        ("cache-write#1", False, False),  # inside the first batch's transaction: nothing committed
        ("embedded-batch-1", False, True),
        ("built-images", False, True),
        ("publish-model", False, True),
        ("publish-written", False, True),
        ("publish-renamed", False, True),
        ("current-tmp", False, True),
        ("published", True, True),
    ],
)
def test_kill_9_leaves_current_loadable_and_next_run_resumes(
    tiny_model_dir, tmp_path, stage, expect_current_new, expect_resumed
):
    src = make_folder(tmp_path / "photos", 3)
    bundles = tmp_path / "bundles"
    baseline = run_index(tiny_model_dir, src, bundles).bundle
    before = _ids(bundles)
    for i in range(NEW):
        make_image(src / f"new{i}.png", seed=50 + i)

    proc = _start(tiny_model_dir, src, bundles, stage)
    _kill_at(proc, bundles / ".work" / f"paused-{stage.split('#')[0]}")

    if stage == "publish-written":
        assert list(bundles.glob(f"{TMP_PREFIX}*")), "the kill left a half-published temp dir behind"
    current = open_bundle(bundles)  # verifies checksums, counts, dimensions, fingerprint
    assert (current.version != baseline) == expect_current_new
    assert current.image_index.ntotal == (3 + NEW if expect_current_new else 3)
    current.close()

    res = run_index(tiny_model_dir, src, bundles)
    assert res.images == 3 + NEW
    assert not list(bundles.glob(f"{TMP_PREFIX}*")), "the next run removed the leftovers"
    if expect_resumed:
        assert res.embedded <= NEW - 2, "vectors committed before the kill are reused"
    else:
        assert res.embedded == NEW
    assert read_current(bundles) == res.bundle
    after = _ids(bundles)
    assert {k: after[k] for k in before} == before, "no item changed its id"
    assert len(set(after.values())) == len(after)
