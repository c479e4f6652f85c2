"""The demo for real: `clipsearch demo` renders emoji, trains, indexes and serves, in child processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from indexer.core.bundle.read import open_bundle
from tests.conftest import REPO, run_cli

pytestmark = pytest.mark.slow

FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
QUICK = ["--limit", "40", "--model", "tiny-test", "--time-budget", "0.1", "--device", "cpu", "--font", FONT]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    res = run_cli(["demo", "--workdir", str(workdir), "--no-serve", *QUICK], timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    return workdir


def test_demo_builds_a_servable_bundle(demo_dir):
    bundle = open_bundle(demo_dir / "bundles")
    try:
        assert bundle.manifest.images.count == 48 and bundle.manifest.texts.count > 0
        assert (demo_dir / "run" / "model" / "open_clip_model.safetensors").is_file()
    finally:
        bundle.close()


def test_second_run_skips_every_stage(demo_dir):
    res = run_cli(["demo", "--workdir", str(demo_dir), "--no-serve", *QUICK], timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    for stage in ("data", "train", "index"):
        assert f"[{stage}] up to date, skipped" in res.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_demo_serves_search(demo_dir):
    port = _free_port()
    cmd = [
        sys.executable,
        "-m",
        "clipsearch",
        "demo",
        "--workdir",
        str(demo_dir),
        "--port",
        str(port),
        *QUICK,
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            time.sleep(0.5)
        else:
            pytest.fail("the demo server never became ready")
        r = httpx.post(f"{url}/v1/search/text", json={"query": "dog face", "k": 5}, timeout=30)
        assert r.status_code == 200
        hits = r.json()["results"]
        assert len(hits) == 5 and all(h["kind"] == "image" and h["caption"] for h in hits)
        assert httpx.get(url + hits[0]["image_url"], timeout=10).headers["content-type"] == "image/png"
        assert "<input" in httpx.get(f"{url}/", timeout=10).text
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
