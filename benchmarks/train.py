"""Side by side on the same CPU cores and emoji data: `clipsearch train` against `open_clip_train.main`.

1. Throughput: the same model config, batch size, precision (fp32) and data-loader workers, each run for
   a fixed number of steps; samples/s over the steps after a warm-up, from each tool's own per-step log
   (open_clip_train's `Batch (t)` per step, our `metrics.jsonl` `elapsed_s` per step), so start-up,
   data indexing and checkpoint writing count for neither. Ours runs twice: with its defaults (the
   pretrained towers locked, their features cached) and with --no-lock-text --no-lock-image, training
   every parameter as open_clip_train does, so that ratio compares the implementations alone.
2. Quality: each tool with its best default for the same wall-clock budget (ours: `--time-budget`;
   theirs: open_clip_train defaults with `--epochs` fitted to the budget from its measured speed and
   `--warmup` scaled to that run, since its default of 10,000 warm-up steps would never end). Both start
   from the same weights: a config with pretrained towers (`small-pt`: ImageNet image tower, MiniLM text
   tower) is handed to open_clip_train as that very starting checkpoint (`--pretrained`) with the
   preprocessing its weights expect (`--image-mean/--image-std`). Both final models are scored by
   `clipsearch eval` on the held-out concepts of val.csv (text→image R@1 and R@10).

Every config given (`--models`) is measured at every budget (`--minutes`), and one table is printed:
per config and budget, ours against open_clip_train, R@1, R@10 and their ratio.

    python benchmarks/train.py                                   # small and small-pt, 3 and 10 minutes
    python benchmarks/train.py --models small --minutes 1        # a quick check while developing

Writes benchmarks/results/train.json, with the machine's load before and after. Run it on an otherwise
idle machine for figures worth quoting.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SHIM = REPO / "benchmarks" / "open_clip_train_shim.py"
BATCH_TIME = re.compile(r"Batch \(t\): ([0-9.]+)")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=REPO / "benchmarks" / "work" / "emoji", help="emoji data dir")
    p.add_argument("--work", type=Path, default=REPO / "benchmarks" / "work" / "train", help="scratch dir")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train.json")
    p.add_argument(
        "--models", default="small,small-pt", help="model configs both tools train, comma-separated"
    )
    p.add_argument("--batch-size", type=int, default=64, help="throughput batch size (open_clip's default)")
    p.add_argument("--workers", type=int, default=2, help="data-loader workers, both tools")
    p.add_argument("--steps", type=int, default=20, help="timed steps per throughput run")
    p.add_argument("--warmup-steps", type=int, default=3, help="untimed steps before them")
    p.add_argument("--repeats", type=int, default=2, help="throughput runs per tool, interleaved; best kept")
    p.add_argument(
        "--minutes", default="3,10", help="wall-clock budgets per tool for quality, comma-separated"
    )
    p.add_argument("--their-epochs", type=int, help="open_clip_train epochs for quality (default: fitted)")
    p.add_argument("--only", choices=["throughput", "quality"], help="run one half")
    return p.parse_args()


def run(cmd: list[str], log: Path, timeout: float | None = None) -> tuple[int, float]:
    """Run a command with stdout+stderr to `log`; (exit status, wall seconds). A timeout kills it (-9)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
    return rc, time.perf_counter() - start


def check(rc: int, log: Path, what: str) -> None:
    """Stop the benchmark with the tail of the log when a step failed."""
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        sys.exit(f"{what} failed (exit {rc}); last lines of {log}:\n{tail}")


def clipsearch(*args: str) -> list[str]:
    return [sys.executable, "-m", "clipsearch", *args]


def ensure_data(data: Path, log_dir: Path) -> dict[str, Any]:
    """The full emoji set; rebuilt only if missing, incomplete or changed."""
    from indexer.data.emoji_manifest import check_emoji_dataset
    from indexer.data.sources import DataError

    try:
        return check_emoji_dataset(data).model_dump()
    except DataError:
        rc, _ = run(clipsearch("data", "emoji", "--out", str(data)), log_dir / "data.log")
        check(rc, log_dir / "data.log", "clipsearch data emoji")
        return check_emoji_dataset(data).model_dump()


def absolute_csv(src: Path, dst: Path, rows: int | None = None) -> Path:
    """A copy of `src` with absolute image paths (open_clip_train opens them relative to its cwd)."""
    with open(src, newline="") as f:
        table = list(csv.DictReader(f))[:rows]
    with open(dst, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["filepath", "caption"])
        w.writeheader()
        w.writerows({**r, "filepath": str((src.parent / r["filepath"]).resolve())} for r in table)
    return dst


