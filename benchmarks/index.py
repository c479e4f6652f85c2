"""Side-by-side indexing benchmark (issue 3), all in one run on this machine.

1. Pipeline efficiency: `clipsearch index` images/s vs the raw model forward on pre-decoded tensors.
2. Against a plain user loop (PIL open -> open_clip preprocess -> encode -> faiss.IndexFlatIP.add), with
   where that loop's time goes; clip-retrieval is checked for installability.
3. Re-index after 1% of the files changed vs the full run, through the real `clipsearch index` command:
   the run's own seconds and the wall time including process start-up (10,000 files with the tiny model
   by default; `--reindex-model ViT-B-32 --reindex-files 2000` for a realistic model, whose ~600 MB
   weights file is the fixed cost an incremental run must not pay several times). Also at the efficiency
   set's size with the big model, in-process.
4. The opt-in CPU fast path (--cpu-int8): speed-up and recall@10 vs fp32 on the same queries.

Usage: python benchmarks/index.py [--model ViT-B-32] [--images 64] [--rounds 6] [--reindex-files 10000]
       [--reindex-model tiny-test] [--only efficiency|reindex]
Random weights (no downloads). Every round runs each method once on the same images; ratios are taken
within a round and the median over rounds is reported, because the machine is shared and its speed
drifts by a factor of 2-3 within minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import open_clip
import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from indexer.core.architectures import model_config
from indexer.core.bundle.read import open_bundle
from indexer.core.encoder import Encoder
from indexer.core.images import load_image
from indexer.core.modeldir import save_model_dir
from indexer.data.sources import SourceSpec
from indexer.index.build import recall_at_10
from indexer.index.embed import EmbedConfig
from indexer.index.runner import ReindexConfig, ReindexResult, reindex

EMOJI_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
EMOJI = "😀🐱🍕🚗🌳🏠⚽🎸🌙🔥🍎🐟🦋🌈🚀🎈"


def make_images(root: Path, n: int, size: int = 256, seed: int = 0, start: int = 0) -> list[Path]:
    """Real-ish JPEGs: gradients + noise + shapes, every 4th an emoji; varied so vectors differ."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    font = ImageFont.truetype(str(EMOJI_FONT), 109) if EMOJI_FONT.is_file() else None
    paths = []
    for i in range(start, start + n):
        ramp = np.linspace(0, 1, size)[None, :, None] * rng.integers(-150, 150, 3)
        arr = np.clip(rng.integers(0, 255, 3) + ramp + rng.integers(0, 60, (size, size, 3)), 0, 255)
        img = Image.fromarray(arr.astype(np.uint8))
        draw = ImageDraw.Draw(img)
        for _ in range(3):
            x, y = rng.integers(0, size - 40, 2)
            draw.ellipse(
                [x, y, x + rng.integers(20, 120), y + rng.integers(20, 120)],
                fill=tuple(rng.integers(0, 255, 3)),
            )
        if font is not None and i % 4 == 0:
            glyph = Image.new("RGBA", (136, 128), (0, 0, 0, 0))
            ImageDraw.Draw(glyph).text((0, 0), EMOJI[i % len(EMOJI)], font=font, embedded_color=True)
            img.paste(glyph, (int(rng.integers(0, size - 136)), int(rng.integers(0, size - 128))), glyph)
        p = root / f"{i // 1000:03d}" / f"img{i:05d}.jpg"
        p.parent.mkdir(exist_ok=True)
        img.save(p, quality=90)
        paths.append(p)
    return paths


def random_model(name: str, tmp: Path) -> Path:
    """A model dir with seeded random weights for `name`, saved once per benchmark run."""
    out = tmp / f"model-{name}"
    if not out.is_dir():
        torch.manual_seed(0)
        save_model_dir(open_clip.create_model(name), model_config(name), out)
    return out


def batches(xs: list, n: int):
    for i in range(0, len(xs), n):
        yield xs[i : i + n]


def raw_forward(enc: Encoder, pixel_batches: list[torch.Tensor]) -> float:
    """images/s of the model alone on tensors decoded and preprocessed beforehand."""
    t = time.perf_counter()
    n = sum(len(enc.encode_pixels(b)) for b in pixel_batches)
    return n / (time.perf_counter() - t)


