"""The watcher itself (`clipsearch index --watch`): real file events through watchfiles, bursts as one batch,
a folder that disappears and comes back, polling, one writer, and `kill -9` at any point of a publish."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from indexer.core.bundle.layout import TMP_PREFIX
from indexer.core.bundle.read import open_bundle, read_current
from indexer.data.sources import SourceSpec
from indexer.index.embed import EmbedConfig
from indexer.index.live import LiveResult
from indexer.index.lock import LockError
from indexer.index.runner import ReindexConfig
from indexer.index.stages import PAUSE_ENV
from indexer.index.watch import NETWORK_FS, WatchConfig, filesystem_type, should_poll, watch
from tests.conftest import REPO, run_cli
from tests.index.helpers import make_folder, make_image, run_index

pytestmark = pytest.mark.timeout(240)


class Watcher:
    """`watch` in a thread, with the versions it publishes."""

    def __init__(self, cfg: ReindexConfig, wcfg: WatchConfig) -> None:
        self.results: list[LiveResult] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(cfg, wcfg), daemon=True)

    def _run(self, cfg: ReindexConfig, wcfg: WatchConfig) -> None:
        try:
            watch(cfg, wcfg, self.stop, self.results.append)
        except BaseException as e:  # surfaced by `until`
            import traceback

            self.error = e
            self.trace = traceback.format_exc()

    def until(self, done: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert self.error is None, f"the watcher died: {self.trace}"
            assert time.monotonic() < deadline, f"timed out; published: {self.results}"
            time.sleep(0.05)


@pytest.fixture
def watching(tiny_model_dir: Path, tmp_path: Path) -> Iterator[Callable[..., Watcher]]:
    started: list[Watcher] = []

    def start(folder: Path, bundles: Path, **wcfg: object) -> Watcher:
        cfg = ReindexConfig(
            model_dir=tiny_model_dir,
            source=SourceSpec(str(folder)),
            bundles_dir=bundles,
            embed=EmbedConfig(4, workers=0),
        )
        w = Watcher(cfg, WatchConfig(**{"settle_s": 0.3, **wcfg}))
        started.append(w)
        w.thread.start()
        return w

    yield start
    for w in started:
        w.stop.set()
        w.thread.join(30)


def test_a_file_dropped_in_is_searchable_and_a_burst_is_one_batch(watching, tmp_path):
    folder, bundles = make_folder(tmp_path / "photos", 3), tmp_path / "bundles"
    w = watching(folder, bundles)
    w.until(lambda: len(w.results) == 1)
    assert w.results[0].kind == "full" and w.results[0].images == 3
    time.sleep(0.5)
    make_image(folder / "dropped.png", 31)
    w.until(lambda: len(w.results) == 2)
    assert (w.results[1].kind, w.results[1].added, w.results[1].images) == ("delta", 1, 4)

    staging = tmp_path / "staging"
    for i in range(40):
        make_image(staging / f"b{i:02d}.png", 200 + i)
    shutil.copytree(staging, folder / "burst")  # 40 files as fast as the disk takes them
    w.until(lambda: sum(r.images for r in w.results[-1:]) == 44)
    assert len(w.results) == 3, "the copy of 40 files is one publish"
    assert w.results[2].added == 40
    bundle = open_bundle(bundles)
    assert bundle.count("images") == 44 and len(bundle.manifest.segments) == 2
    bundle.close()


def test_the_folder_disappearing_removes_nothing_and_its_return_is_scanned(watching, tmp_path):
    folder, bundles = make_folder(tmp_path / "photos", 3), tmp_path / "bundles"
    w = watching(folder, bundles)
    w.until(lambda: len(w.results) == 1)
    time.sleep(0.5)
    folder.rename(tmp_path / "unplugged")  # an unmounted drive: no event for the files inside
    time.sleep(2.0)
    assert len(w.results) == 1 and open_bundle(bundles).count("images") == 3
    (tmp_path / "unplugged").rename(folder)
    make_image(folder / "while-away.png", 7)
    (folder / "img00.png").unlink()
    w.until(lambda: len(w.results) == 2)
    assert (w.results[1].added, w.results[1].removed, w.results[1].images) == (1, 1, 3)
    make_image(folder / "after.png", 8)  # and it is watched again
    w.until(lambda: len(w.results) == 3)
    assert w.results[2].images == 4


def test_polling_follows_the_folder_too(watching, tmp_path):
    folder, bundles = make_folder(tmp_path / "photos", 2), tmp_path / "bundles"
    w = watching(folder, bundles, poll=True, poll_delay_ms=100)
    w.until(lambda: len(w.results) == 1)
    time.sleep(0.5)
    make_image(folder / "polled.png", 5)
    w.until(lambda: len(w.results) == 2)
    assert w.results[1].added == 1


def test_network_file_systems_are_polled(tmp_path):
    assert filesystem_type(Path("/proc")) == "proc"
    assert should_poll(tmp_path, True) and not should_poll(tmp_path, False)
    assert should_poll(tmp_path, None) == (filesystem_type(tmp_path) in NETWORK_FS)
    assert {"nfs", "nfs4", "cifs", "9p"} <= NETWORK_FS


def test_one_writer_and_folders_only(watching, tiny_model_dir, tmp_path):
    folder, bundles = make_folder(tmp_path / "photos", 2), tmp_path / "bundles"
    w = watching(folder, bundles)
    w.until(lambda: len(w.results) == 1)
    with pytest.raises(LockError, match="held by another clipsearch index --watch"):
        run_index(tiny_model_dir, folder, bundles)
    csv = tmp_path / "list.csv"
    csv.write_text("filepath\nphotos/img00.png\n")
    proc = run_cli(
        [
            "index",
            "--watch",
            "--model",
            str(tiny_model_dir),
            "--images",
            str(csv),
            "--bundles",
            str(tmp_path / "b"),
        ]
    )
    assert proc.returncode == 1 and proc.stderr.strip().splitlines()[-1] == (
        f"error: --watch follows a folder; --images {csv} is not one"
    )
    args = ["index", "--watch", "--settle", "0", "--model", str(tiny_model_dir), "--images", str(folder)]
    proc = run_cli([*args, "--bundles", str(tmp_path / "b")])
    assert (
        proc.returncode == 1 and proc.stderr.strip() == "error: --settle must be more than 0 seconds, got 0.0"
    )


def _start_cli(model: Path, folder: Path, bundles: Path, pause: str | None = None) -> subprocess.Popen[str]:
    args = [
        "index",
        "--watch",
        "--json",
        "--model",
        str(model),
        "--images",
        str(folder),
        "--bundles",
        str(bundles),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)} | ({PAUSE_ENV: pause} if pause else {})
    cmd = [sys.executable, "-m", "clipsearch", *args, "--workers", "0", "--settle", "0.2"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["embedded-batch-1", "publish-written", "publish-renamed"])
def test_kill_9_mid_delta_leaves_current_whole_and_the_next_start_catches_up(tiny_model_dir, tmp_path, stage):
    folder, bundles = make_folder(tmp_path / "photos", 3), tmp_path / "bundles"
    before = run_index(tiny_model_dir, folder, bundles).bundle
    proc = _start_cli(tiny_model_dir, folder, bundles, pause=stage)
    marker = bundles / ".work" / f"paused-{stage}"
    time.sleep(3)  # started and watching (nothing changed: no version, no pause yet)
    make_image(folder / "new.png", 12)
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "never reached " + stage
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    marker.unlink()
    current = open_bundle(bundles)  # verifies
    assert current.version == before and current.count("images") == 3
    current.close()
    if stage == "publish-written":
        assert list(bundles.glob(f"{TMP_PREFIX}*"))

    proc = _start_cli(tiny_model_dir, folder, bundles)
    try:
        line = proc.stdout.readline()  # the catch-up's delta
        assert '"kind": "delta"' in line and '"added": 1' in line and '"images": 4' in line, line
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(30)
    assert read_current(bundles) != before and not list(bundles.glob(f"{TMP_PREFIX}*"))
    assert open_bundle(bundles).count("images") == 4


def test_a_failing_step_is_logged_and_retried_not_fatal(watching, tmp_path, monkeypatch):
    import indexer.index.live as live_module

    real, calls = live_module.publish_version, []

    def full_disk_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(live_module, "publish_version", full_disk_once)
    folder, bundles = make_folder(tmp_path / "photos", 2), tmp_path / "bundles"
    w = watching(folder, bundles)
    w.until(lambda: len(w.results) == 1)
    time.sleep(0.5)
    make_image(folder / "late.png", 4)
    w.until(lambda: len(w.results) == 2, timeout=90)  # the rescan after the back-off publishes it
    assert len(calls) == 2 and w.results[1].added == 1 and w.results[1].images == 3
    assert open_bundle(bundles).count("images") == 3
