"""Serving benchmark: clipsearch vs the naive FastAPI app, side by side on loopback, same bundle.

A ViT-B-32-sized model with random weights; a flat bundle of random unit vectors (search cost is the
same as for real embeddings). Closed-loop clients: each sends its next query as soon as the last
returns. Prints QPS, p50 and p99 for each run and the ratios the issues set floors for:
  issue 17 (100,000 images, the default): text @16 clients >= 8x naive with p99 <= 150 ms; text @1
  client p50 <= 0.6x naive's; image @8 clients >= 1.6x naive;
  issue 8: one client p50 <= 1.15x bare encode+search in-process; zero failed requests across
  reloads during a 60 s load run.
With `--auto-n N`, also serves the synthetic clustered bundle `benchmarks/filters.py` builds at N
vectors with `--index auto` (built if absent, shared with that benchmark) and reports text p50 at 1
client, QPS at 16 clients and recall@10 of the served search against brute force.

    python benchmarks/serve.py --auto-n 1000000            # full run (about 12 minutes, plus the build)
    python benchmarks/serve.py --duration 3 --reload-duration 10 --items 2000   # quick dev run
"""

from __future__ import annotations

import os

# Before anything loads OpenMP (faiss, torch), and the same for all three (clipsearch serve sets it
# too): spinning idle OpenMP threads make forward passes many times slower on a shared host.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import asyncio
import io
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import httpx
import numpy as np
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUERIES = [
    "a dog running on the beach", "red car", "two people riding bicycles in a city street at night",
    "a bowl of fruit", "snowy mountains under a blue sky", "a cat sleeping on a sofa",
    "close-up of a yellow flower", "children playing football in a park on a sunny afternoon",
]  # fmt: skip


@dataclass
class Stats:
    name: str
    latencies: list[float] = field(default_factory=list)
    failures: int = 0
    elapsed: float = 0.0
    cpu_s: float = 0.0  # CPU seconds the server process used during the run

    @property
    def per_cpu_s(self) -> float:
        """Requests per CPU-second of the server: throughput that other load on the host does not skew."""
        return len(self.latencies) / self.cpu_s if self.cpu_s else 0.0

    @property
    def qps(self) -> float:
        return len(self.latencies) / self.elapsed if self.elapsed else 0.0

    def pct(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] * 1000 if xs else float("nan")

    def line(self) -> str:
        return (
            f"{self.name:<34} {self.qps:8.1f} QPS  p50 {self.pct(0.5):8.1f} ms  p99 {self.pct(0.99):8.1f} ms"
            + (f"  {self.per_cpu_s:6.2f} req/cpu-s" if self.cpu_s else "")
            + f"  n={len(self.latencies)} failed={self.failures}"
        )


# ------------------------------------------------------------------------------------------ fixtures