def plain_loop(enc: Encoder, paths: list[Path], bs: int) -> tuple[float, dict[str, float]]:
    """What a user writes: PIL open -> preprocess -> encode_image -> IndexFlatIP.add, in one thread."""
    model, preprocess = enc.model, enc.preprocess
    index = faiss.IndexFlatIP(enc.info.embed_dim)
    spent = {"decode+preprocess": 0.0, "forward": 0.0, "faiss add": 0.0}
    t0 = time.perf_counter()
    for chunk in batches(paths, bs):
        t = time.perf_counter()
        x = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in chunk])
        t1 = time.perf_counter()
        with torch.inference_mode():
            feats = model.encode_image(x, normalize=True).numpy()
        t2 = time.perf_counter()
        index.add(feats)
        spent["decode+preprocess"] += t1 - t
        spent["forward"] += t2 - t1
        spent["faiss add"] += time.perf_counter() - t2
    total = time.perf_counter() - t0
    return len(paths) / total, {k: round(v / total, 3) for k, v in spent.items()}


def run_pipeline(model: Path, src: Path, bundles: Path, bs: int, workers: int, **kw) -> ReindexResult:
    cfg = ReindexConfig(
        model_dir=model,
        source=SourceSpec(str(src)),
        bundles_dir=bundles,
        embed=EmbedConfig(batch_size=bs, workers=workers, cpu_int8=bool(kw.pop("cpu_int8", False))),
        device="cpu",
        **kw,
    )
    return reindex(cfg)


