"""`clipsearch index --ray`: the embedding stage on a local Ray cluster gives the bundle a single-process run
gives, re-runs embed only what changed, and a killed encoder actor is retried by Ray."""

from __future__ import annotations

import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from indexer.core.bundle.read import open_bundle
from indexer.index.ray_embed import RayConfig, RayUnavailable, pool_shape, require_ray
from tests.index.helpers import make_folder, make_image, run_index

ray = pytest.importorskip("ray", reason="the dev extra installs ray[data]")


@pytest.fixture(scope="module")
def local_ray():
    """A 2-CPU local Ray (as on this machine); the runs reuse it instead of starting their own."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _bundle_by_path(bundles: Path) -> tuple[dict[str, tuple[object, ...]], dict[str, np.ndarray]]:
    b = open_bundle(bundles)
    try:
        items = b.items.get_many(list(range(1000)))
        rows = {
            it.path: (it.sha256, it.width, it.height, it.text)
            for it in items.values()
            if it.kind == "image" and it.path
        }
        vecs = {it.path: b.image_index.reconstruct(it.id) for it in items.values() if it.kind == "image"}
        return rows, vecs
    finally:
        b.close()


def _with_bad_file(folder: Path) -> Path:
    (folder / "broken.png").write_bytes(b"not a png at all")
    return folder


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_bundle_built_on_ray_equals_one_built_here(local_ray, tiny_model_dir, tmp_path):
    folder = _with_bad_file(make_folder(tmp_path / "photos", 9))
    here = run_index(tiny_model_dir, folder, tmp_path / "here")
    on_ray = run_index(tiny_model_dir, folder, tmp_path / "ray", ray=RayConfig(actors=2))
    assert (
        (on_ray.images, on_ray.skipped, on_ray.embedded)
        == (here.images, here.skipped, here.embedded)
        == (
            9,
            1,
            9,
        )
    )
    rows_here, vecs_here = _bundle_by_path(tmp_path / "here")
    rows_ray, vecs_ray = _bundle_by_path(tmp_path / "ray")
    assert rows_ray == rows_here  # same files, hashes, sizes and captions
    for path, vec in vecs_here.items():
        np.testing.assert_allclose(vecs_ray[path], vec, atol=1e-5)
    b = open_bundle(tmp_path / "ray")
    try:
        assert b.manifest.stats["skipped"] == 1
    finally:
        b.close()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_incremental_rerun_on_ray_embeds_only_what_changed(local_ray, tiny_model_dir, tmp_path):
    folder = make_folder(tmp_path / "photos", 6)
    bundles = tmp_path / "bundles"
    cfg = RayConfig(actors=1)
    assert run_index(tiny_model_dir, folder, bundles, ray=cfg).embedded == 6
    make_image(folder / "new.png", seed=200)
    make_image(folder / "img02.png", seed=201)  # changed content under the same path
    res = run_index(tiny_model_dir, folder, bundles, ray=cfg)
    assert (res.added, res.updated, res.unchanged, res.embedded) == (1, 1, 5, 2)
    assert run_index(tiny_model_dir, folder, bundles, ray=cfg).embedded == 0
    # The same cache serves a run without Ray: the vectors do not depend on where they were computed.
    assert run_index(tiny_model_dir, folder, bundles).embedded == 0


def _encoder_actor_pids() -> list[int]:
    """Processes of this test's own Ray (descendants of this process) that host an encoder actor."""
    pids = []
    for p in psutil.Process().children(recursive=True):
        try:
            if "_EncoderActor" in " ".join(p.cmdline()):
                pids.append(p.pid)
        except psutil.Error:
            continue
    return pids


def _cached_vectors(bundles: Path) -> int:
    dbs = list((bundles / ".work" / "cache").glob("*.sqlite"))
    if not dbs:
        return 0
    try:
        with sqlite3.connect(f"file:{dbs[0]}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT count(*) FROM vectors").fetchone()[0])
    except sqlite3.OperationalError as e:  # the cache is still being created
        if "no such table" in str(e):
            return 0
        raise


IMAGES = 48  # enough that the actor is killed before it has embedded them all


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_killed_encoder_actor_is_retried_and_the_bundle_is_whole(local_ray, tiny_model_dir, tmp_path):
    folder = make_folder(tmp_path / "photos", IMAGES)
    bundles = tmp_path / "bundles"
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["ok"] = run_index(tiny_model_dir, folder, bundles, batch_size=2, ray=RayConfig(actors=1))
        except BaseException as e:  # reported by the assertions below
            result["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    try:
        deadline = time.monotonic() + 240
        pids: list[int] = []
        while not pids and time.monotonic() < deadline and worker.is_alive():
            pids = _encoder_actor_pids()
            time.sleep(0.02)
        assert pids, f"no encoder actor process appeared: {result}"
        for pid in pids:  # kill -9 the actor mid-run: it has not embedded every image yet
            os.kill(pid, signal.SIGKILL)
        assert _cached_vectors(bundles) < IMAGES
    finally:
        # the run ends before the module's Ray is shut down under it, whatever failed above (a Ray call
        # still in flight in this thread at ray.shutdown() took the whole pytest process down once)
        worker.join(240)
    assert not worker.is_alive()
    assert "error" not in result, result.get("error")
    res = result["ok"]
    assert (res.images, res.skipped, res.embedded) == (IMAGES, 0, IMAGES)  # type: ignore[attr-defined]
    run_index(tiny_model_dir, folder, tmp_path / "here", batch_size=2)
    _, vecs_here = _bundle_by_path(tmp_path / "here")
    _, vecs_ray = _bundle_by_path(bundles)
    assert set(vecs_ray) == set(vecs_here)
    for path, vec in vecs_here.items():
        np.testing.assert_allclose(vecs_ray[path], vec, atol=1e-5)


def test_without_ray_installed_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(RayUnavailable, match=r"pip install 'clipsearch\[ray\]'"):
        require_ray()


def test_the_pool_is_sized_to_the_cluster():
    assert pool_shape(RayConfig(), {"CPU": 2.0}) == (1, 0.5, 0.0)
    assert pool_shape(RayConfig(), {"CPU": 64.0, "GPU": 8.0}) == (8, 0.5, 1.0)
    assert pool_shape(RayConfig(actor_gpus=0.5), {"CPU": 16.0, "GPU": 2.0}) == (4, 0.5, 0.5)
    assert pool_shape(RayConfig(actors=3, actor_cpus=0.25), {"CPU": 2.0}) == (3, 0.25, 0.0)


def test_a_cpu_actor_computes_with_its_share_of_the_cluster_cpus(tiny_model_dir):
    """Ray gives a fractional actor OMP_NUM_THREADS=1; the actor sets torch's threads to its share."""
    import torch

    from indexer.core.modeldir import model_fingerprint
    from indexer.index.embed import EmbedConfig
    from indexer.index.ray_embed import _EncoderActor, actor_threads

    assert actor_threads({"CPU": 2.0}, 1) == 2
    assert actor_threads({"CPU": 2.0}, 4) == 1
    assert actor_threads({"CPU": 16.0}, 4) == 4
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # what a worker started with OMP_NUM_THREADS=1 has
        fingerprint = model_fingerprint(tiny_model_dir)
        _EncoderActor(str(tiny_model_dir), "cpu", fingerprint, EmbedConfig(), threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
