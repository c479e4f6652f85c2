"""Filtered search and near-duplicates benchmark: the filter inside FAISS against the way a user would do
it without this feature (over-fetch 10×k unfiltered and drop what the filter refuses), side by side.

A real bundle of N synthetic clustered unit vectors (512-d, as ViT-B-32 embeds; 1% of them near-copies
of another) is published with a user field `rank` (a random permutation of 0..N-1), opened as the
service opens it, and searched through `Bundle.search` one query at a time with filters keeping 50%,
5%, 0.5% and 0.05% of the items (`{"rank": {"lt": s·N}}`). For each: latency p50/p95, recall@10 against
brute force over the same filtered set, and how often a query got fewer than 10 results; the same for
the over-fetch baseline; and the unfiltered p50 the floor is stated against. Then `clipsearch
duplicates`' `duplicate_groups` over the whole bundle, timed.

Floors (issue 13): recall@10 ≥ 0.95 at every selectivity and p50 ≤ 3× the unfiltered p50.

    python benchmarks/filters.py                                  # the full run: 1M vectors, --index auto
    python benchmarks/filters.py --n 100000 --index hnsw          # a smoke run (auto would pick flat here)

The index is what `clipsearch index --index auto` builds at N (`IVF1024,SQ8` for this data at 1M within
the default budget) unless `--index` says otherwise. The bundle is kept under `--work` and reused by the
next run.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SELECTIVITY = (0.5, 0.05, 0.005, 0.0005)
K = 10
OVERFETCH = 10


def vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    """(n, dim) float32 unit vectors in 2,000 clusters; the last 1% near-copies of random others."""
    import faiss

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((2000, dim), dtype=np.float32)
    x = centres[rng.integers(0, 2000, n)] + 0.6 * rng.standard_normal((n, dim), dtype=np.float32)
    copies = n // 100
    x[n - copies :] = x[rng.integers(0, n - copies, copies)] + 0.02 * rng.standard_normal(
        (copies, dim), dtype=np.float32
    )
    faiss.normalize_L2(x)
    return x


def ranks(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).permutation(n)


def build(work: Path, n: int, index: str) -> Path:
    """A bundles dir holding the synthetic collection (kept for the next run)."""
    from benchmarks.live import model_dir
    from indexer.core.bundle.items import Item
    from indexer.core.bundle.manifest import IndexSpec
    from indexer.core.encoder import Encoder
    from indexer.index.build import IndexConfig, array_blocks, build_index
    from indexer.index.publish import BundleContents, publish

    bundles = work / f"bundles-{n}-{index}"
    if (bundles / "CURRENT").is_file():
        return bundles
    model = model_dir(work, None, None)
    info = Encoder.from_dir(model, "cpu").info
    x = vectors(n, info.embed_dim)
    print(f"building a {index} index of {n:,} vectors ...", flush=True)
    start = time.perf_counter()
    image_index, spec = build_index(
        array_blocks(x), np.arange(n, dtype=np.int64), info.embed_dim, IndexConfig(index)
    )
    print(
        f"  {spec.factory} {spec.params} recall@10 {spec.recall_at_10} in {time.perf_counter() - start:.0f} s"
    )
    text_index, text_spec = build_index(
        array_blocks(x[:0]), np.zeros(0, np.int64), info.embed_dim, IndexConfig("flat")
    )
    rank = ranks(n)
    items = [
        Item(id=i, kind="image", path=f"/synthetic/{i % 100}/{i}.jpg", fields={"rank": int(rank[i])})
        for i in range(n)
    ]
    contents = BundleContents(
        model_dir=model, model=info, image_index=image_index, text_index=text_index, items=items,
        images=IndexSpec(**{**spec.model_dump(), "file": "images.faiss"}),
        texts=IndexSpec(**{**text_spec.model_dump(), "file": "texts.faiss"}),
        stats={"next_id": n, "numerics": "default", "source": "synthetic"},
    )  # fmt: skip
    publish(bundles, contents)
    return bundles


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    k = truth.shape[1]
    return float(np.mean([len(set(f[:k]) & set(t) - {-1}) / k for f, t in zip(found, truth, strict=True)]))


def truth_top_k(x: np.ndarray, allowed: np.ndarray, q: np.ndarray, k: int) -> np.ndarray:
    import faiss

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x[allowed])
    _, pos = index.search(q, k)
    return allowed[pos]


def timed(fn, queries: np.ndarray) -> tuple[list[float], np.ndarray]:  # type: ignore[no-untyped-def]
    lat, rows = [], []
    for q in queries:
        t = time.perf_counter()
        rows.append(fn(q[None, :]))
        lat.append((time.perf_counter() - t) * 1000.0)
    return lat, np.concatenate(rows)


def measure(bundle, x: np.ndarray, rank: np.ndarray, q: np.ndarray, s: float, base_p50: float) -> dict:  # type: ignore[no-untyped-def, type-arg]
    """One selectivity: the filter inside FAISS and the 10x over-fetch, each against brute force."""
    n = len(x)
    keep = max(1, int(s * n))
    flt = bundle.parse_filter({"rank": {"lt": keep}})
    t = time.perf_counter()
    bundle.matching("images", flt)  # the filter's ids, computed once per version (then remembered)
    select_ms = (time.perf_counter() - t) * 1000.0
    allowed = np.flatnonzero(rank < keep).astype(np.int64)
    truth = truth_top_k(x, allowed, q, K)
    lat_f, found_f = timed(lambda v: bundle.search("images", v, K, flt)[1], q)

    def naive(v: np.ndarray) -> np.ndarray:
        ids = bundle.search("images", v, K * OVERFETCH)[1][0]
        ids = ids[np.isin(ids, allowed)][:K]
        return np.pad(ids, (0, K - len(ids)), constant_values=-1)[None, :]

    lat_n, found_n = timed(naive, q)
    filtered = {
        "p50_ms": round(pct(lat_f, 0.5), 3),
        "p95_ms": round(pct(lat_f, 0.95), 3),
        "recall_at_10": round(recall(found_f, truth), 4),
        "short_rows": int(((found_f < 0).sum(axis=1) > 0).sum()),
        "p50_vs_unfiltered": round(pct(lat_f, 0.5) / base_p50, 2),
    }
    naive_row = {
        "p50_ms": round(pct(lat_n, 0.5), 3),
        "recall_at_10": round(recall(found_n, truth), 4),
        "short_rows": int(((found_n < 0).sum(axis=1) > 0).sum()),
    }
    print(
        f"keep {s:>7.2%} ({len(allowed):>7,}): filtered p50 {filtered['p50_ms']:.3f} ms "
        f"({filtered['p50_vs_unfiltered']}x) recall {filtered['recall_at_10']:.3f} "
        f"short {filtered['short_rows']}"
        f" | over-fetch p50 {naive_row['p50_ms']:.3f} ms recall {naive_row['recall_at_10']:.3f} "
        f"short {naive_row['short_rows']} | selection {select_ms:.0f} ms",
        flush=True,
    )
    return {"selectivity": s, "kept": len(allowed), "select_ms_first_use": round(select_ms, 1),
            "filtered": filtered, "overfetch_10x": naive_row}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, object]:
    from indexer.core.bundle.duplicates import duplicate_groups
    from indexer.core.bundle.read import open_bundle

    work = Path(args.work)
    bundles = build(work, args.n, args.index)
    bundle = open_bundle(bundles)
    x = vectors(args.n, bundle.manifest.model.embed_dim)
    rank = ranks(args.n)
    rng = np.random.default_rng(2)
    noise = rng.standard_normal((args.queries, x.shape[1]), dtype=np.float32) / np.sqrt(x.shape[1])
    q = x[rng.choice(args.n, args.queries, replace=False)] + 0.5 * noise  # cosine ~0.9 to its source
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    out: dict[str, object] = {
        "n": args.n,
        "factory": bundle.manifest.images.factory,
        "params": bundle.manifest.images.params,
    }
    lat, _ = timed(lambda v: bundle.search("images", v, K)[1], q)
    base_p50 = pct(lat, 0.5)
    out["unfiltered_p50_ms"] = round(base_p50, 3)
    print(
        f"{bundle.manifest.images.factory} {bundle.manifest.images.params}: unfiltered p50 {base_p50:.3f} ms"
    )
    rows = [measure(bundle, x, rank, q, s, base_p50) for s in SELECTIVITY]
    out["filters"] = rows
    t = time.perf_counter()
    groups = duplicate_groups(bundle, args.threshold)
    dup_s = time.perf_counter() - t
    out["duplicates"] = {"threshold": args.threshold, "seconds": round(dup_s, 1), "groups": len(groups),
                         "images_in_groups": sum(len(g) for g in groups)}  # fmt: skip
    print(f"duplicates at {args.threshold}: {len(groups):,} groups in {dup_s:.1f} s")
    bundle.close()
    out["load_average"] = os.getloadavg()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--index", default="auto", help="auto (as clipsearch index picks), flat, hnsw, ivfpq")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--threshold", type=float, default=0.95, help="for duplicates")
    p.add_argument("--work", default=str(REPO / "benchmarks" / "work" / "filters"))
    p.add_argument("--out", default=None, help="write the results here as JSON")
    args = p.parse_args()
    result = run(args)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