def change_one_percent(paths: list[Path], root: Path, seed: int) -> int:
    """Rewrite half of 1% of the files, delete a quarter, add a quarter; returns files touched."""
    k = max(1, round(len(paths) / 100))
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(paths), size=k, replace=False)
    for j in pick[: k // 2]:
        make_images(root / "tmpchg", 1, seed=int(seed + j))[0].replace(paths[j])
    for j in pick[k // 2 : k // 2 + k // 4]:
        paths[j].unlink()
    make_images(root, k - k // 2 - k // 4, seed=seed + 7, start=10_000_000 + seed)
    shutil.rmtree(root / "tmpchg", ignore_errors=True)
    return k


def cli_wall(args: list[str]) -> tuple[float, dict]:
    t = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "clipsearch", *args, "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    if proc.returncode:
        raise SystemExit(proc.stderr[-2000:])
    return time.perf_counter() - t, json.loads(proc.stdout)


def efficiency(args: argparse.Namespace, tmp: Path) -> dict:
    """Sections 1, 2 and 4 on the big model.

    The machine is shared, so its speed drifts by 2-3x within minutes. Each round runs every method
    once on the same images, back to back, and the ratios are taken within a round (paired); the
    headline is the median over rounds.
    """
    model = random_model(args.model, tmp)
    src = tmp / "eff"
    paths = sorted(make_images(src, args.images))
    enc = Encoder.from_dir(model, "cpu")
    pixel_batches = [
        enc.preprocess_images([load_image(p) for p in c]) for c in batches(paths, args.batch_size)
    ]
    raw_forward(enc, pixel_batches[:1])  # warm-up (oneDNN kernels, allocator)
    rows: dict[str, list[float]] = {
        k: [] for k in ("raw", "pipeline", "pipeline_whole_run", "plain_loop", "int8")
    }
    spent: dict[str, float] = {}
    full_seconds = []
    for r in range(args.rounds):
        rows["raw"].append(raw_forward(enc, pixel_batches))
        res = run_pipeline(model, src, tmp / "b-fp32", args.batch_size, args.workers, full=True)
        rows["pipeline"].append(res.images_per_s)
        rows["pipeline_whole_run"].append(res.images / res.seconds)
        full_seconds.append(res.seconds)
        rate, spent = plain_loop(enc, paths, args.batch_size)
        rows["plain_loop"].append(rate)
        res8 = run_pipeline(
            model, src, tmp / "b-int8", args.batch_size, args.workers, full=True, cpu_int8=True
        )
        rows["int8"].append(res8.images_per_s)
        print(f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} img/s" for k, v in rows.items()), flush=True)

    def paired(a: str, b: str) -> dict[str, float]:
        ratios = [x / y for x, y in zip(rows[a], rows[b], strict=True)]
        return {"median": float(np.median(ratios)), "min": min(ratios), "max": max(ratios)}

    out = {
        "model": args.model,
        "images": len(paths),
        "batch_size": args.batch_size,
        "workers": args.workers,
        "torch_threads": torch.get_num_threads(),
        "rounds": rows,
        "median_img_per_s": {k: float(np.median(v)) for k, v in rows.items()},
        "pipeline_vs_raw": paired("pipeline", "raw"),
        "pipeline_whole_run_vs_raw": paired("pipeline_whole_run", "raw"),
        "pipeline_vs_plain_loop": paired("pipeline", "plain_loop"),
        "plain_loop_time_split": spent,
        "int8_speedup": paired("int8", "pipeline"),
        "int8_recall_at_10": int8_recall(enc, tmp, src),
    }
    out["reindex_1pct_big_model"] = reindex_ratio_inprocess(
        model, src, paths, tmp / "b-fp32", min(full_seconds), args
    )
    return out


def _vectors_by_path(bundles: Path) -> dict[str, np.ndarray]:
    b = open_bundle(bundles)
    try:
        items = b.items.get_many(list(range(b.manifest.stats["next_id"])))
        return {it.path: b.image_index.reconstruct(it.id) for it in items.values() if it.kind == "image"}
    finally:
        b.close()


def int8_recall(enc: Encoder, tmp: Path, src: Path) -> dict[str, float]:
    """recall@10 of the int8-embedded collection vs the fp32 one, for the same fp32 queries."""
    fp32, int8 = _vectors_by_path(tmp / "b-fp32"), _vectors_by_path(tmp / "b-int8")
    keys = sorted(fp32)
    xb32, xb8 = np.stack([fp32[k] for k in keys]), np.stack([int8[k] for k in keys])
    q_imgs = make_images(tmp / "queries", 64, seed=99)
    xq_img = enc.encode_images([load_image(p) for p in q_imgs])
    xq_txt = enc.encode_texts(
        [f"a photo of {w}" for w in ("a cat", "a pizza", "a red car", "the sea", "a tree")] * 4
    )
    out = {}
    for name, xq in (("image_queries", xq_img), ("text_queries", xq_txt)):
        truth = np.argsort(-(xq @ xb32.T), axis=1)[:, :10]
        found = np.argsort(-(xq @ xb8.T), axis=1)[:, :10]
        out[name] = round(recall_at_10(found, truth), 4)
    out["min_cosine_int8_vs_fp32"] = round(float((xb32 * xb8).sum(1).min()), 5)
    return out


def reindex_ratio_inprocess(
    model: Path, src: Path, paths: list[Path], bundles: Path, full_s: float, args
) -> dict:
    run_pipeline(model, src, bundles, args.batch_size, args.workers)  # settle on the unchanged set
    k = change_one_percent(paths, src, seed=5)
    res = run_pipeline(model, src, bundles, args.batch_size, args.workers)
    return {
        "files": len(paths),
        "changed": k,
        "full_s": full_s,
        "rerun_s": res.seconds,
        "ratio": res.seconds / full_s,
    }


def reindex_cli(args: argparse.Namespace, tmp: Path) -> dict:
    """Section 3 through the real CLI: wall time (with interpreter start) and the run's own seconds."""
    model = random_model(args.reindex_model, tmp)
    src = tmp / "reindex-src"
    t = time.perf_counter()
    paths = make_images(src, args.reindex_files, seed=1)
    print(f"made {len(paths)} images in {time.perf_counter() - t:.0f} s", flush=True)
    cli = ["index", "--model", str(model), "--images", str(src), "--bundles", str(tmp / "b-reindex")]
    cli += ["--batch-size", str(args.batch_size), "--device", "cpu"]
    full_wall, full = cli_wall(cli)
    k = change_one_percent(paths, src, seed=3)
    re_wall, re = cli_wall(cli)
    t = time.perf_counter()
    subprocess.run(
        [sys.executable, "-c", "import indexer.index.runner"], check=True, cwd=Path(__file__).parents[1]
    )
    startup = time.perf_counter() - t
    return {
        "python_start_and_imports_s": startup,
        "model": args.reindex_model,
        "files": len(paths),
        "changed": k,
        "full": {"wall_s": full_wall, "run_s": full["seconds"]},
        "rerun": {"wall_s": re_wall, "run_s": re["seconds"], "summary": re},
        "ratio_run_s": re["seconds"] / full["seconds"],
        "ratio_wall_s": re_wall / full_wall,
    }


def clip_retrieval_status(tmp: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "clip-retrieval", "-d", str(tmp / "cr")],
        capture_output=True,
        text=True,
    )
    if proc.returncode:
        return f"pip download failed: {proc.stderr.strip().splitlines()[-1:]}"
    wheel = next((tmp / "cr").glob("*.whl"), None)
    return (
        f"downloadable ({wheel.name if wheel else '?'}) but not run: it pins numpy<2 and open-clip-torch<3 "
        "(this venv has numpy 2 and open_clip 3.3, so installing it would break the project), and its "
        "inference loads models through all_clip with pretrained weights, which cannot be downloaded here"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--images", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=EmbedConfig().workers)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--reindex-files", type=int, default=10_000)
    ap.add_argument("--reindex-model", default="tiny-test", help="model of section 3, e.g. ViT-B-32")
    ap.add_argument("--only", choices=("efficiency", "reindex"), help="run only this part")
    ap.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        print(f"cpu cores {os.cpu_count()}, torch threads {torch.get_num_threads()}, load {os.getloadavg()}")
        results: dict = {}
        if args.only in (None, "efficiency"):
            results["efficiency"] = efficiency(args, tmp)
        if args.only in (None, "reindex"):
            results["reindex"] = reindex_cli(args, tmp)
        if args.only is None:
            results["clip_retrieval"] = clip_retrieval_status(tmp)
        results["load_avg_after"] = os.getloadavg()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(results, indent=2, default=float)
    print(text)
    if args.out:
        args.out.write_text(text)
    report(results)


def report(r: dict) -> None:
    lines = efficiency_lines(r["efficiency"]) if "efficiency" in r else []
    if "reindex" in r:
        lines.append(reindex_line(r["reindex"]))
    if "clip_retrieval" in r:
        lines.append(f"clip-retrieval: {r['clip_retrieval']}")
    print("\n" + "\n".join(lines))


def reindex_line(x: dict) -> str:
    full, rerun = x["full"], x["rerun"]
    return (
        f"re-index {x['changed']}/{x['files']} changed ({x['model']}, CLI): "
        f"run {rerun['run_s']:.1f} s vs {full['run_s']:.1f} s = {x['ratio_run_s']:.3f}; "
        f"wall incl. python start {rerun['wall_s']:.1f} s vs {full['wall_s']:.1f} s = "
        f"{x['ratio_wall_s']:.3f} (floor 0.05); python start + imports alone "
        f"{x['python_start_and_imports_s']:.1f} s"
    )


def efficiency_lines(e: dict) -> list[str]:
    m, big = e["median_img_per_s"], e["reindex_1pct_big_model"]

    def ratio(d: dict) -> str:
        return f"{d['median']:.3f} (rounds {d['min']:.2f}..{d['max']:.2f})"

    return [
        f"== {e['model']}, {e['images']} images x {len(e['rounds']['raw'])} rounds, batch {e['batch_size']}, "
        f"{e['workers']} decode worker(s), {e['torch_threads']} torch threads; medians:",
        f"raw forward {m['raw']:.2f} img/s | pipeline {m['pipeline']:.2f} img/s "
        f"(whole run incl. model load, hashing, index, publish: {m['pipeline_whole_run']:.2f}) | "
        f"plain loop {m['plain_loop']:.2f} | --cpu-int8 {m['int8']:.2f}",
        f"pipeline / raw forward = {ratio(e['pipeline_vs_raw'])} (floor 0.85); "
        f"whole run / raw = {ratio(e['pipeline_whole_run_vs_raw'])}",
        f"pipeline / plain loop  = {ratio(e['pipeline_vs_plain_loop'])} (floor 1.0); "
        f"plain loop time split {e['plain_loop_time_split']}",
        f"--cpu-int8 speed-up {ratio(e['int8_speedup'])}, recall@10 vs fp32 {e['int8_recall_at_10']}",
        f"re-index {big['changed']}/{big['files']} changed ({e['model']}, in-process): "
        f"{big['rerun_s']:.1f} s vs {big['full_s']:.1f} s = {big['ratio']:.3f}",
    ]


if __name__ == "__main__":
    main()