def steady_rate(step_ends: list[float], batch: int, skip: int) -> float:
    """samples/s between the end of step `skip` and the end of the last step."""
    if skip < 1 or len(step_ends) <= skip:
        raise RuntimeError(f"only {len(step_ends)} steps logged; need more than {skip}")
    return batch * (len(step_ends) - skip) / (step_ends[-1] - step_ends[skip - 1])


def their_start(a: argparse.Namespace) -> list[str]:
    """open_clip_train arguments that make it start where `clipsearch train` starts for `a.model`: for a
    config with pretrained towers (its `clipsearch` key), that starting model as a checkpoint, and the
    preprocessing its weights expect. Nothing for a config whose start open_clip builds itself."""
    from safetensors.torch import save_file

    from indexer.core.architectures import resolve_model_name, start_weights
    from indexer.core.modelref import ModelReference, load_reference

    start = start_weights(resolve_model_name(a.model))
    args: list[str] = []
    if start.image_tower is not None:
        ckpt = a.work / f"start-{Path(a.model).stem}.safetensors"
        if not ckpt.is_file():
            model = load_reference(ModelReference(a.model)).model
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
        args += ["--pretrained", str(ckpt)]
    for key, value in start.preprocess:
        if key in ("mean", "std"):
            args += [f"--image-{key}", *(str(v) for v in value)]
    return args


def open_clip_train_cmd(
    a: argparse.Namespace, train_csv: Path, logs: Path, name: str, batch: int, epochs: int, warmup: int
) -> list[str]:
    csv_args = "--dataset-type csv --csv-separator , --csv-img-key filepath --csv-caption-key caption"
    recipe = (
        f"--model {a.model} --batch-size {batch} --epochs {epochs} --warmup {warmup} "
        f"--workers {a.workers} --precision fp32 --device cpu --seed 0"
    )
    logging = f"--name {name} --log-every-n-steps 1 --delete-previous-checkpoint"
    return [
        *(sys.executable, str(SHIM), "--train-data", str(train_csv), "--logs", str(logs)),
        *f"{csv_args} {recipe} {logging}".split(),
        *their_start(a),
    ]


def tag(a: argparse.Namespace) -> str:
    """A file-name tag for the config (and budget) being measured."""
    budget = f"-{a.minutes:g}min" if getattr(a, "minutes", None) is not None else ""
    return f"{Path(a.model).stem}{budget}"


def theirs_throughput(a: argparse.Namespace, subset: Path, i: int) -> dict[str, Any]:
    name, logs = f"{tag(a)}-throughput-{i}", a.work / "open_clip_train"
    log = a.work / f"theirs-{name}.log"
    rc, wall = run(open_clip_train_cmd(a, subset, logs, name, a.batch_size, 1, a.warmup_steps), log)
    check(rc, log, "open_clip_train")
    times = [float(m) for m in BATCH_TIME.findall((logs / name / "out.log").read_text())]
    ends = [sum(times[: k + 1]) for k in range(len(times))]
    return {
        "samples_per_s": steady_rate(ends, a.batch_size, a.warmup_steps),
        "steps": len(ends),
        "wall_s": wall,
        "timed_step_s": times[a.warmup_steps :],
    }


def ours_throughput(a: argparse.Namespace, subset: Path, i: int, extra: str = "") -> dict[str, Any]:
    name = f"{tag(a)}-ours{extra.replace('--', '-').replace(' ', '')}-throughput-{i}"
    out, log = a.work / name, a.work / f"{name}.log"
    recipe = (
        f"--model {a.model} --epochs 1 --batch-size {a.batch_size} --workers {a.workers} "
        f"--precision fp32 --device cpu --seed 0 --log-every 1 --no-progress {extra}"
    )
    cmd = clipsearch("train", "--train", str(subset), "--out", str(out), *recipe.split())
    rc, wall = run(cmd, log)
    check(rc, log, "clipsearch train")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ends = [r["elapsed_s"] for r in lines if r.get("kind") == "train"]
    return {
        "samples_per_s": steady_rate(ends, a.batch_size, a.warmup_steps),
        "steps": len(ends),
        "wall_s": wall,
    }


def throughput_subset(a: argparse.Namespace, train_csv: Path) -> Path:
    """The first rows of train.csv: exactly warm-up + timed steps of full batches."""
    return absolute_csv(train_csv, a.work / "throughput.csv", (a.steps + a.warmup_steps) * a.batch_size)


