"""Two `clipsearch serve` replicas over one bundles directory, behind any load balancer: a new CURRENT is
served by both with no failed request meanwhile, and the replicas write nothing into the bundles they
serve. Also: memory-mapped indexes answer exactly as indexes read into memory."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from indexer.core.bundle.read import open_bundle_dir, read_current
from indexer.index.build import IndexConfig
from tests.conftest import REPO
from tests.index.helpers import make_folder, make_image, run_index


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` but the servers' leases, with its size and mtime."""
    out = {}
    for p in root.rglob("*"):
        rel = p.relative_to(root)
        if p.is_file() and rel.parts[0] != ".leases":
            st = p.stat()
            out[str(rel)] = (st.st_size, st.st_mtime_ns)
    return out


def _replica(bundles: Path, port: int) -> subprocess.Popen[str]:
    args = [
        sys.executable,
        "-m",
        "clipsearch",
        "serve",
        "--bundles",
        str(bundles),
        "--port",
        str(port),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--mmap-indexes",
        "--reload-poll-s",
        "0.2",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_ready(client: httpx.Client, url: str, proc: subprocess.Popen[str], deadline: float) -> None:
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            if client.get(f"{url}/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url} never became ready")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_replicas_switch_to_a_new_current_without_a_failed_request(tiny_model_dir, tmp_path):
    folder = make_folder(tmp_path / "photos", 4)
    bundles = tmp_path / "bundles"
    first = run_index(tiny_model_dir, folder, bundles).bundle
    ports = [_free_port(), _free_port()]
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    procs = [_replica(bundles, p) for p in ports]
    failures: list[str] = []
    served: dict[str, set[str]] = {u: set() for u in urls}
    stop = threading.Event()

    def load(client: httpx.Client) -> None:  # round-robin, as a load balancer would
        n = 0
        while not stop.is_set():
            url = urls[n % 2]
            n += 1
            try:
                r = client.post(f"{url}/v1/search/text", json={"query": "a picture", "k": 3})
                if r.status_code != 200:
                    failures.append(f"{url}: {r.status_code} {r.text[:200]}")
                else:
                    served[url].add(r.json()["bundle"])
            except httpx.HTTPError as e:
                failures.append(f"{url}: {e!r}")

    try:
        with httpx.Client(timeout=30) as client:
            deadline = time.monotonic() + 180
            for url, proc in zip(urls, procs, strict=True):
                _wait_ready(client, url, proc, deadline)
            before = _tree(bundles)
            worker = threading.Thread(target=load, args=(client,), daemon=True)
            worker.start()
            time.sleep(1.0)
            make_image(folder / "new.png", seed=300)
            second = run_index(tiny_model_dir, folder, bundles, keep=0).bundle
            assert read_current(bundles) == second != first
            changed = _tree(bundles)
            while time.monotonic() < deadline:
                infos = [client.get(f"{u}/v1/info").json() for u in urls]
                if all(i["bundle"] == second for i in infos):
                    break
                time.sleep(0.2)
            time.sleep(1.0)  # a little more traffic on the new version
            stop.set()
            worker.join(30)
            assert [i["bundle"] for i in infos] == [second, second]
    finally:
        stop.set()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    assert not failures, failures[:5]
    for url in urls:
        assert served[url] == {first, second}, served
    # The replicas only read: apart from their leases, the bundles dir holds what the indexer wrote.
    assert _tree(bundles) == changed and set(before) <= set(changed)


def test_memory_mapped_indexes_answer_as_indexes_in_memory(tiny_model_dir, tmp_path):
    folder = make_folder(tmp_path / "photos", 12)
    bundles = tmp_path / "bundles"
    for kind in ("flat", "IVF2,Flat"):
        run_index(tiny_model_dir, folder, bundles, index=IndexConfig(kind=kind), keep=0)
        root = bundles / read_current(bundles)
        queries = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        in_memory, mapped = open_bundle_dir(root), open_bundle_dir(root, mmap=True)
        try:
            a = in_memory.image_index.search(queries, 5)
            b = mapped.image_index.search(queries, 5)
            np.testing.assert_array_equal(a[1], b[1])
            np.testing.assert_allclose(a[0], b[0])
        finally:
            in_memory.close()
            mapped.close()