def query_images(n: int = 8) -> list[bytes]:
    """Photo-sized JPEGs (640x480) with gradients and shapes, so decoding costs what a photo costs."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        base = np.linspace(0, 255, 640, dtype=np.float32)[None, :, None] * rng.random(3)
        arr = np.clip(base + rng.normal(0, 12, (480, 640, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr)
        ImageDraw.Draw(img).ellipse(
            (100 + 20 * (i % 14), 80, 400, 380), fill=tuple(int(c) for c in rng.integers(0, 255, 3))
        )
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def build_bundles(work: Path, n_items: int) -> tuple[Path, list[str]]:
    """A random ViT-B-32 model dir and two bundles (same model, different vectors) to reload between."""
    import open_clip
    import torch

    from indexer.core.architectures import model_config
    from indexer.core.bundle.items import Item
    from indexer.core.bundle.manifest import IndexSpec
    from indexer.core.encoder import Encoder
    from indexer.core.modeldir import save_model_dir
    from indexer.index.publish import BundleContents, publish

    bundles = work / "bundles"
    if (bundles / "versions.txt").is_file():
        return bundles, (bundles / "versions.txt").read_text().split()
    torch.manual_seed(0)
    model_dir = save_model_dir(open_clip.create_model("ViT-B-32"), model_config("ViT-B-32"), work / "model")
    info = Encoder.from_dir(model_dir, device="cpu").info
    ref = info.model_copy(update={"name": "ViT-B-32-random"})
    photo = work / "photo.jpg"
    photo.write_bytes(query_images(1)[0])
    versions = []
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        indexes = []
        for start in (0, n_items):
            x = rng.standard_normal((n_items, info.embed_dim)).astype(np.float32)
            x /= np.linalg.norm(x, axis=1, keepdims=True)
            index = faiss.IndexIDMap2(faiss.IndexFlatIP(info.embed_dim))
            index.add_with_ids(x, np.arange(start, start + n_items, dtype=np.int64))
            indexes.append(index)
        items = [Item(id=i, kind="image", path=str(photo), text=f"photo {i}") for i in range(n_items)]
        items += [Item(id=n_items + i, kind="text", text=f"caption {i}") for i in range(n_items)]
        contents = BundleContents(
            model_dir=model_dir, model=ref, image_index=indexes[0], text_index=indexes[1], items=items,
            images=IndexSpec(file="images.faiss", count=n_items),
            texts=IndexSpec(file="texts.faiss", count=n_items),
        )  # fmt: skip
        versions.append(publish(bundles, contents).name)
    (bundles / "versions.txt").write_text("\n".join(versions))
    return bundles, versions


# ------------------------------------------------------------------------------------------- servers


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(cmd: list[str], env: dict[str, str], port: int) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **env}, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.5)
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {cmd}")
    raise RuntimeError(f"server did not start: {cmd}")


def ours(bundles: Path, port: int, threads: int, workers: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "clipsearch", "serve", "--bundles", str(bundles), "--port", str(port),
           "--admin-key", "bench", "--log-level", "warning", "--threads", str(threads),
           "--batch-workers", str(workers)]  # fmt: skip
    return start(cmd, {"PYTHONPATH": str(REPO)}, port)


def naive(bundle: Path, port: int, threads: int) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "uvicorn", "naive_serve_app:app", "--app-dir", str(REPO / "benchmarks"),
           "--port", str(port), "--log-level", "warning"]  # fmt: skip
    return start(
        cmd, {"CLIPSEARCH_BENCH_BUNDLE": str(bundle), "CLIPSEARCH_BENCH_THREADS": str(threads)}, port
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(30)


# -------------------------------------------------------------------------------------------- load

Send = Callable[[httpx.AsyncClient, int], Awaitable[httpx.Response]]


def text_request(k: int = 10) -> Send:
    def send(http: httpx.AsyncClient, i: int) -> Awaitable[httpx.Response]:
        return http.post("/v1/search/text", json={"query": QUERIES[i % len(QUERIES)], "k": k})

    return send


def image_request(images: list[bytes], k: int = 10) -> Send:
    def send(http: httpx.AsyncClient, i: int) -> Awaitable[httpx.Response]:
        return http.post(
            "/v1/search/image", files={"file": ("q.jpg", images[i % len(images)])}, data={"k": str(k)}
        )

    return send


async def closed_loop(name: str, url: str, send: Send, clients: int, duration: float) -> Stats:
    stats = Stats(name)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
        await send(http, 0)  # warm-up: first request pays lazy initialisation
        stop_at = time.perf_counter() + duration

        async def one(c: int) -> None:
            i = c
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    r = await send(http, i)
                    ok = r.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    stats.latencies.append(time.perf_counter() - t0)
                else:
                    stats.failures += 1
                i += clients

        t0 = time.perf_counter()
        await asyncio.gather(*(one(c) for c in range(clients)))
        stats.elapsed = time.perf_counter() - t0
    return stats


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_load(name: str, url: str, send: Send, clients: int, duration: float, pid: int) -> Stats:
    cpu0 = cpu_seconds(pid)
    stats = asyncio.run(closed_loop(name, url, send, clients, duration))
    stats.cpu_s = cpu_seconds(pid) - cpu0
    print(stats.line(), flush=True)
    return stats


def merged(name: str, parts: list[Stats]) -> Stats:
    """The rounds of one load as one run: all latencies, failures, seconds and CPU seconds."""
    out = Stats(name, [x for p in parts for x in p.latencies], sum(p.failures for p in parts))
    out.elapsed, out.cpu_s = sum(p.elapsed for p in parts), sum(p.cpu_s for p in parts)
    return out


def bare(name: str, work: Callable[[int], None], duration: float) -> Stats:
    """The same query's encode + search in this process, no HTTP, no queue: the latency floor."""
    work(0)
    stats = Stats(name)
    t_end = time.perf_counter() + duration
    i = 0
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        work(i)
        stats.latencies.append(time.perf_counter() - t0)
        i += 1
    stats.elapsed = duration
    print(stats.line(), flush=True)
    return stats