def throughput(a: argparse.Namespace, train_csv: Path) -> dict[str, Any]:
    subset = throughput_subset(a, train_csv)
    # "ours": our defaults (pretrained towers locked, their features cached); "ours_same_work": every
    # parameter trained (--no-lock-text --no-lock-image) as open_clip_train does: only the code differs.
    runs: dict[str, list[dict[str, Any]]] = {"ours": [], "ours_same_work": [], "theirs": []}
    for i in range(a.repeats):  # interleaved, so a burst of load from elsewhere hits all sides
        runs["theirs"].append(theirs_throughput(a, subset, i))
        runs["ours"].append(ours_throughput(a, subset, i))
        runs["ours_same_work"].append(ours_throughput(a, subset, i, "--no-lock-text --no-lock-image"))
        print(
            f"throughput run {i}: ours {runs['ours'][-1]['samples_per_s']:.1f} samples/s "
            f"(all parameters trained: {runs['ours_same_work'][-1]['samples_per_s']:.1f}), "
            f"open_clip_train {runs['theirs'][-1]['samples_per_s']:.1f} samples/s",
            flush=True,
        )
    best = {k: max(r["samples_per_s"] for r in v) for k, v in runs.items()}
    return {
        "ours_samples_per_s": best["ours"],
        "ours_same_work_samples_per_s": best["ours_same_work"],
        "theirs_samples_per_s": best["theirs"],
        "ratio": best["ours"] / best["theirs"],
        "ratio_same_work": best["ours_same_work"] / best["theirs"],
        "runs": runs,
        "setup": {
            "batch_size": a.batch_size,
            "workers": a.workers,
            "precision": "fp32",
            "timed_steps": a.steps,
            "untimed_warmup_steps": a.warmup_steps,
        },
    }


def evaluate(model_dir: Path, val_csv: Path, log: Path) -> dict[str, Any]:
    rc, _ = run(clipsearch("eval", "--model", str(model_dir), "--data", str(val_csv), "--json"), log)
    check(rc, log, "clipsearch eval")
    return dict(json.loads(log.read_text().strip().splitlines()[-1]))


def ours_quality(a: argparse.Namespace, train_csv: Path) -> dict[str, Any]:
    out, log = a.work / f"{tag(a)}-ours-quality", a.work / f"{tag(a)}-ours-quality.log"
    recipe = f"--model {a.model} --time-budget {a.minutes} --no-progress"  # everything else: defaults
    cmd = clipsearch("train", "--train", str(train_csv), "--out", str(out), *recipe.split())
    rc, wall = run(cmd, log, timeout=a.minutes * 60 * 1.5 + 120)
    check(rc, log, "clipsearch train --time-budget")
    return {"model_dir": out / "model", "wall_s": wall, "command": " ".join(cmd[2:])}


def their_plan(a: argparse.Namespace, n_train: int, step_s: float, startup_s: float) -> tuple[int, int]:
    """(epochs, warmup steps) that fit open_clip_train's default recipe (batch 64) into the budget."""
    steps_per_epoch = n_train // 64
    # 10% slack for the per-epoch checkpoint (weights + AdamW state) and changes in load.
    train_s = max(1.0, a.minutes * 60 - startup_s) * 0.9
    epochs = a.their_epochs or max(1, math.floor(train_s / (step_s * steps_per_epoch)))
    return epochs, max(1, round(0.05 * epochs * steps_per_epoch))


def theirs_quality(a: argparse.Namespace, train_csv: Path, step_s: float, startup_s: float) -> dict[str, Any]:
    import open_clip
    import torch

    from indexer.core.architectures import model_config, resolve_model_name, start_weights
    from indexer.core.modeldir import save_model_dir

    n_train = len(train_csv.read_text().splitlines()) - 1
    epochs, warmup = their_plan(a, n_train, step_s, startup_s)
    name = f"{tag(a)}-quality"
    logs, log = a.work / "open_clip_train", a.work / f"{tag(a)}-theirs-quality.log"
    arch = resolve_model_name(a.model)
    preprocess = dict(start_weights(arch).preprocess)
    cmd = open_clip_train_cmd(
        a, absolute_csv(train_csv, a.work / "train-abs.csv"), logs, name, 64, epochs, warmup
    )
    # The budget (plus a minute for start-up) is a hard wall: past it the run is stopped and its last
    # finished epoch counts. Epochs were planned to end well before it.
    rc, wall = run(cmd, log, timeout=a.minutes * 60 + 60)
    ckpts = sorted((logs / name / "checkpoints").glob("epoch_*.pt"), key=lambda p: -int(p.stem.split("_")[1]))
    model, ckpt_name = None, None
    for ckpt in ckpts:  # newest first; one killed while being written does not load
        try:
            model = open_clip.create_model(arch, pretrained=str(ckpt), force_preprocess_cfg=preprocess)
            ckpt_name = ckpt.name
            break
        except (RuntimeError, EOFError, OSError):
            continue
    if model is None:  # not one epoch within the budget: what the run leaves is its initialisation
        start = [x for x in their_start(a) if x.endswith(".safetensors")]
        torch.manual_seed(0)
        model = open_clip.create_model(
            arch, pretrained=start[0] if start else None, force_preprocess_cfg=preprocess
        )
    model_dir = save_model_dir(model, model_config(arch), a.work / f"{tag(a)}-theirs-quality-model")
    return {
        "model_dir": model_dir,
        "wall_s": wall,
        "epochs_planned": epochs,
        "warmup_steps": warmup,
        "checkpoint": ckpt_name,  # None: no epoch finished in the budget; scored untrained
        "stopped_at_budget": rc != 0,
        "command": " ".join(cmd[1:]),
    }


