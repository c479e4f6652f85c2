"""`--index auto` on clustered vectors (issue 17): every candidate layout the chooser builds, with its
estimated memory, build time, recall@10 vs exact search and p50 single-query latency, and its choice.

Data: `n` unit-normalised `d`-dim vectors, 90% drawn around `clusters` Gaussian centres (the spread
within a cluster `--spread` times the spread between centres, 0.5 by default) and 10% pure noise; the
chooser's own held-out queries and exact ground truth are used, as in `clipsearch index`.

Usage: python benchmarks/auto_index.py [--n 1000000] [--d 512] [--clusters 2000] [--budget 1G]
       [--exact-max 200000] [--out benchmarks/results/auto-index-1m.json]
Floor (issue 17): at 1M vectors with a 1 GiB budget, recall@10 >= 0.95 and p50 <= 5 ms.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clipsearch.commands.index import parse_bytes
from indexer.index.build import IndexConfig, build_index_trials


def clustered(n: int, d: int, clusters: int, seed: int = 0, spread: float = 0.5, noise: float = 0.1):
    """Blocks of clustered unit vectors, generated block by block (1M x 512 is 2 GB in float32)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, d)).astype(np.float32)
    out = np.empty((n, d), np.float32)
    for i in range(0, n, 65536):
        m = min(65536, n - i)
        x = rng.standard_normal((m, d)).astype(np.float32) * spread
        own = rng.random(m) >= noise
        x[own] += centres[rng.integers(0, clusters, own.sum())]
        out[i : i + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--clusters", type=int, default=2000)
    ap.add_argument("--spread", type=float, default=0.5, help="within-cluster std over centre std")
    ap.add_argument("--budget", default="1G")
    ap.add_argument("--exact-max", type=int, default=IndexConfig().exact_max, help="as `clipsearch index`")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    load = os.getloadavg()
    t = time.perf_counter()
    x = clustered(args.n, args.d, args.clusters, spread=args.spread)
    gen_s = time.perf_counter() - t

    def blocks():
        for i in range(0, len(x), 16384):
            yield x[i : i + 16384]

    cfg = IndexConfig(max_memory=parse_bytes(args.budget), exact_max=args.exact_max, accept_low_recall=True)
    t = time.perf_counter()
    _, spec, trials = build_index_trials(blocks, np.arange(args.n, dtype=np.int64), args.d, cfg)
    total_s = time.perf_counter() - t
    load_after = os.getloadavg()
    what = f"{args.n:,} x {args.d} vectors, {args.clusters} clusters (spread {args.spread})"
    print(f"\n{what}, budget {args.budget}")
    print(f"load average before {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after {load_after[0]:.2f}")
    print(f"{'layout':34} {'MiB':>7} {'build s':>8} {'recall@10':>9} {'p50 ms':>7}  params")
    for tr in trials:
        print(
            f"{tr.factory:34} {tr.bytes / 2**20:7.0f} {tr.build_s:8.1f} {tr.recall:9.3f} {tr.p50_ms:7.2f}"
            f"  {tr.params}"
        )
    if not trials:
        print(f"chosen: {spec.factory} (exact search: at most --exact-max vectors)")
        return
    chosen = next(tr for tr in trials if tr.factory == spec.factory)
    ok = chosen.recall >= 0.95 and chosen.p50_ms <= 5
    print(f"chosen: {spec.factory} {spec.params}  recall@10 {chosen.recall:.3f}  p50 {chosen.p50_ms:.2f} ms")
    print(f"floor (recall@10 >= 0.95, p50 <= 5 ms): {'met' if ok else 'NOT met'}")
    print(f"whole auto build {total_s:.0f} s (data generation {gen_s:.0f} s, not included)")
    if args.out:
        args.out.write_text(
            json.dumps(
                {
                    "n": args.n,
                    "d": args.d,
                    "clusters": args.clusters,
                    "spread": args.spread,
                    "budget": args.budget,
                    "load_before": load,
                    "load_after": load_after,
                    "build_s": round(total_s, 1),
                    "trials": [asdict(tr) for tr in trials],
                    "chosen": spec.factory,
                    "params": spec.params,
                    "recall_warning": spec.recall_warning,
                    "floor_met": ok,
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
