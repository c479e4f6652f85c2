"""End-to-end training runs with tiny-test on colour squares: outputs, seed, resume, budget, options."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import open_clip
import pytest
import torch
from safetensors.torch import load_file

import indexer.train.loop as training
from indexer.core.errors import ClipsearchError
from indexer.core.modeldir import WEIGHTS_NAME
from indexer.data.sources import SourceSpec
from indexer.eval.runner import EvalConfig, evaluate
from indexer.train.loop import train
from indexer.train.run import setup_run
from tests.train.conftest import tiny_config


def weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / WEIGHTS_NAME))


def test_run_writes_every_artifact(trained_run) -> None:
    run_dir = trained_run.run_dir
    assert trained_run.status == "finished"
    model, _, _preprocess = open_clip.create_model_and_transforms(f"local-dir:{run_dir / 'model'}")
    assert model.visual.image_size in (32, (32, 32))
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    val_rows = [r for r in rows if r["kind"] == "val"]
    assert {"step", "loss", "lr", "logit_scale", "samples_per_s"} <= set(train_rows[0])
    assert len(val_rows) == 12 and {"t2i_R@10", "i2t_R@1", "score"} <= set(val_rows[-1])
    assert train_rows[-1]["loss"] < train_rows[0]["loss"]
    cfg = json.loads((run_dir / "config.json").read_text())
    assert cfg["config"]["model"]["model"] == "tiny-test" and cfg["resolved"]["train_images"] == 8
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["progress"]["finished"] is True
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # It learned: 8 colours, random ranking would give R@1 around 1/8.
    assert trained_run.best_val.text_to_image.r_at_1 >= 0.75
    best_step = max(val_rows, key=lambda r: r["score"])["step"]
    assert trained_run.progress.best_step == best_step


def test_saved_model_is_the_best_checkpoint(trained_run, colours: Path) -> None:
    again = evaluate(EvalConfig(trained_run.run_dir / "model", SourceSpec(str(colours)), device="cpu"))
    assert again == trained_run.best_val


def test_same_seed_reproduces_a_run_and_another_seed_does_not(tmp_path: Path, colours: Path) -> None:
    runs = {}
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        runs[name] = weights(
            train(tiny_config(tmp_path / name, colours, seed=seed, crop_scale=0.8)).run_dir / "model"
        )
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def test_interrupted_run_resumes_to_the_same_weights(tmp_path: Path, colours: Path, monkeypatch) -> None:
    straight = train(tiny_config(tmp_path / "straight", colours, epochs=4, optim={"batch_size": 4}))
    assert straight.progress.step == 8

    real_step = training.train_step

    def step_then_ctrl_c(run, idx):
        loss = real_step(run, idx)
        if run.progress.step == 4:  # the 5th step: send ourselves Ctrl-C mid-epoch
            os.kill(os.getpid(), signal.SIGINT)
        return loss

    monkeypatch.setattr(training, "train_step", step_then_ctrl_c)
    cfg = tiny_config(tmp_path / "resumed", colours, epochs=4, optim={"batch_size": 4})
    first = train(cfg)
    assert first.status == "interrupted" and first.progress.step == 5
    monkeypatch.setattr(training, "train_step", real_step)
    second = train(cfg, resume=True)
    assert second.status == "finished" and second.progress.step == 8
    a, b = weights(straight.run_dir / "model"), weights(second.run_dir / "model")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_starting_over_an_existing_run_is_refused(trained_run, colours: Path) -> None:
    with pytest.raises(ClipsearchError, match="--resume"):
        train(tiny_config(trained_run.run_dir, colours))


def test_time_budget_stops_cleanly_with_a_schedule_fitted_to_it(
    tmp_path: Path, colours: Path, monkeypatch
) -> None:
    # A fake wall-clock that advances 50 ms per reading, so the test never depends on the machine's speed.
    ticks = iter(range(10**9))
    monkeypatch.setattr(training.time, "monotonic", lambda: next(ticks) * 0.05)
    monkeypatch.setattr(training, "MIN_WARMUP_STEPS", 1)  # the time-based schedule alone
    result = train(tiny_config(tmp_path / "budget", colours, colours, epochs=None, time_budget_min=0.2))
    assert result.status == "time_budget" and result.progress.finished
    assert (result.run_dir / "model" / WEIGHTS_NAME).is_file()
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if r["kind"] == "train"]
    assert max(lrs) > 5 * lrs[-1]  # warmed up, then decayed by wall-clock towards 0 at the budget's end
    assert any(r["kind"] == "val" for r in rows)


def test_accumulated_steps_give_the_full_batch_gradient(tmp_path: Path, colours: Path) -> None:
    grads = []
    for batch, accum in ((8, 1), (4, 2)):
        cfg = tiny_config(
            tmp_path / f"acc{accum}", colours, optim={"batch_size": batch, "accum_steps": accum}
        )
        run = setup_run(cfg.validate(), resume=False)
        training.train_step(run, torch.arange(8))
        grads.append({n: p.grad.clone() for n, p in run.built.model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-4, rtol=1e-3)


def test_siglip_loss_trains_and_saves_its_bias(tmp_path: Path, colours: Path) -> None:
    result = train(tiny_config(tmp_path / "siglip", colours, loss="siglip", epochs=2))
    cfg = json.loads((result.run_dir / "model" / "open_clip_config.json").read_text())
    assert cfg["model_cfg"]["init_logit_bias"] == -10.0
    model = open_clip.create_model(f"local-dir:{result.run_dir / 'model'}")
    assert model.logit_bias is not None and float(model.logit_bias) != -10.0  # learned


@pytest.mark.parametrize("precision", ["bf16", "amp_bf16"])
def test_bf16_autocast_runs_on_cpu(tmp_path: Path, colours: Path, monkeypatch, precision: str) -> None:
    dtypes: list[torch.dtype] = []
    real_encode = open_clip.CLIP.encode_image

    def recording(self, *args, **kw):
        out = real_encode(self, *args, **kw)
        dtypes.append(out.dtype)
        return out

    monkeypatch.setattr(open_clip.CLIP, "encode_image", recording)
    result = train(tiny_config(tmp_path / "bf16", colours, precision=precision, epochs=2))
    losses = [json.loads(x)["loss"] for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(losses)))
    # Every forward pass really ran under bf16 autocast: an fp32 fallback would record float32 here.
    assert dtypes and set(dtypes) == {torch.bfloat16}


def test_lock_image_keeps_the_pretrained_image_tower(
    tmp_path: Path, colours: Path, tiny_model_dir: Path
) -> None:
    checkpoint_file = tiny_model_dir / WEIGHTS_NAME  # --pretrained as a checkpoint file
    cfg = tiny_config(
        tmp_path / "lock", colours, model={"pretrained": str(checkpoint_file), "lock_image": True}
    )
    after = weights(train(cfg).run_dir / "model")
    before = weights(tiny_model_dir)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))
    assert not torch.equal(before["text_projection"], after["text_projection"])


def test_lock_text_with_unlocked_layers(tmp_path: Path, colours: Path, tiny_model_dir: Path) -> None:
    # --pretrained as a model dir without --model: the architecture comes from the dir.
    # open_clip counts groups from the end: 1 = the projection, 2 = also the last block and ln_final.
    spec = {"model": None, "pretrained": str(tiny_model_dir), "lock_text": True, "unlocked_layers": 2}
    after = weights(train(tiny_config(tmp_path / "lockt", colours, model=spec)).run_dir / "model")
    before = weights(tiny_model_dir)
    frozen = [k for k in before if k.startswith("transformer.resblocks.0.") or k == "token_embedding.weight"]
    trained = [k for k in before if k.startswith("transformer.resblocks.1.")]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    assert any(not torch.equal(before[k], after[k]) for k in trained)
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("visual."))


def test_fine_tuning_learns_new_data_and_keeps_old_recall(
    tmp_path: Path, trained_run, colours: Path, new_colours: Path
) -> None:
    old_model = trained_run.run_dir / "model"

    def score(model_dir: Path, data: Path) -> float:
        return evaluate(EvalConfig(model_dir, SourceSpec(str(data)), device="cpu")).text_to_image.r_at_1

    old_before, new_before = score(old_model, colours), score(old_model, new_colours)
    cfg = tiny_config(
        tmp_path / "ft",
        new_colours,
        new_colours,
        epochs=8,
        model={"model": None, "pretrained": str(old_model)},
        optim={"lr": 5e-4},
    )
    tuned = train(cfg).run_dir / "model"
    assert score(tuned, new_colours) > new_before
    assert score(tuned, colours) >= old_before - 0.25  # within reason: at most 2 of the 8 old colours lost
