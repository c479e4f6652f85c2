"""`clipsearch train` at the edge: flags -> TrainConfig, one-line errors, SIGTERM of a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

import indexer.train.loop as training
import indexer.train.step as step
from clipsearch.cli import app
from indexer.data.decode import DatasetError
from indexer.train.config import load_run_config
from indexer.train.loop import train
from indexer.train.progress import Progress
from indexer.train.run import setup_run
from indexer.train.step import TrainingDiverged
from tests.conftest import REPO
from tests.train.conftest import tiny_config, write_csv

runner = CliRunner()


def test_every_flag_reaches_the_config(monkeypatch, tmp_path: Path) -> None:
    seen = {}

    def fake_train(cfg, resume=False):
        seen["cfg"], seen["resume"] = cfg, resume
        return training.RunResult("finished", cfg.out, Progress(step=3), None)

    monkeypatch.setattr(training, "train", fake_train)
    args = (
        "train --train t.csv --val v.jsonl --out RUN --model ViT-B-32 --pretrained ckpt.pt "
        "--lock-image --lock-text "
        "--unlocked-layers 2 --loss siglip --time-budget 2.5 --batch-size 64 --accum-steps 4 --lr 0.01 "
        "--weight-decay 0.2 --warmup 0.2 --grad-clip 0.5 --precision amp --device cuda --seed 9 "
        "--image-column img --caption-column txt --crop-scale 0.8 --workers 3 --log-every 5 "
        "--checkpoint-every 1.5 --no-progress"
    )
    result = runner.invoke(app, args.split())
    assert result.exit_code == 0, result.output
    cfg = seen["cfg"]
    assert (cfg.train.source, cfg.train.image_column, cfg.train.caption_column) == ("t.csv", "img", "txt")
    assert cfg.val.source == "v.jsonl" and cfg.out == Path("RUN") and not seen["resume"]
    m = cfg.model
    assert (m.model, m.pretrained, m.lock_image, m.lock_text, m.unlocked_layers) == (
        "ViT-B-32",
        "ckpt.pt",
        True,
        True,
        2,
    )
    o = cfg.optim
    assert (o.batch_size, o.accum_steps, o.lr, o.weight_decay, o.warmup, o.grad_clip) == (
        64,
        4,
        0.01,
        0.2,
        0.2,
        0.5,
    )
    assert (cfg.loss, cfg.time_budget_min, cfg.epochs, cfg.precision, cfg.device, cfg.seed) == (
        "siglip",
        2.5,
        None,
        "amp",
        "cuda",
        9,
    )
    assert (cfg.crop_scale, cfg.workers, cfg.log_every, cfg.checkpoint_every_min, cfg.progress) == (
        0.8,
        3,
        5,
        1.5,
        False,
    )


def test_resume_reuses_the_saved_config(monkeypatch, trained_run) -> None:
    seen = {}

    def fake_train(cfg, resume=False):
        seen["cfg"], seen["resume"] = cfg, resume
        return training.RunResult("finished", cfg.out, Progress(step=3), None)

    monkeypatch.setattr(training, "train", fake_train)
    result = runner.invoke(app, ["train", "--resume", str(trained_run.run_dir), "--no-progress"])
    assert result.exit_code == 0, result.output
    saved = load_run_config(trained_run.run_dir)
    assert seen["resume"] and seen["cfg"] == saved


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--epochs", "2", "--time-budget", "1"], "not both"),
        (["--precision", "fp8"], "--precision must be one of"),
        (["--unlocked-layers", "1", "--no-lock-text"], "only applies with --lock-image or --lock-text"),
        (["--unlocked-layers", "6"], "has 6 layers; to train them all"),  # small's MiniLM, locked
        (["--model", "no-such-model"], "unknown model 'no-such-model'"),
        (["--loss", "triplet"], "unknown loss"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
    ],
)
def test_bad_options_are_one_line_errors(
    tmp_path: Path, colours: Path, args: list[str], message: str
) -> None:
    result = runner.invoke(app, ["train", "--train", str(colours), "--out", str(tmp_path / "r"), *args])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_wrong_columns_list_the_columns_found(tmp_path: Path, colours: Path) -> None:
    result = runner.invoke(
        app, ["train", "--train", str(colours), "--out", str(tmp_path / "r"), "--caption-column", "label"]
    )
    assert result.exit_code == 1 and "columns found: filepath, caption" in result.output


def test_custom_column_names(tmp_path: Path, colours: Path) -> None:
    rows = [line.split(",") for line in colours.read_text().splitlines()[1:]]
    csv_path = write_csv(
        colours.parent / "renamed.csv", [{"img": a, "desc": b} for a, b in rows], ("img", "desc")
    )
    cfg = tiny_config(tmp_path / "cols", csv_path, epochs=1)
    cfg = cfg.__class__(**{**cfg.__dict__, "train": cfg.train.__class__(str(csv_path), "img", "desc")})
    assert train(cfg).status == "finished"


def _dataset_with_missing(root: Path, n_good: int, n_missing: int) -> Path:
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(n_good):
        Image.new("RGB", (16, 16), (i * 8 % 256, 40, 200 - i)).save(root / "images" / f"{i}.png")
        rows.append({"filepath": f"images/{i}.png", "caption": f"square number {i}"})
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rows += [{"filepath": "images/broken.png", "caption": "broken"}]
    rows += [{"filepath": f"images/missing{i}.png", "caption": f"gone {i}"} for i in range(n_missing - 1)]
    return write_csv(root / "data.csv", rows)


def test_a_few_bad_rows_are_skipped_and_counted(tmp_path: Path) -> None:
    data = _dataset_with_missing(tmp_path / "d", n_good=39, n_missing=1)  # 1 of 40 = 2.5%
    result = train(tiny_config(tmp_path / "r", data, epochs=1))
    assert result.status == "finished"
    resolved = json.loads((tmp_path / "r" / "config.json").read_text())["resolved"]
    assert resolved["train_images"] == 39 and resolved["train_bad_rows"] == 1


def test_more_than_five_percent_bad_rows_abort(tmp_path: Path) -> None:
    data = _dataset_with_missing(tmp_path / "d", n_good=8, n_missing=2)
    with pytest.raises(DatasetError, match=r"2 of 10 images \(20%\) are missing or undecodable"):
        train(tiny_config(tmp_path / "r", data))


def test_empty_dataset_and_single_item_val_stop(tmp_path: Path, colours: Path) -> None:
    empty = write_csv(tmp_path / "empty.csv", [])
    with pytest.raises(DatasetError, match="empty"):
        train(tiny_config(tmp_path / "r1", empty))
    one = write_csv(
        tmp_path / "one.csv", [{"filepath": str(colours.parent / "images/red.png"), "caption": "red"}]
    )
    with pytest.raises(DatasetError, match="recall needs at least 2"):
        train(tiny_config(tmp_path / "r2", colours, one))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(
    tmp_path: Path, colours: Path, monkeypatch
) -> None:
    real_loss = step.contrastive_loss
    calls = {"n": 0}

    def loss_turning_nan(*args, **kw):
        calls["n"] += 1
        loss = real_loss(*args, **kw)
        return loss * float("nan") if calls["n"] > 3 else loss

    monkeypatch.setattr(step, "contrastive_loss", loss_turning_nan)
    cfg = tiny_config(tmp_path / "nan", colours, colours, epochs=10, checkpoint_every_min=0.0)
    with pytest.raises(TrainingDiverged, match="loss became nan at step 3"):
        train(cfg)
    run = setup_run(cfg.validate(), resume=True)
    assert run.progress.step == 3 and not run.progress.finished
    assert all(torch.isfinite(p).all() for p in run.built.model.parameters())
    assert (cfg.out / "model" / "open_clip_model.safetensors").is_file()  # best so far, from the evals


@pytest.mark.slow
def test_sigterm_saves_a_resumable_checkpoint(tmp_path: Path, colours: Path) -> None:
    out = tmp_path / "term"
    cmd = [
        sys.executable,
        "-m",
        "clipsearch",
        "train",
        "--train",
        str(colours),
        "--out",
        str(out),
        "--model",
        "tiny-test",
        "--epochs",
        "100000",
        "--batch-size",
        "4",
        "--log-every",
        "1",
        "--device",
        "cpu",
        "--workers",
        "0",
        "--no-progress",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not (out / "metrics.jsonl").is_file() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert f"--resume {out}" in stderr and "Traceback" not in stderr
    cfg = load_run_config(out)
    run = setup_run(cfg, resume=True)
    assert run.progress.step >= 1 and not run.progress.finished


@pytest.mark.slow
def test_a_copy_of_small_json_trains_like_small(tmp_path: Path, colours: Path, monkeypatch) -> None:
    """`--model path/to/copy-of-small.json`: its `package:` MiniLM resolves offline, as `small`'s does."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    copy = tmp_path / "configs" / "mine.json"
    copy.parent.mkdir()
    copy.write_text((REPO / "indexer" / "core" / "configs" / "small.json").read_text())
    args = f"train --train {colours} --out {tmp_path / 'run'} --model {copy} --epochs 1 --batch-size 8"
    result = runner.invoke(app, [*args.split(), "--workers", "0", "--no-progress", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "run" / "model" / "open_clip_config.json").read_text())["model_cfg"]
    assert "package:" not in json.dumps(saved) and saved["text_cfg"]["hf_pooler_type"] == "mean_pooler"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]["text_locked"]
