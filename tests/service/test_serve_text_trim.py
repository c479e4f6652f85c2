"""Trimmed text encoding (each text only up to its end, the batch's texts packed into one sequence)
equals the full 77-token forward."""

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


@pytest.mark.parametrize("texts", [TEXTS, TEXTS[:1], TEXTS[1:3], ["x " * 200], TEXTS * 12])  # last: 4 packs
def test_trimmed_equals_full_forward(encoder: Encoder, texts: list[str]) -> None:
    full = encoder.encode_texts(texts)
    trimmed = encoder.encode_texts(texts, trim=True)
    np.testing.assert_allclose(trimmed, full, atol=1e-5)


def _transformer_shapes(encoder: Encoder, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """(batch, positions) of every forward of the text transformer from now on."""
    shapes: list[tuple[int, ...]] = []
    real = encoder.model.transformer.forward

    def spy(x, *args, **kw):  # type: ignore[no-untyped-def]
        shapes.append(tuple(x.shape[:2]))
        return real(x, *args, **kw)

    monkeypatch.setattr(encoder.model.transformer, "forward", spy)
    return shapes


def test_trim_really_runs_fewer_positions(encoder: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    shapes = _transformer_shapes(encoder, monkeypatch)
    encoder.encode_texts(["a red square", "red"], trim=True)
    encoder.encode_texts(["a red square", "red"])
    # <start> a red square <end> and <start> red <end> end to end in one sequence; then 2 x 77 padded
    assert shapes == [(1, 8), (2, 77)]


def test_packs_hold_at_most_pack_tokens_positions(encoder: Encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    from indexer.core import encoder as module

    monkeypatch.setattr(module, "PACK_TOKENS", 10)
    shapes = _transformer_shapes(encoder, monkeypatch)
    texts = ["a red square", "red", "a red square", "x " * 200]  # 5, 3, 5 and 77 positions
    np.testing.assert_allclose(encoder.encode_texts(texts, trim=True), encoder.encode_texts(texts), atol=1e-5)
    assert shapes[:3] == [(1, 8), (1, 5), (1, 77)]  # a text longer than a pack goes alone


def test_falls_back_when_the_tower_does_not_pool_at_eot(
    encoder: Encoder, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(encoder.model, "text_pool_type", "last")
    assert not encoder.can_trim_texts
    np.testing.assert_allclose(encoder.encode_texts(TEXTS, trim=True), encoder.encode_texts(TEXTS), atol=0)