def bare_runs(bundle: Path, images: list[bytes], duration: float) -> tuple[Stats, Stats]:
    from indexer.core.encoder import Encoder
    from indexer.core.images import load_image

    encoder = Encoder.from_dir(bundle / "model", device="cpu")
    index = faiss.read_index(str(bundle / "images.faiss"))

    def text(i: int) -> None:
        index.search(encoder.encode_texts([QUERIES[i % len(QUERIES)]], trim=True), 10)

    def image(i: int) -> None:
        img = load_image(images[i % len(images)])
        index.search(encoder.encode_pixels(encoder.preprocess_images([img])), 10)

    return bare("bare text encode+search", text, duration), bare(
        "bare image decode+encode+search", image, duration
    )


def trim_saving(bundle: Path, reps: int = 20) -> None:
    """Time the full 77-token text forward against the trimmed one, for 1 and 16 queries."""
    from indexer.core.encoder import Encoder

    encoder = Encoder.from_dir(bundle / "model", device="cpu")
    for n in (1, 16):
        batch = [QUERIES[i % len(QUERIES)] for i in range(n)]
        full = encoder.encode_texts(batch)
        assert np.abs(full - encoder.encode_texts(batch, trim=True)).max() < 1e-5
        times = {}
        for trim in (False, True):
            encoder.encode_texts(batch, trim=trim)
            t0 = time.perf_counter()
            for _ in range(reps):
                encoder.encode_texts(batch, trim=trim)
            times[trim] = (time.perf_counter() - t0) / reps * 1000
        saving = times[False] / times[True]
        print(f"text encode, {n:2d} queries: full 77 tokens {times[False]:7.1f} ms, "
              f"trimmed {times[True]:7.1f} ms ({saving:.1f}x faster, max |diff| < 1e-5)")  # fmt: skip


async def _reload_during_load(
    url: str, bundles: Path, versions: list[str], images: list[bytes], duration: float
):
    from indexer.index.publish import set_current

    async def reloader() -> int:
        n = 0
        async with httpx.AsyncClient(
            base_url=url, headers={"Authorization": "Bearer bench"}, timeout=120
        ) as http:
            for step in range(1, 4):
                await asyncio.sleep(duration * step / 4 - (duration * (step - 1) / 4))
                await asyncio.to_thread(set_current, bundles, versions[step % 2])
                r = await http.post("/v1/admin/reload")
                n += r.status_code == 200 and r.json()["changed"]
        return n

    texts, imgs, reloads = await asyncio.gather(
        closed_loop("reload run: text x8", url, text_request(), 8, duration),
        closed_loop("reload run: image x4", url, image_request(images), 4, duration),
        reloader(),
    )
    return texts, imgs, reloads


