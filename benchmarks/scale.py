"""Past one machine (issue 14), side by side in one run on this machine.

1. Ray Data on one node vs the single-process pipeline: the same JPEG files, the same model (random
   weights, no downloads), through the very code `clipsearch index` runs (`reindex`, with and without
   `ReindexConfig.ray`, i.e. `--ray`): embedding-stage images/s of each (Ray's start-up included), the
   ratio Ray / single process (floor 0.8x: the cost of the engine on one node) and Ray with 1, 2 and 4
   encoder actors. Ray runs in
   one local instance, `ray.init(num_cpus=--ray-cpus)`, with fractional CPUs per actor so the decode tasks
   always have a slot (ray-project/ray#44687). Rounds alternate the methods; the median is reported.
2. DDP: `clipsearch train` with 1 process at global batch B vs `--nproc 2` (gloo) at B/2 per rank, the
   same data, model and seed; step time from each run's own metrics.jsonl (`elapsed_s` per step, the
   first steps dropped as warm-up), so process start-up and data loading count for neither.
   2b (`cache`). The locked text tower's feature cache (2,048 distinct captions, `small`'s MiniLM) on 2
   gloo ranks: every rank computing it all (the behaviour before) vs each rank its share + an all-gather.
3. IVF-PQ at `--n` synthetic 512-d vectors (default 1M; `--n 10000000` for the 10M figure): built by the
   indexer's own `build_index` with its default `auto` layout and `--max-index-memory` budget, the
   vectors streamed in deterministic chunks (regenerated on every pass: never all of them in RAM).
   Bytes per vector of the written index file, build time, recall@10 against exact search on 500
   held-out queries (exact ground truth by numpy GEMM over the chunks) with the nprobe the build chose,
   and single-query p50 latency.

Usage: flock /tmp/bench.lock python benchmarks/scale.py [--only ray,ddp,cache,ivfpq] [--images 512]
       [--n 1000000]
Writes benchmarks/results/scale-<sections>-<n>.json (and prints a table), with the load average before
and after.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from index import make_images, random_model  # noqa: E402  (benchmarks/index.py)

from indexer.core.architectures import register_shipped_configs  # noqa: E402
from indexer.data.sources import SourceSpec  # noqa: E402
from indexer.index.embed import EmbedConfig  # noqa: E402
from indexer.index.ray_embed import RayConfig  # noqa: E402
from indexer.index.runner import ReindexConfig, reindex  # noqa: E402

D = 512


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------------------------------------- 1. Ray


def _embed_once(a: argparse.Namespace, tmp: Path, folder: Path, model: Path, m: str, tag: str) -> float:
    """Embedding-stage images/s of one full `reindex` of `folder`, locally or on Ray (`reindex`'s own
    figure: for Ray, the pipeline's start-up and each actor loading the model included)."""
    ray_cfg = None
    if m != "local":
        n = int(m.split("-")[1])
        # Half the CPUs for the encoder pool, split between its actors; decode tasks keep the rest.
        ray_cfg = RayConfig(actors=n, actor_cpus=min(0.5, a.ray_cpus / 2 / n), decode_cpus=0.5)
    res = reindex(
        ReindexConfig(
            model_dir=model,
            source=SourceSpec(str(folder)),
            bundles_dir=tmp / f"bundles-{m}-{tag}",
            embed=EmbedConfig(batch_size=a.batch_size),
            device="cpu",
            full=True,
            ray=ray_cfg,
        )
    )
    assert res.embedded == a.images, (m, res)
    return res.images_per_s


def ray_vs_local(a: argparse.Namespace, tmp: Path, folder: Path, model: Path) -> dict[str, Any]:
    """Each method embeds every file once per round (rounds alternate the order); medians over rounds.
    The rate includes Ray's fixed start-up, so it is the ratio for a run of `--images` files: raise
    `--images` (and use a heavier `--model`) for the ratio of a long run."""
    import ray

    ray.init(num_cpus=a.ray_cpus, include_dashboard=False, log_to_driver=False)
    methods = ["local"] + [f"ray-{n}" for n in a.actors]
    stage: dict[str, list[float]] = {m: [] for m in methods}
    try:
        for r in range(a.rounds):
            for m in methods if r % 2 == 0 else methods[::-1]:
                stage[m].append(_embed_once(a, tmp, folder, model, m, str(r)))
                print(f"  round {r} {m}: {stage[m][-1]} images/s", flush=True)
    finally:
        ray.shutdown()
    med = {m: statistics.median(v) for m, v in stage.items()}
    return {
        "images": a.images,
        "model": a.model,
        "batch_size": a.batch_size,
        "ray_num_cpus": a.ray_cpus,
        "rounds": a.rounds,
        "stage_images_per_s": stage,
        "median_stage_images_per_s": med,
        "stage_ray_over_local": {m: round(med[m] / med["local"], 3) for m in methods[1:]},
    }


# ---------------------------------------------------------------------------------------------- 2. DDP


def train_csv(folder: Path, out: Path) -> Path:
    paths = sorted(folder.rglob("*.jpg"))
    lines = ["filepath,caption"] + [f"{p},a picture number {i}" for i, p in enumerate(paths)]
    out.write_text("\n".join(lines) + "\n")
    return out


def step_times(run_dir: Path, warmup: int) -> list[float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ends = [r["elapsed_s"] for r in rows if r.get("kind") == "train"]
    return [b - a for a, b in itertools.pairwise(ends)][warmup:]


def ddp(a: argparse.Namespace, tmp: Path, csv: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs: dict[str, list[float]] = {"1 process": [], "2 gloo processes": []}
    for r in range(a.rounds):
        for name, extra in (
            ("1 process", ["--batch-size", str(a.global_batch)]),
            ("2 gloo processes", ["--batch-size", str(a.global_batch // 2), "--nproc", "2"]),
        ):
            out = tmp / f"train-{name.replace(' ', '-')}-{r}"
            cmd = [sys.executable, "-m", "clipsearch", "train", "--train", str(csv), "--out", str(out)]
            cmd += [
                "--model",
                a.train_model,
                "--epochs",
                str(a.epochs),
                "--log-every",
                "1",
                "--device",
                "cpu",
            ]
            cmd += ["--workers", "0", "--no-progress", "--seed", "0", "--precision", "fp32", *extra]
            t = time.perf_counter()
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise SystemExit(f"train failed ({name}):\n{proc.stderr[-3000:]}")
            st = step_times(out, a.warmup_steps)
            runs[name].append(statistics.median(st))
            print(
                f"  round {r} {name}: {statistics.median(st):.3f} s/step",
                f"({time.perf_counter() - t:.0f} s wall)",
            )
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "model": a.train_model,
        "global_batch": a.global_batch,
        "images": a.images,
        "epochs": a.epochs,
        "warmup_steps_dropped": a.warmup_steps,
        "step_s": runs,
        "median_step_s": med,
        "two_over_one": round(med["2 gloo processes"] / med["1 process"], 3),
    }


# ------------------------------------------------------------------------------ 2b. locked-text cache


def _cache_model():  # type: ignore[no-untyped-def]
    import open_clip
    import torch

    from indexer.train.towers import lock_towers

    register_shipped_configs()
    torch.manual_seed(0)
    model = open_clip.create_model("small", pretrained_text=False)
    lock_towers(model, lock_image=False, lock_text=True, unlocked_layers=0)
    tokens = open_clip.get_tokenizer("small")([f"a picture number {i} of a thing" for i in range(_CAPTIONS)])
    return model, tokens


_CAPTIONS = int(os.environ.get("SCALE_CACHE_CAPTIONS", "2048"))


def _cache_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch

    from indexer.train.distributed import init_from_env
    from indexer.train.frozen_text import freeze_text_features

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)  # as torchrun sets OMP_NUM_THREADS=1 per rank
    d, device = init_from_env(torch.device("cpu"))
    model, tokens = _cache_model()
    times = {}
    for name, dd in (("every rank computes all (before)", None), ("1/N per rank + all_gather", d)):
        torch.distributed.barrier()
        t = time.perf_counter()
        freeze_text_features(model, tokens, None, device, dd)
        torch.distributed.barrier()
        times[name] = time.perf_counter() - t
    if rank == 0:
        Path(out).write_text(json.dumps(times))
    torch.distributed.destroy_process_group()


def frozen_cache(a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """The locked MiniLM tower's feature cache of 2,048 distinct captions on 2 gloo ranks: every rank
    computing it all (the behaviour before) vs each rank its half and an all-gather."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    out = tmp / "cache.json"
    mp.spawn(_cache_rank, args=(2, port, str(out)), nprocs=2, join=True)
    times = json.loads(out.read_text())
    before, after = times.values()
    return {
        "captions": _CAPTIONS,
        "model": "small (its MiniLM text tower, random weights, locked)",
        "ranks": 2,
        "seconds": times,
        "after_over_before": round(after / before, 3),
    }


# -------------------------------------------------------------------------------------------- 3. IVF-PQ


class Synthetic:
    """`n` unit 512-d vectors in `chunk`-row pieces, each regenerated from (seed, chunk index) on demand.

    Clustered like embeddings are (not uniform on the sphere, where no index finds neighbours): 1,000
    centres, each point its centre plus a spread in a shared `local_dims`-d subspace plus small isotropic
    noise. The recall any PQ code reaches depends on this choice (more local dimensions: lower recall)."""

    def __init__(self, n: int, chunk: int, local_dims: int = 32, seed: int = 0) -> None:
        self.n, self.chunk, self.seed, self.local_dims = n, chunk, seed, local_dims
        rng = np.random.default_rng([seed, 2**31])
        self.centres = rng.standard_normal((1000, D), dtype=np.float32)
        self.centres /= np.linalg.norm(self.centres, axis=1, keepdims=True)
        self.basis = rng.standard_normal((local_dims, D), dtype=np.float32) / np.sqrt(local_dims)

    def make(self, key: int, rows: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, key])
        x = self.centres[rng.integers(0, len(self.centres), rows)]
        x += 0.6 * (rng.standard_normal((rows, self.local_dims), dtype=np.float32) @ self.basis)
        x += rng.standard_normal((rows, D), dtype=np.float32) * (0.15 / np.sqrt(D))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    def blocks(self):  # type: ignore[no-untyped-def]
        for i, start in enumerate(range(0, self.n, self.chunk)):
            yield self.make(i, min(self.chunk, self.n - start))

    def queries(self, nq: int) -> np.ndarray:
        return self.make(2**30, nq)  # a key no chunk uses: held-out points of the same distribution


def ivfpq(a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import faiss
    from faiss.contrib.exhaustive_search import knn_ground_truth

    from indexer.index.build import IndexConfig, build_index, recall_at_10

    # importing the indexer set FAISS's BLAS threshold for the process (indexer/core/bundle/exact.py), so
    # the 500 queries' exact ground truth below and the build's own run on BLAS, not query by query
    data = Synthetic(a.n, a.chunk, a.local_dims)
    # measured whatever it reaches: a layout below the recall target is a figure here, not a failure
    cfg = IndexConfig(max_memory=a.max_index_memory, accept_low_recall=True)
    ids = np.arange(a.n, dtype=np.int64)
    t = time.perf_counter()
    index, spec = build_index(data.blocks, ids, D, cfg)
    build_s = time.perf_counter() - t
    path = tmp / "index.faiss"
    faiss.write_index(index, str(path))
    size = path.stat().st_size
    xq = data.queries(a.queries)
    t = time.perf_counter()
    truth = knn_ground_truth(xq, data.blocks(), 10, faiss.METRIC_INNER_PRODUCT)[1]
    exact_s = time.perf_counter() - t
    ps = faiss.ParameterSpace()
    for k, v in spec.params.items():
        ps.set_index_parameters(index, f"{k}={v}")
    _, found = index.search(xq, 10)
    recall = recall_at_10(found, truth)
    lat = []
    for q in xq:
        t = time.perf_counter()
        index.search(q[None, :], 10)
        lat.append(time.perf_counter() - t)
    # and the next rungs of the ladder, for the recall/latency trade-off
    ladder = {}
    for nprobe in (spec.params.get("nprobe", 1), 2 * spec.params.get("nprobe", 1)):
        ps.set_index_parameters(index, f"nprobe={nprobe}")
        t = time.perf_counter()
        _, f = index.search(xq, 10)
        ladder[str(nprobe)] = {
            "recall_at_10": round(recall_at_10(f, truth), 4),
            "batch_ms_per_query": round((time.perf_counter() - t) / len(xq) * 1e3, 3),
        }
    return {
        "n": a.n,
        "d": D,
        "local_dims": a.local_dims,
        "max_index_memory": a.max_index_memory,
        "factory": spec.factory,
        "params": spec.params,
        "build_s": round(build_s, 1),
        "build_recall_at_10": spec.recall_at_10,
        "index_file_bytes": size,
        "bytes_per_vector": round(size / a.n, 1),
        "queries": a.queries,
        "recall_at_10": round(recall, 4),
        "p50_ms": round(statistics.median(lat) * 1e3, 3),
        "p95_ms": round(float(np.percentile(lat, 95)) * 1e3, 3),
        "faiss_threads": faiss.omp_get_max_threads(),
        "exact_ground_truth_s": round(exact_s, 1),
        "nprobe_ladder": ladder,
    }


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="ray,ddp,cache,ivfpq", help="comma-separated sections to run")
    p.add_argument("--images", type=int, default=512, help="JPEG files for the Ray and DDP sections")
    p.add_argument("--model", default="small", help="model (random weights) for the Ray section")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--actors", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4])
    p.add_argument("--ray-cpus", type=int, default=2, help="ray.init(num_cpus=...)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--train-model", default="small")
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--n", type=int, default=1_000_000, help="synthetic vectors for the IVF-PQ section")
    p.add_argument("--chunk", type=int, default=100_000)
    p.add_argument("--local-dims", type=int, default=32, help="synthetic data: dimensions of the spread")
    p.add_argument("--queries", type=int, default=500)
    p.add_argument(
        "--max-index-memory",
        type=int,
        default=1 << 30,
        help="--max-index-memory (1 GiB: auto picks IVF-PQ from 1M up)",
    )
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    register_shipped_configs()  # `small` for random_model
    only = set(a.only.split(","))
    result: dict[str, Any] = {
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_before": load()},
        "command": " ".join(sys.argv),
    }
    tmp = Path(tempfile.mkdtemp(prefix="scale-bench-"))
    try:
        if only & {"ray", "ddp"}:
            folder = tmp / "photos"
            make_images(folder, a.images)
        if "ray" in only:
            print("1. Ray Data vs single process", flush=True)
            result["ray"] = ray_vs_local(a, tmp, folder, random_model(a.model, tmp))
            result["ray"]["load_after"] = load()
        if "ddp" in only:
            print("2. DDP 2 gloo processes vs 1 process", flush=True)
            result["ddp"] = ddp(a, tmp, train_csv(folder, tmp / "train.csv"))
            result["ddp"]["load_after"] = load()
        if "cache" in only:
            print("2b. locked-text cache on 2 gloo ranks", flush=True)
            result["cache"] = frozen_cache(a, tmp)
            result["cache"]["load_after"] = load()
        if "ivfpq" in only:
            print(f"3. IVF-PQ at {a.n:,} vectors", flush=True)
            result["ivfpq"] = ivfpq(a, tmp)
            result["ivfpq"]["load_after"] = load()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result["machine"]["load_after"] = load()
    out = a.out or REPO / "benchmarks" / "results" / f"scale-{a.only.replace(',', '-')}-{a.n}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"wrote {out}")


def print_table(r: dict[str, Any]) -> None:
    print(f"\nload average before {r['machine']['load_before']}, after {r['machine']['load_after']}")
    if "ray" in r:
        x = r["ray"]
        print(
            f"\nembedding {x['images']} JPEGs, {x['model']} (random weights),",
            f"ray.init(num_cpus={x['ray_num_cpus']})",
        )
        print(f"{'method':<10}{'images/s':>10}{'vs local':>10}")
        for m, v in x["median_stage_images_per_s"].items():
            print(f"{m:<10}{v:>10.1f}{x['stage_ray_over_local'].get(m, 1.0):>10.2f}")
    if "ddp" in r:
        x = r["ddp"]
        print(f"\nDDP step time, {x['model']}, global batch {x['global_batch']}")
        for m, v in x["median_step_s"].items():
            print(f"{m:<18}{v:>8.3f} s/step")
        print(f"2 processes / 1 process: {x['two_over_one']:.2f}x the step time")
    if "cache" in r:
        x = r["cache"]
        print(f"\nlocked-text cache, {x['captions']} captions, 2 gloo ranks:")
        for m, v in x["seconds"].items():
            print(f"  {m:<34}{v:>7.2f} s")
    if "ivfpq" in r:
        x = r["ivfpq"]
        print(f"\nIVF-PQ at {x['n']:,} x {x['d']}: {x['factory']} {x['params']}")
        print(
            f"  {x['bytes_per_vector']} bytes/vector ({x['index_file_bytes']:,} B file),",
            f"build {x['build_s']} s",
        )
        print(
            f"  recall@10 vs exact on {x['queries']} queries: {x['recall_at_10']}",
            f"(the build's own: {x['build_recall_at_10']})",
        )
        print(f"  p50 {x['p50_ms']} ms, p95 {x['p95_ms']} ms per single query ({x['faiss_threads']} threads)")


if __name__ == "__main__":
    main()
