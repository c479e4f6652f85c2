"""Live-collection benchmark: a file written into a watched folder → the first search that returns it.

For each size, a bundle of N synthetic unit vectors (the base; search and load cost what real ones cost)
is served by a real `clipsearch serve` under an open-loop load of text queries, while the watcher
(`indexer.index.watch.watch`, as `clipsearch index --watch` runs it) follows an empty folder. Files
(photo-sized JPEGs) are dropped one at a time; for each, the time from the write to the first search
whose answer returns it is taken: the prober watches `/v1/info` for a new version and then searches with
the file itself (image→image, which finds it at score 1 whatever the weights). Then, in-process, the
service's cost to switch to a version adding one item is compared with a full load of the same bundle.

The floors (issue 11): p95 ≤ 5 s at 100k and 1M vectors under 10 QPS with no failed query; a reload
of one added item ≤ 5 % of a full bundle load.

    python benchmarks/live.py                                   # full run: 100k and 1M, 20 files, 10 QPS
    python benchmarks/live.py --sizes 2000 --files 5 --qps 2    # a quick check

The watcher runs with `catch_up=False` because the synthetic base is not the folder's contents (a
catch-up scan would rightly remove it); everything after that is the code `--watch` runs. Without
`--model`, the model is ViT-B-32 with random weights (the real ones cannot be downloaded here; the cost
is the same): pass `--model ViT-B-32 --pretrained laion2b_s34b_b79k` where they can be.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.serve import QUERIES, free_port, query_images, start, stop  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


# ------------------------------------------------------------------------------------------ fixtures


def model_dir(work: Path, model: str | None, pretrained: str | None) -> Path:
    from indexer.core.modelref import ModelReference, resolve_model_dir

    if model is not None:
        return resolve_model_dir(ModelReference(model, pretrained), work / "models")
    target = work / "vit-b-32-random"
    if not (target / "open_clip_model.safetensors").is_file():
        import open_clip
        import torch

        from indexer.core.architectures import model_config
        from indexer.core.modeldir import save_model_dir

        torch.manual_seed(0)
        save_model_dir(
            open_clip.create_model("ViT-B-32"), model_config("ViT-B-32"), target, name="ViT-B-32-random"
        )
    return target


def synthetic_bundle(work: Path, model: Path, n: int, index: str) -> Path:
    """A bundles dir whose one version holds `n` synthetic image vectors and 1,000 texts (kept per size)."""
    import shutil

    import faiss

    from indexer.core.bundle.items import Item
    from indexer.core.bundle.manifest import IndexSpec
    from indexer.core.encoder import Encoder
    from indexer.index.build import IndexConfig, array_blocks, build_index
    from indexer.index.publish import BundleContents, publish, set_current

    bundles = work / f"bundles-{n}-{index}"
    if (bundles / "base.txt").is_file():  # built by an earlier run: back to the bare base, nothing else
        base = (bundles / "base.txt").read_text().strip()
        for p in bundles.iterdir():
            if p.is_dir() and p.name not in (base, ".work"):
                shutil.rmtree(p)
        set_current(bundles, base)
        return bundles
    info = Encoder.from_dir(model, "cpu").info
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, info.embed_dim), dtype=np.float32)
    faiss.normalize_L2(x)
    t = rng.standard_normal((1000, info.embed_dim), dtype=np.float32)
    faiss.normalize_L2(t)
    print(f"building a {index} base of {n:,} vectors ...", flush=True)
    image_index, image_spec = build_index(
        array_blocks(x), np.arange(n, dtype=np.int64), info.embed_dim, IndexConfig(index)
    )
    text_index, text_spec = build_index(
        array_blocks(t), np.arange(n, n + 1000, dtype=np.int64), info.embed_dim, IndexConfig("flat")
    )
    del x
    items = [Item(id=i, kind="image", path=f"/synthetic/{i}.jpg", text=f"synthetic {i}") for i in range(n)]
    items += [Item(id=n + i, kind="text", text=f"caption {i}") for i in range(1000)]
    contents = BundleContents(
        model_dir=model, model=info, image_index=image_index, text_index=text_index, items=items,
        images=IndexSpec(**{**image_spec.model_dump(), "file": "images.faiss"}),
        texts=IndexSpec(**{**text_spec.model_dump(), "file": "texts.faiss"}),
        stats={"next_id": n + 1000, "numerics": "default", "source": "synthetic"},
    )  # fmt: skip
    (bundles / "base.txt").write_text(publish(bundles, contents).name)
    return bundles


# ------------------------------------------------------------------------------------------- roles


def run_watcher(args: argparse.Namespace) -> None:
    """`--role watcher`: the watcher as `--watch` runs it, one JSON line per publish on stdout."""
    import logging

    logging.basicConfig(level=logging.ERROR, format="%(asctime)s %(name)s: %(message)s")  # open_clip: quiet
    logging.getLogger("indexer").setLevel(logging.INFO)
    from indexer.data.sources import SourceSpec
    from indexer.index.embed import EmbedConfig
    from indexer.index.live import LiveResult
    from indexer.index.runner import ReindexConfig
    from indexer.index.watch import WatchConfig, watch

    cfg = ReindexConfig(
        model_dir=Path(args.model_dir), source=SourceSpec(args.folder), bundles_dir=Path(args.bundles),
        embed=EmbedConfig(workers=0), keep=3,
    )  # fmt: skip

    def report(r: LiveResult) -> None:
        print(json.dumps({**r.summary(), "at": time.time()}), flush=True)

    watch(cfg, WatchConfig(settle_s=args.settle, catch_up=False), on_publish=report)


class Load:
    """Open-loop text queries at a fixed rate; latencies and failures."""

    def __init__(self, url: str, qps: float) -> None:
        self.url, self.qps = url, qps
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _one(self, http: httpx.Client, i: int) -> None:
        t0 = time.perf_counter()
        try:
            r = http.post("/v1/search/text", json={"query": QUERIES[i % len(QUERIES)], "k": 10})
            if r.status_code != 200:
                self.failures.append(f"{r.status_code} {r.text[:100]}")
                return
        except httpx.HTTPError as e:
            self.failures.append(repr(e))
            return
        self.latencies.append(time.perf_counter() - t0)

    def _run(self) -> None:
        if self.qps <= 0:
            return
        with httpx.Client(base_url=self.url, timeout=60) as http, ThreadPoolExecutor(16) as pool:
            start_t, i = time.perf_counter(), 0
            while not self.stop.is_set():
                pool.submit(self._one, http, i)
                i += 1
                self.stop.wait(max(0.0, start_t + i / self.qps - time.perf_counter()))


def time_to_found(url: str, folder: Path, files: list[bytes], gap_s: float, timeout_s: float) -> list[float]:
    """Drop each file; seconds from its write to the first search that returns it."""
    out = []
    with httpx.Client(base_url=url, timeout=60) as http:
        version = http.get("/v1/info").json()["bundle"]
        for n, data in enumerate(files):
            path = folder / f"drop-{n:03d}.jpg"
            t0 = time.perf_counter()
            path.write_bytes(data)
            while True:
                assert time.perf_counter() - t0 < timeout_s, f"{path.name} not found in {timeout_s} s"
                now = http.get("/v1/info").json()["bundle"]
                if now != version:
                    version = now
                    r = http.post("/v1/search/image", files={"file": (path.name, data)}, data={"k": "1"})
                    hits = r.json().get("results", [])
                    if hits and hits[0]["path"] == str(path.resolve()):
                        out.append(time.perf_counter() - t0)
                        break
                time.sleep(0.02)
            print(f"  {path.name}: {out[-1]:.2f} s", flush=True)
            time.sleep(gap_s)
    return out


def reload_cost(bundles: Path, model: Path, repeats: int) -> dict[str, float]:
    """In-process: a full load of the current version vs switching to a version that adds one item."""
    from indexer.core.bundle.items import Item
    from indexer.core.bundle.read import open_bundle_dir, read_current
    from indexer.index.segments import SegmentContents, publish_version
    from service.settings import ServiceSettings
    from service.state import ServiceState

    settings = ServiceSettings(bundles=bundles, device="cpu", reload_poll_s=0)
    t0 = time.perf_counter()
    state = ServiceState(settings)
    state.reload()
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    open_bundle_dir(bundles / read_current(bundles)).close()
    bundle_only = time.perf_counter() - t0
    writer = open_bundle_dir(bundles / read_current(bundles), mmap=True)
    dim = writer.manifest.model.embed_dim
    deltas = []
    rng = np.random.default_rng(7)
    for i in range(repeats):
        new_id = int(writer.manifest.stats.get("next_id", 10**9)) + 10_000 + i
        v = rng.standard_normal((1, dim)).astype(np.float32)
        v /= np.linalg.norm(v)
        row = Item(id=new_id, kind="image", path=f"/synthetic/added-{i}.jpg")
        new = publish_version(bundles, writer, delta=SegmentContents(frozenset({new_id}), [row], v))
        writer.close()
        writer = new
        t0 = time.perf_counter()
        assert state.reload().changed
        deltas.append(time.perf_counter() - t0)
    writer.close()
    state.close()
    delta = statistics.median(deltas)
    return {"full_load_s": full, "bundle_load_s": bundle_only, "delta_reload_s": delta, "ratio": delta / full,
            "ratio_bundle_only": delta / bundle_only}  # fmt: skip


# -------------------------------------------------------------------------------------------- main


def run_size(args: argparse.Namespace, work: Path, model: Path, n: int) -> dict[str, object]:
    bundles = synthetic_bundle(work, model, n, args.index)
    folder = work / f"watched-{n}"
    if folder.exists():
        for p in folder.iterdir():
            p.unlink()
    folder.mkdir(exist_ok=True)
    port = free_port()
    server = start(
        [sys.executable, "-m", "clipsearch", "serve", "--bundles", str(bundles), "--port", str(port),
         "--log-level", "warning", "--device", "cpu"],
        {"PYTHONPATH": str(REPO)}, port,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    while httpx.get(f"{url}/readyz", timeout=5).status_code != 200:
        time.sleep(0.5)
    log = open(work / f"watcher-{n}.log", "w")  # noqa: SIM115 - closed with the process
    watcher = subprocess.Popen(
        [sys.executable, __file__, "--role", "watcher", "--model-dir", str(model), "--folder", str(folder),
         "--bundles", str(bundles), "--settle", str(args.settle)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=log, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + args.warmup
    while "watching " not in (work / f"watcher-{n}.log").read_text():  # base verified, model loaded
        assert watcher.poll() is None, (work / f"watcher-{n}.log").read_text()[-2000:]
        assert time.monotonic() < deadline, "the watcher did not start"
        time.sleep(0.2)
    load = Load(url, args.qps)
    load.thread.start()
    try:
        found = time_to_found(url, folder, query_images(args.files), args.gap, args.timeout)
    finally:
        load.stop.set()
        load.thread.join(60)
        watcher.terminate()
        watcher.wait(30)
        log.close()
        stop(server)
    cost = reload_cost(bundles, model, args.reload_repeats)
    return {
        "vectors": n,
        "files": len(found),
        "found_p50_s": pct(found, 0.5),
        "found_p95_s": pct(found, 0.95),
        "found_max_s": max(found),
        "queries": len(load.latencies),
        "failed_queries": len(load.failures),
        "query_p50_ms": pct(load.latencies, 0.5) * 1000,
        "query_p95_ms": pct(load.latencies, 0.95) * 1000,
        **cost,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000", help="base vector counts, comma-separated")
    ap.add_argument("--files", type=int, default=20, help="files dropped one at a time per size")
    ap.add_argument("--qps", type=float, default=10.0, help="text queries per second meanwhile")
    ap.add_argument("--index", default="auto", help="the base's index type (auto: flat to 200k, then HNSW)")
    ap.add_argument("--model", default=None, help="a model reference (default: ViT-B-32, random weights)")
    ap.add_argument("--pretrained", default=None)
    ap.add_argument("--settle", type=float, default=0.5, help="the watcher's --settle")
    ap.add_argument("--gap", type=float, default=1.0, help="seconds between a file found and the next drop")
    ap.add_argument("--warmup", type=float, default=600.0, help="seconds the watcher may take to start")
    ap.add_argument("--timeout", type=float, default=120.0, help="give up on a file after this long")
    ap.add_argument("--reload-repeats", type=int, default=5)
    ap.add_argument("--workdir", default="bench-live")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--role", default="bench", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    ap.add_argument("--bundles", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "watcher":
        run_watcher(args)
        return
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    model = model_dir(work, args.model, args.pretrained)
    load = os.getloadavg()
    results = []
    for n in (int(s) for s in args.sizes.split(",")):
        print(f"== {n:,} vectors", flush=True)
        results.append(run_size(args, work, model, n))
        r = results[-1]
        print(
            f"  file → found: p50 {r['found_p50_s']:.2f} s, p95 {r['found_p95_s']:.2f} s, "
            f"max {r['found_max_s']:.2f} s "
            f"over {r['files']} files | {r['queries']} text queries, {r['failed_queries']} failed, "
            f"p50 {r['query_p50_ms']:.0f} ms, p95 {r['query_p95_ms']:.0f} ms | reload of one added item "
            f"{r['delta_reload_s'] * 1000:.1f} ms vs full load {r['full_load_s']:.2f} s "
            f"({r['ratio']:.1%}; {r['ratio_bundle_only']:.1%} of the bundle alone)",
            flush=True,
        )
    summary = {
        "load_avg_before": load,
        "load_avg_after": os.getloadavg(),
        "args": vars(args),
        "results": results,
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
