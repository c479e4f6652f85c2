"""A locked image trunk without augmentation runs once per image, not every step, with the same result."""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import pytest
import torch

from indexer.train.data import PixelPipeline
from indexer.train.frozen_image import freeze_image_features
from indexer.train.loop import train
from indexer.train.towers import lock_towers
from tests.train.conftest import tiny_config


def _cnn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return open_clip.create_model("small", pretrained_text=False)  # a timm ResNet tower


def test_locked_trunk_is_cached_and_its_head_still_trains() -> None:
    model = _cnn_model()
    lock_towers(model, lock_image=True, lock_text=False, unlocked_layers=0)
    pixels = torch.randint(0, 256, (5, 3, 48, 48), dtype=torch.uint8)
    pipeline = PixelPipeline.from_preprocess(open_clip.image_transform(48, is_train=False), 48)
    frozen = freeze_image_features(model, pixels, pixels[:2], pipeline.normalise, 1.0, torch.device("cpu"))
    assert frozen is not None and frozen.train.shape == (5, 512)
    with torch.no_grad():
        want = model.eval().encode_image(pipeline.normalise(pixels), normalize=True)
        assert torch.allclose(frozen.embed(frozen.train), want, atol=1e-5)
        assert torch.allclose(frozen.embed(frozen.val), want[:2], atol=1e-5)
    frozen.embed(frozen.train).sum().backward()
    assert model.visual.head.proj.weight.grad is not None


def test_no_cache_when_the_trunk_trains_or_crops_change_its_input() -> None:
    model = _cnn_model()
    pixels = torch.zeros((2, 3, 48, 48), dtype=torch.uint8)
    assert freeze_image_features(model, pixels, None, lambda x: x.float(), 1.0, torch.device("cpu")) is None
    lock_towers(model, lock_image=True, lock_text=False, unlocked_layers=0)
    assert freeze_image_features(model, pixels, None, lambda x: x.float(), 0.8, torch.device("cpu")) is None
    tiny = open_clip.create_model("tiny-test")  # not a timm tower: nothing to cache
    lock_towers(tiny, lock_image=True, lock_text=False, unlocked_layers=0)
    assert freeze_image_features(tiny, pixels, None, lambda x: x.float(), 1.0, torch.device("cpu")) is None


@pytest.mark.slow
def test_a_run_with_a_locked_image_tower_never_runs_it_per_step(tmp_path: Path, colours: Path, monkeypatch):
    calls = {"n": 0}
    original = torch.nn.Module.__call__

    def counting(self, *args, **kwargs):
        if type(self).__name__ == "ResNet":
            calls["n"] += 1
        return original(self, *args, **kwargs)

    cfg = tiny_config(
        tmp_path / "run", colours, colours, model={"model": "small", "lock_image": True}, epochs=2
    )
    monkeypatch.setattr(torch.nn.Module, "__call__", counting)
    train(cfg)
    monkeypatch.setattr(torch.nn.Module, "__call__", original)
    assert calls["n"] == 2  # once for the train images, once for val; never in a step
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert resolved["image_features_cached"] is True