def quality(a: argparse.Namespace, data: Path, tput: dict[str, Any] | None) -> dict[str, Any]:
    runs = (
        tput["runs"]["theirs"]
        if tput
        else [theirs_throughput(a, throughput_subset(a, data / "train.csv"), 0)]
    )
    # The median step, not the mean: on a shared machine a few steps stalled by other work skew the mean.
    step_s = statistics.median(t for r in runs for t in r["timed_step_s"])
    startup_s = min(r["wall_s"] - sum(r["timed_step_s"]) for r in runs)
    results = {
        "theirs": theirs_quality(a, data / "train.csv", step_s, startup_s),
        "ours": ours_quality(a, data / "train.csv"),
    }
    for side, r in results.items():  # evaluated after both trained, so neither run competes with an eval
        r["eval"] = evaluate(r.pop("model_dir"), data / "val.csv", a.work / f"{tag(a)}-{side}-eval.log")
        t2i = r["eval"]["text_to_image"]
        print(
            f"{tag(a)} {side}: text->image R@1 {t2i['R@1']:.3f} R@10 {t2i['R@10']:.3f} "
            f"after {r['wall_s']:.0f} s",
            flush=True,
        )
    got = {k: results[k]["eval"]["text_to_image"] for k in ("ours", "theirs")}
    return {
        "model": a.model,
        "budget_minutes": a.minutes,
        "ours_r1": got["ours"]["R@1"],
        "theirs_r1": got["theirs"]["R@1"],
        "ours_r10": got["ours"]["R@10"],
        "theirs_r10": got["theirs"]["R@10"],
        "ratio": ratio(got["ours"]["R@10"], got["theirs"]["R@10"]),
        "ratio_r1": ratio(got["ours"]["R@1"], got["theirs"]["R@1"]),
        "load_average_after": os.getloadavg(),
        **results,
    }


def ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs else math.inf


def machine() -> dict[str, Any]:
    import torch

    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "load_average": os.getloadavg(),
    }


def main() -> None:
    a = parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    for old in a.work.glob("*"):  # each run starts clean: both tools refuse existing run names
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    data_info = ensure_data(a.data, a.work)
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    budgets = [float(m) for m in a.minutes.split(",") if m.strip()]
    report: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine_before": machine(),
        "data": {k: data_info[k] for k in ("font", "size", "images", "train", "val")},
        "models": models,
        "configs": {},
    }
    for model in models:
        per = argparse.Namespace(**{**vars(a), "model": model, "minutes": None})
        entry: dict[str, Any] = {}
        if a.only != "quality":
            entry["throughput"] = throughput(per, a.data / "train.csv")
        if a.only != "throughput":
            entry["quality"] = [
                quality(argparse.Namespace(**{**vars(per), "minutes": m}), a.data, entry.get("throughput"))
                for m in budgets
            ]
        report["configs"][model] = entry
    report["machine_after"] = machine()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(summarise(report))
    print(f"wrote {a.out}")


def summarise(report: dict[str, Any]) -> str:
    """One table: per config and budget, ours against open_clip_train (R@1, R@10, ratio of R@10)."""
    before, after = (report[k]["load_average"][0] for k in ("machine_before", "machine_after"))
    lines = [
        f"load average {before:.2f} before, {after:.2f} after ({report['machine_before']['cpus']} CPUs)",
        f"{'config':10} {'budget':>7} {'ours R@1':>9} {'ours R@10':>10} {'theirs R@1':>11} "
        f"{'theirs R@10':>12} {'R@10 ratio':>11}",
    ]
    for model, entry in report["configs"].items():
        for q in entry.get("quality", []):
            lines.append(
                f"{model:10} {q['budget_minutes']:>5g} m {q['ours_r1']:9.3f} {q['ours_r10']:10.3f} "
                f"{q['theirs_r1']:11.3f} {q['theirs_r10']:12.3f} {q['ratio']:10.2f}x"
            )
    lines.append("(floor: R@10 ratio >= 1.10 at every budget; text->image on the held-out val concepts)")
    for model, entry in report["configs"].items():
        if t := entry.get("throughput"):
            lines.append(
                f"throughput {model}: ours {t['ours_samples_per_s']:.1f} samples/s, open_clip_train "
                f"{t['theirs_samples_per_s']:.1f} ({t['ratio']:.2f}x); all parameters trained "
                f"(--no-lock-text --no-lock-image) {t['ours_same_work_samples_per_s']:.1f} "
                f"({t['ratio_same_work']:.2f}x, floor 1.2x)"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
