"""Exact-search table: one batch of 1, 16 and 64 queries over flat indexes of 100k and 1M 512-d vectors.

Columns (best of a few runs, ms): ours (`indexer.core.bundle.exact.search_flat`: a torch GEMM + top-k
over the rows FAISS stores or FAISS's BLAS path, measured on first use), `IndexFlatIP.search` with
faiss's defaults (faiss-cpu 1.15.1: BLAS threshold 128000, so query by query), `IndexFlatIP.search` with
the threshold at 20 (FAISS's own BLAS path), a torch fp16 GEMM over a half-precision copy (the half-the-
bytes candidate, 100k only), and the bandwidth bound: bytes of the vectors ÷ the memory bandwidth
measured here (the best of a numpy and a torch sum over a 1 GiB array). The floor: ours within 1.5x of
the bound for a batch of 16. Beside it, the compute bound: the multiply-adds of the batch (2·m·n·d)
at the best rate a GEMM of that shape reaches here with its rows already in cache (a 4,096-row block
scanned over and over), for a batch is not only bytes to read. Results are checked equal to FAISS's
(ids) on every shape.

    python benchmarks/exact_search.py                    # 100k and 1M (needs about 6 GB of memory)
    python benchmarks/exact_search.py --sizes 100000     # 100k only
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import faiss
import numpy as np
import torch

from indexer.core.bundle import exact
from indexer.core.bundle.exact import canonical, search_flat

DIM = 512
FLOOR = 1.5


def best_ms(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times) * 1e3


def bandwidth() -> float:
    """Bytes per second, the best of a numpy (one core) and a torch (every thread) sum over 1 GiB."""
    a = np.ones(1 << 28, np.float32)
    t = torch.from_numpy(a)
    s_np = best_ms(lambda: a.sum(), 3) / 1e3
    s_t = best_ms(lambda: t.sum(), 3) / 1e3
    return a.nbytes / min(s_np, s_t)


def gemm_rate(m: int) -> float:
    """Multiply-adds per second (x2) of an (m, DIM) x (DIM, 4096) GEMM whose operands stay in cache."""
    q, x = torch.randn(m, DIM), torch.randn(4096, DIM)
    reps = max(8, 2048 // m)
    seconds = best_ms(lambda: [q @ x.T for _ in range(reps)], 5) / 1e3 / reps
    return 2 * m * DIM * 4096 / seconds


def unit_rows(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, DIM), np.float32)
    for start in range(0, n, 65536):
        block = rng.standard_normal((min(65536, n - start), DIM), dtype=np.float32)
        out[start : start + len(block)] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def table(sizes: list[int], batches: list[int], k: int = 10) -> list[dict[str, float]]:
    bw = bandwidth()
    print(f"\nexact search (k={k}, {DIM}-d float32, torch threads {torch.get_num_threads()}, "
          f"measured bandwidth {bw / 1e9:.1f} GB/s)")  # fmt: skip
    rate = {m: gemm_rate(m) for m in batches}
    print("  GEMM rate in cache: " + ", ".join(f"{m} queries {r / 1e9:.0f} GFLOP/s" for m, r in rate.items()))
    print(f"  {'vectors':>9} {'queries':>7} {'ours':>9} {'faiss def':>10} {'faiss blas':>10} "
          f"{'torch fp16':>10} {'bound':>8} {'compute':>8} {'ours/bound':>10} {'def/ours':>8}")  # fmt: skip
    rows = []
    for n in sizes:
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
        index.add_with_ids(unit_rows(n, 0), np.arange(n, dtype=np.int64))
        stored, _ = exact.flat_storage(index)  # type: ignore[misc]
        half = torch.from_numpy(stored.astype(np.float16)) if n <= 200_000 else None
        bound = stored.nbytes / bw * 1e3
        for m in batches:
            q = unit_rows(m, 1 + m)
            reps = 5 if n <= 200_000 else 2
            ours = best_ms(lambda index=index, q=q: search_flat(index, q, k), reps)
            faiss.cvar.distance_compute_blas_threshold = 128000  # faiss-cpu 1.15.1's default
            default = best_ms(lambda index=index, q=q: index.search(q, k), 1 if n > 200_000 else 3)
            want = index.search(q, k)
            faiss.cvar.distance_compute_blas_threshold = 20
            blas = best_ms(lambda index=index, q=q: index.search(q, k), reps)
            faiss.cvar.distance_compute_blas_threshold = exact.BLAS_THRESHOLD
            got = search_flat(index, q, k)
            assert got is not None and (got[1] == canonical(*want)[1]).all(), "ids differ from FAISS"
            fp16 = float("nan")
            if half is not None:
                qh = torch.from_numpy(q.astype(np.float16))
                fp16 = best_ms(lambda qh=qh, half=half: torch.topk(qh @ half.T, k, dim=1), 2)
            compute = 2 * m * n * DIM / rate[m] * 1e3
            row = {"vectors": n, "queries": m, "ours_ms": ours, "faiss_default_ms": default,
                   "faiss_blas_ms": blas, "torch_fp16_ms": fp16, "bound_ms": bound,
                   "compute_bound_ms": compute}  # fmt: skip
            rows.append(row)
            print(f"  {n:>9} {m:>7} {ours:>9.1f} {default:>10.1f} {blas:>10.1f} {fp16:>10.1f} "
                  f"{bound:>8.1f} {compute:>8.1f} {ours / bound:>9.2f}x {default / ours:>7.1f}x",
                  flush=True)  # fmt: skip
    print(f"  ours chose, per (batch, collection) class: {exact._chosen}")
    at16 = [r for r in rows if r["queries"] == 16]
    worst = max(r["ours_ms"] / r["bound_ms"] for r in at16) if at16 else float("nan")
    print(f"  batch of 16: ours within {worst:.2f}x of the bandwidth bound (floor {FLOOR}x)")
    if at16:
        slowest = max(at16, key=lambda r: r["ours_ms"] / r["bound_ms"])
        vs_compute = slowest["ours_ms"] / slowest["compute_bound_ms"]
        compute_vs_bw = slowest["compute_bound_ms"] / slowest["bound_ms"]
        print(f"  ... and within {vs_compute:.2f}x of that shape's compute bound, itself "
              f"{compute_vs_bw:.2f}x the bandwidth bound")  # fmt: skip
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--json", type=str, default="", help="also write the rows to this file")
    args = p.parse_args()
    rows = table(args.sizes, args.batches)
    if args.json:
        import json

        with open(args.json, "w") as f:
            json.dump({"load_average": os.getloadavg(), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