def served_recall(url: str, x: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """recall@10 of the server's answers (`POST /v1/search` with a vector term) against brute force."""
    from faiss.contrib.exhaustive_search import knn_ground_truth

    blocks = (x[i : i + 65536] for i in range(0, len(x), 65536))
    _, truth = knn_ground_truth(queries, blocks, k, metric_type=faiss.METRIC_INNER_PRODUCT)
    hits = 0
    with httpx.Client(base_url=url, timeout=60) as http:
        for q, t in zip(queries, truth, strict=True):
            r = http.post("/v1/search", json={"terms": [{"vector": q.tolist()}], "k": k})
            r.raise_for_status()
            hits += len({h["id"] for h in r.json()["results"]} & set(t.tolist()))
    return hits / (k * len(queries))


def auto_run(n: int, threads: int, workers: int, duration: float) -> dict[str, float | str]:
    """Text p50 at 1 client, QPS at 16, and served recall@10 on the `--index auto` bundle of n vectors."""
    from benchmarks.filters import build, vectors
    from indexer.core.bundle.manifest import load_manifest
    from indexer.core.bundle.read import read_current

    bundles = build(REPO / "benchmarks" / "work" / "filters", n, "auto")
    manifest = load_manifest(bundles / read_current(bundles))
    spec = manifest.images
    print(f"\n--index auto at {n:,} vectors: {spec.factory} {spec.params} "
          f"(build's own recall@10 {spec.recall_at_10})", flush=True)  # fmt: skip
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = ours(bundles, port, threads, workers)
    try:
        one = run_load(f"auto {n:,} text x1", url, text_request(), 1, duration, server.pid)
        many = run_load(f"auto {n:,} text x16", url, text_request(), 16, duration, server.pid)
        x = vectors(n, manifest.model.embed_dim)
        rng = np.random.default_rng(2)  # queries like benchmarks/filters.py's: cosine ~0.9 to an item
        q = x[rng.choice(n, 200, replace=False)]
        q = q + 0.5 * rng.standard_normal(q.shape, dtype=np.float32) / np.sqrt(q.shape[1])
        q /= np.linalg.norm(q, axis=1, keepdims=True)
        recall = served_recall(url, x, q)
    finally:
        stop(server)
    print(f"auto {n:,}: served recall@10 {recall:.3f} over 200 vector queries", flush=True)
    return {"factory": spec.factory, "text_x1_p50_ms": one.pct(0.5), "text_x16_qps": many.qps,
            "text_x16_p99_ms": many.pct(0.99), "recall_at_10": recall}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", type=Path, default=Path("/tmp/clipsearch-bench-serve"))
    p.add_argument("--items", type=int, default=100_000, help="images (and as many texts) in the bundle")
    p.add_argument("--duration", type=float, default=30.0, help="seconds per load run and server")
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds each load run is split into")
    p.add_argument("--reload-duration", type=float, default=60.0)
    p.add_argument("--threads", type=int, default=0, help="torch threads for all three (0: torch's default)")
    p.add_argument("--batch-workers", type=int, default=1, help="clipsearch batches encoded at once")
    p.add_argument("--auto-n", type=int, default=0, help="also the --index auto bundle of this many vectors")
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    from indexer.index.publish import set_current

    args.workdir.mkdir(parents=True, exist_ok=True)
    bundles, versions = build_bundles(args.workdir / f"n{args.items}", args.items)
    set_current(bundles, versions[0])
    images = query_images()
    d = args.duration
    print(
        f"bundle: {args.items} images + {args.items} texts, ViT-B-32 (random weights), "
        f"{os.cpu_count()} CPUs, torch threads {threads}, clipsearch batch workers {args.batch_workers}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )

    # Both servers run at once (the idle one costs nothing: OMP_WAIT_POLICY=PASSIVE) and each load is
    # split into rounds that alternate between them, so a drift in the shared host's speed (runs here
    # differed by 30% from one minute to the next) falls on both sides of every ratio alike.
    port, naive_port = free_port(), free_port()
    url, naive_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{naive_port}"
    server = ours(bundles, port, threads, args.batch_workers)
    baseline = naive(bundles / versions[0], naive_port, threads)
    try:

        def side_by_side(what: str, send: Send, clients: int, with_naive: bool = True) -> tuple[Stats, Stats]:
            mine, theirs = [], []
            for _ in range(args.rounds):
                mine.append(run_load(f"clipsearch {what}", url, send, clients, d / args.rounds, server.pid))
                if with_naive:
                    theirs.append(
                        run_load(f"naive {what}", naive_url, send, clients, d / args.rounds, baseline.pid)
                    )
            total = merged(f"clipsearch {what}", mine), merged(f"naive {what}", theirs)
            print(total[0].line(), *([total[1].line()] if with_naive else []), sep="\n", flush=True)
            return total

        ours_text, naive_text = side_by_side("text x16", text_request(), 16)
        ours_image, naive_image = side_by_side("image x8", image_request(images), 8)
        one_text, naive_one = side_by_side("text x1", text_request(), 1)
        one_image, _ = side_by_side("image x1", image_request(images), 1, with_naive=False)
        texts, imgs, reloads = asyncio.run(
            _reload_during_load(url, bundles, versions, images, args.reload_duration)
        )
        print(texts.line(), imgs.line(), f"reloads applied: {reloads}", sep="\n", flush=True)
    finally:
        stop(server)
        stop(baseline)

    bare_text, bare_image = bare_runs(bundles / versions[0], images, d)
    trim_saving(bundles / versions[0])
    auto = auto_run(args.auto_n, threads, args.batch_workers, d) if args.auto_n else None

    def verdict(ok: bool) -> str:
        return "met" if ok else "NOT MET"

    text_x16 = ours_text.qps / naive_text.qps
    image_x8 = ours_image.qps / naive_image.qps
    text_x1 = one_text.pct(0.5) / naive_one.pct(0.5)
    print(f"\nsummary (load average {os.getloadavg()[0]:.2f})")
    print(
        f"  text  x16 throughput vs naive: {text_x16:5.2f}x, p99 {ours_text.pct(0.99):.0f} ms "
        f"(floor 8x with p99 <= 150 ms: {verdict(text_x16 >= 8 and ours_text.pct(0.99) <= 150)})"
    )
    print(f"  text  x1  p50 vs naive's: {text_x1:5.2f}x (ceiling 0.6: {verdict(text_x1 <= 0.6)})")
    print(f"  image x8  throughput vs naive: {image_x8:5.2f}x (floor 1.6: {verdict(image_x8 >= 1.6)})")
    print(f"  per server CPU-second: text x16 {ours_text.per_cpu_s / naive_text.per_cpu_s:5.2f}x, "
          f"image x8 {ours_image.per_cpu_s / naive_image.per_cpu_s:5.2f}x naive")  # fmt: skip
    text_p50 = one_text.pct(0.5) / bare_text.pct(0.5)
    image_p50 = one_image.pct(0.5) / bare_image.pct(0.5)
    print(f"  text  x1  p50 vs bare encode+search: {text_p50:5.2f}x "
          f"(ceiling 1.15: {verdict(text_p50 <= 1.15)})")  # fmt: skip
    print(f"  image x1  p50 vs bare decode+encode+search: {image_p50:5.2f}x "
          f"(ceiling 1.15: {verdict(image_p50 <= 1.15)})")  # fmt: skip
    failed = texts.failures + imgs.failures
    print(f"  reload run ({args.reload_duration:.0f} s, {reloads} reloads): {failed} failed of "
          f"{len(texts.latencies) + len(imgs.latencies) + failed} requests")  # fmt: skip
    if auto is not None:
        print(
            f"  auto {args.auto_n:,} ({auto['factory']}): text x1 p50 {auto['text_x1_p50_ms']:.1f} ms, "
            f"x16 {auto['text_x16_qps']:.1f} QPS (p99 {auto['text_x16_p99_ms']:.0f} ms), served recall@10 "
            f"{auto['recall_at_10']:.3f} (floor 0.95: {verdict(float(auto['recall_at_10']) >= 0.95)})"
        )


if __name__ == "__main__":
    main()
