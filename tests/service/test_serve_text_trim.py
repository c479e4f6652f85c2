"""Trimmed text encoding (only up to the batch's longest text) equals the full 77-token forward."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from indexer.core.encoder import Encoder

TEXTS = ["a red square", "red", "", "a photo of a dog on a beach at sunset!!", "a " * 30, "émoji 🐶 text"]


@pytest.fixture(scope="module")
def encoder(tiny_model_dir: Path) -> Encoder:
    return Encoder.from_dir(tiny_model_dir, device="cpu")


def test_tiny_model_text_tower_can_be_trimmed(encoder: Encoder) -> None:
    assert encoder.can_trim_texts


@pytest.mark.parametrize("texts", [TEXTS, TEXTS[:1], TEXTS[1:3], ["x " * 200]])
def test_trimmed_equals_full_forward(encoder: Encoder, texts: list[str]) -> None:
    full = encoder.encode_texts(texts)
    trimmed = encoder.encode_texts(texts, trim=True)
    np.testing.assert_allclose(trimmed, full, atol=1e-5)


def test_trim_really_runs_fewer_positions(encoder: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    lengths = []
    real = encoder.model.transformer.forward

    def spy(x, *args, **kw):  # type: ignore[no-untyped-def]
        lengths.append(x.shape[1])
        return real(x, *args, **kw)

    monkeypatch.setattr(encoder.model.transformer, "forward", spy)
    encoder.encode_texts(["a red square", "red"], trim=True)
    encoder.encode_texts(["a red square", "red"])
    assert lengths == [5, 77]  # <start> a red square <end>


def test_falls_back_when_the_tower_does_not_pool_at_eot(
    encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encoder.model, "text_pool_type", "last")
    assert not encoder.can_trim_texts
    np.testing.assert_allclose(encoder.encode_texts(TEXTS, trim=True), encoder.encode_texts(TEXTS), atol=0)
