"""DDP training on 2 gloo processes: one step's gradients equal one process on the concatenated batch (and
the combination open_clip warns about does not), a whole `train --nproc 2` run equals a single-process run
with the same global batch and seed, and only rank 0 writes."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import open_clip
import pytest
import torch
import torch.multiprocessing as mp
from open_clip.loss import ClipLoss
from safetensors.torch import load_file

from indexer.train.distributed import Towers, init_from_env, local_batch, make_distributed_loss, wrap
from tests.conftest import run_cli

GLOBAL_BATCH = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pixels = torch.randn(GLOBAL_BATCH, 3, 32, 32, generator=g)
    tokens = torch.zeros(GLOBAL_BATCH, 77, dtype=torch.long)
    tokens[:, :12] = torch.randint(1, 400, (GLOBAL_BATCH, 12), generator=g)
    tokens[:, 12] = 49407  # end of text: open_clip pools at the highest id
    return pixels, tokens


def _model() -> torch.nn.Module:
    from indexer.core.architectures import register_shipped_configs

    register_shipped_configs()
    torch.manual_seed(0)
    return open_clip.create_model("tiny-test")


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rank_step(rank: int, world: int, port: int, out: str, gather_with_grad: bool) -> None:
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    d, device = init_from_env(torch.device("cpu"))
    assert d is not None and d.backend == "gloo"
    model = _model()
    if rank == 1:  # different local init: DDP must broadcast rank 0's weights
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    towers = wrap(Towers(model, None), d, device)
    loss_fn = (
        make_distributed_loss("clip", d)
        if gather_with_grad
        else ClipLoss(local_loss=True, gather_with_grad=False, rank=rank, world_size=world)
    )
    pixels, tokens = _batch()
    idx = local_batch(torch.arange(GLOBAL_BATCH), d)
    image, text = towers(pixels[idx], tokens[idx])
    loss_fn(image, text, model.logit_scale.exp()).backward()
    if rank == 0:
        torch.save(_grads(model), out)
    torch.distributed.destroy_process_group()


def _distributed_grads(tmp_path: Path, gather_with_grad: bool) -> dict[str, torch.Tensor]:
    out = tmp_path / f"grads-{gather_with_grad}.pt"
    mp.spawn(_rank_step, args=(2, _free_port(), str(out), gather_with_grad), nprocs=2, join=True)
    return torch.load(out)


def _single_process_grads() -> dict[str, torch.Tensor]:
    model = _model()
    pixels, tokens = _batch()
    image, text = Towers(model, None)(pixels, tokens)
    ClipLoss()(image, text, model.logit_scale.exp()).backward()
    return _grads(model)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_one_ddp_step_has_the_gradients_of_one_process_on_the_whole_batch(tmp_path):
    single = _single_process_grads()
    ddp = _distributed_grads(tmp_path, gather_with_grad=True)
    assert set(ddp) == set(single)
    for name, g in single.items():
        torch.testing.assert_close(ddp[name], g, rtol=1e-4, atol=1e-6, msg=name)
    # The control: a local loss over features gathered without their gradients is a different gradient
    # (the test above could fail).
    wrong = _distributed_grads(tmp_path, gather_with_grad=False)
    rel = max(float((wrong[n] - g).norm() / g.norm().clamp_min(1e-12)) for n, g in single.items())
    assert rel > 0.05


def _train(out: Path, data: Path, *extra: str) -> None:
    proc = run_cli(
        [
            "train",
            "--train",
            str(data),
            "--out",
            str(out),
            "--model",
            "tiny-test",
            "--epochs",
            "2",
            "--log-every",
            "1",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--no-progress",
            "--seed",
            "3",
            *extra,
        ],
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_two_process_run_equals_one_process_with_the_same_global_batch(tmp_path, colour_csv):
    _train(tmp_path / "one", colour_csv, "--batch-size", "4")
    _train(tmp_path / "two", colour_csv, "--batch-size", "2", "--nproc", "2")
    one = load_file(tmp_path / "one" / "model" / "open_clip_model.safetensors")
    two = load_file(tmp_path / "two" / "model" / "open_clip_model.safetensors")
    assert set(one) == set(two)
    for name, w in one.items():
        torch.testing.assert_close(two[name], w, rtol=1e-4, atol=1e-5, msg=name)
    # Only rank 0 wrote: one line per step, as many steps as the single-process run.
    lines = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    single = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in lines if r["kind"] == "train"]
    assert steps == [r["step"] for r in single if r["kind"] == "train"] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "two" / "config.json").read_text())["resolved"]["steps_per_epoch"] == 2


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_time_budget_stops_every_rank_at_the_same_step(tmp_path, colour_csv):
    out = tmp_path / "budget"
    proc = run_cli(
        [
            "train",
            "--train",
            str(colour_csv),
            "--out",
            str(out),
            "--model",
            "tiny-test",
            "--time-budget",
            "0.2",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            "--workers",
            "0",
            "--no-progress",
            "--nproc",
            "2",
        ],
        timeout=280,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("time budget spent after") == 1  # rank 0 reports, once
    assert (out / "checkpoint").is_dir() and (out / "model").is_dir()


def test_nproc_is_dropped_from_the_command_the_ranks_run():
    from clipsearch.commands.train import _without_nproc

    args = ["train", "--nproc", "2", "--train", "t.csv", "--nproc=4", "--out", "r"]
    assert _without_nproc(args) == ["train", "--train", "t.csv", "--out", "r"]


def test_each_rank_takes_its_share_of_the_global_batch():
    from indexer.train.distributed import Dist

    idx = torch.arange(10, 18)
    shares = [local_batch(idx, Dist(r, 2, r, "gloo")) for r in range(2)]
    assert sorted(torch.cat(shares).tolist()) == idx.tolist()
    assert local_batch(idx, None).tolist() == idx.tolist()


def test_bad_nproc_is_one_line(tmp_path, colour_csv, capsys):
    from tests.cli.test_index_cli import call

    code, _, err = call(
        ["train", "--train", str(colour_csv), "--out", str(tmp_path / "r"), "--nproc", "0"], capsys
    )
    assert code == 1 and err.strip() == "error: --nproc must be at least 1, got 0"


# Seven distinct captions (one repeated) and five images: shares of 4 and 3 rows on 2 ranks, not equal.
CAPTIONS = [
    "a red square",
    "a blue square",
    "green",
    "a red square",
    "cyan",
    "a big yellow dot",
    "x",
    "mauve",
]


def _frozen_inputs() -> tuple[torch.nn.Module, torch.Tensor, torch.nn.Module, torch.Tensor, object]:
    from indexer.core.architectures import register_shipped_configs
    from indexer.train.data import PixelPipeline
    from indexer.train.towers import lock_towers

    register_shipped_configs()
    torch.manual_seed(0)
    text_model = open_clip.create_model("tiny-test")
    lock_towers(text_model, lock_image=False, lock_text=True, unlocked_layers=0)
    torch.manual_seed(0)
    image_model = open_clip.create_model("small", pretrained_text=False)  # a timm ResNet trunk
    lock_towers(image_model, lock_image=True, lock_text=False, unlocked_layers=0)
    pixels = torch.randint(
        0, 256, (5, 3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(2)
    )
    normalise = PixelPipeline.from_preprocess(open_clip.image_transform(48, is_train=False), 48).normalise
    return text_model, open_clip.get_tokenizer("tiny-test")(CAPTIONS), image_model, pixels, normalise


def _frozen_caches(d) -> dict[str, torch.Tensor]:
    from indexer.train.frozen_image import freeze_image_features
    from indexer.train.frozen_text import freeze_text_features

    text_model, tokens, image_model, pixels, normalise = _frozen_inputs()
    text = freeze_text_features(text_model, tokens, tokens[:3], torch.device("cpu"), d)
    image = freeze_image_features(image_model, pixels, pixels[:1], normalise, 1.0, torch.device("cpu"), d)
    assert text is not None and text.val is not None and image is not None and image.val is not None
    return {"text": text.train, "text_val": text.val, "image": image.train, "image_val": image.val}


def _rank_frozen(rank: int, world: int, port: int, out: str) -> None:
    from indexer.train.distributed import computed_once

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    d, _ = init_from_env(torch.device("cpu"))
    caches = _frozen_caches(d)
    # Which rows this rank computed: its own share only, and all of them come back to every rank. One row
    # on two ranks leaves rank 1 with nothing to compute, and it still receives the row.
    asked: list[tuple[int, int]] = []

    def rows(start: int, stop: int) -> torch.Tensor:
        asked.append((start, stop))
        return torch.arange(start, stop, dtype=torch.float32)[:, None].repeat(1, 3)

    caches["seven"] = computed_once(7, rows, d)
    caches["one"] = computed_once(1, rows, d)
    torch.save({"caches": caches, "asked": asked}, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_locked_tower_caches_are_computed_once_across_ranks_and_equal_one_process(tmp_path):
    single = _frozen_caches(None)
    out = tmp_path / "frozen.pt"
    mp.spawn(_rank_frozen, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    assert ranks[0]["asked"] == [(0, 4), (0, 1)] and ranks[1]["asked"] == [(4, 7)]
    for r in ranks:
        for name, want in single.items():
            torch.testing.assert_close(r["caches"][name], want, rtol=1e-4, atol=1e-5, msg=f"{name}")
        assert r["caches"]["seven"][:, 0].tolist() == list(range(7))
        assert r["caches"]["one"].tolist() == [[0.0, 0.0, 0.0]]
