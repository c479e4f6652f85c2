"""A locked text tower runs once per caption, not every step, and gives the same embeddings."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch

from indexer.core.architectures import resolve_model_name
from indexer.train.frozen_text import freeze_text_features
from indexer.train.loop import train
from indexer.train.towers import lock_towers
from tests.train.conftest import tiny_config
from tests.train.test_towers import cnn_bert_config  # noqa: F401  (fixture)

TEXTS = ["a red square", "a blue square", "green", "a red square"]


def _model(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    return model, open_clip.get_tokenizer(name)(TEXTS)


def test_fully_locked_tower_is_cached_whole() -> None:
    model, tokens = _model("tiny-test")
    lock_towers(model, lock_image=False, lock_text=True, unlocked_layers=0)
    frozen = freeze_text_features(model, tokens, tokens[:2], torch.device("cpu"))
    assert frozen is not None and frozen.what == "tower"
    model.eval()
    with torch.no_grad():
        want = model.encode_text(tokens, normalize=True)
        assert torch.allclose(frozen.embed(frozen.train), want, atol=1e-5)
        assert torch.allclose(frozen.embed(frozen.val), want[:2], atol=1e-5)


def test_hf_transformer_is_cached_and_its_projection_still_trains(cnn_bert_config: Path) -> None:  # noqa: F811
    model, tokens = _model(resolve_model_name(str(cnn_bert_config)))
    lock_towers(model, lock_image=False, lock_text=True, unlocked_layers=0)
    frozen = freeze_text_features(model, tokens, None, torch.device("cpu"))
    assert frozen is not None and frozen.what == "transformer"
    model.eval()  # the frozen transformer runs without dropout
    with torch.no_grad():
        assert torch.allclose(
            frozen.embed(frozen.train), model.encode_text(tokens, normalize=True), atol=1e-5
        )
    frozen.embed(frozen.train).sum().backward()
    assert model.text.proj.weight.grad is not None  # the head is still trained through the cache


def test_hf_top_layers_train_on_the_cached_output_of_the_lower_ones(cnn_bert_config: Path) -> None:  # noqa: F811
    """--unlocked-layers 2 on MiniLM (6 layers): layers 1-4 run once per caption, 5-6 every step, exactly."""
    model, tokens = _model(resolve_model_name(str(cnn_bert_config)))
    lock_towers(model, lock_image=False, lock_text=True, unlocked_layers=2)
    layers = model.text.transformer.encoder.layer
    assert not any(p.requires_grad for layer in layers[:4] for p in layer.parameters())
    assert all(p.requires_grad for layer in layers[4:] for p in layer.parameters())
    frozen = freeze_text_features(model, tokens, tokens[:1], torch.device("cpu"))
    assert frozen is not None and frozen.what == "layers 1-4"
    assert frozen.train.shape == (*tokens.shape, 384)  # one hidden state per token, padding zeroed
    model.eval()
    with torch.no_grad():
        want = model.encode_text(tokens, normalize=True)
        assert torch.allclose(frozen.embed(frozen.train), want, atol=1e-5)
        assert torch.allclose(frozen.embed(frozen.val), want[:1], atol=1e-5)
    model.train()
    frozen.embed(frozen.train).sum().backward()
    assert layers[5].output.dense.weight.grad is not None and model.text.proj.weight.grad is not None
    assert layers[3].output.dense.weight.grad is None


def test_unlocking_every_layer_of_a_hf_tower_is_a_one_line_error(cnn_bert_config: Path) -> None:  # noqa: F811
    from indexer.train.config import ConfigError

    model, _ = _model(resolve_model_name(str(cnn_bert_config)))
    with pytest.raises(ConfigError, match="has 6 layers; to train them all, use --no-lock-text"):
        lock_towers(model, lock_image=False, lock_text=True, unlocked_layers=6)


@pytest.mark.parametrize(("lock", "unlocked"), [(False, 0), (True, 1)])
def test_a_text_tower_that_trains_is_not_cached(lock: bool, unlocked: int) -> None:
    model, tokens = _model("tiny-test")
    lock_towers(model, lock_image=False, lock_text=lock, unlocked_layers=unlocked)
    assert freeze_text_features(model, tokens, None, torch.device("cpu")) is None


def test_locked_training_never_runs_the_text_tower_per_step(
    tmp_path: Path, colours: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = open_clip.CLIP.encode_text

    def counting(self, *a, **kw):
        calls.append(a[0].shape[0])
        return real(self, *a, **kw)

    monkeypatch.setattr(open_clip.CLIP, "encode_text", counting)
    cfg = tiny_config(tmp_path / "run", colours, colours, epochs=4, model={"lock_text": True})
    result = train(cfg)
    steps = result.progress.step
    assert steps >= 4
    # Once for the train captions and once for val, at set-up; never inside the 4 epochs' steps.
    assert len(calls) == 2, calls
    assert result.best_val is not None and result.best_val.text_to_image.r_at_10 == 1.0
