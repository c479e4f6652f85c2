"""AdamW parameter groups, the warmup + cosine schedule, and the training data cache."""

from __future__ import annotations

import itertools

import open_clip
import pytest
import torch

from indexer.train.data import random_crop_batch, used_length
from indexer.train.optim import lr_at, param_groups


def test_no_weight_decay_on_norms_biases_embeddings_and_logit_scale() -> None:
    model = open_clip.create_model("tiny-test")
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay, decay = param_groups(model, weight_decay=0.1)
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    skipped = {names[id(p)] for p in no_decay["params"]}
    decayed = {names[id(p)] for p in decay["params"]}
    assert {
        "logit_scale",
        "token_embedding.weight",
        "positional_embedding",
        "visual.class_embedding",
    } <= skipped
    assert "ln_final.weight" in skipped and "visual.conv1.weight" in decayed
    assert not any("bias" in n or ".ln_" in n or "embedding" in n for n in decayed)
    assert len(skipped) + len(decayed) == len(names)


def test_locked_parameters_are_not_optimised() -> None:
    model = open_clip.create_model("tiny-test")
    model.lock_image_tower()
    groups = param_groups(model, 0.1)
    assert not any(p is q for g in groups for p in g["params"] for q in model.visual.parameters())


def test_warmup_then_cosine_to_zero() -> None:
    lrs = [lr_at(i / 100, 1.0, warmup=0.1) for i in range(101)]
    assert lrs[0] < 0.02 and lrs[5] == pytest.approx(0.51, abs=0.01)
    assert max(lrs) == pytest.approx(1.0, abs=0.01) and lrs.index(max(lrs)) in (10, 11)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] == pytest.approx(0.0, abs=1e-9) and lrs[55] == pytest.approx(0.5, abs=0.01)


def test_used_length_keeps_every_real_token() -> None:
    tokens = torch.zeros(3, 10, dtype=torch.long)
    tokens[0, :4] = torch.tensor([5, 6, 7, 9])
    tokens[1, :6] = torch.tensor([5, 1, 2, 3, 4, 9])
    assert used_length(tokens) == 6
    truncated = torch.full((2, 4), 7, dtype=torch.long)  # every caption fills the context
    assert used_length(truncated) == 4
    assert used_length(torch.ones(2, 4, dtype=torch.long), pad=1) == 1


def test_random_crop_keeps_the_shape_and_is_seeded() -> None:
    pixels = torch.rand(4, 3, 16, 16)
    a = random_crop_batch(pixels, torch.Generator().manual_seed(1), 0.75)
    b = random_crop_batch(pixels, torch.Generator().manual_seed(1), 0.75)
    assert a.shape == pixels.shape and torch.equal(a, b) and not torch.equal(a, pixels)
    assert random_crop_batch(pixels, torch.Generator(), 1.0) is pixels


def test_compact_token_embedding_trains_exactly_like_the_full_table() -> None:
    from indexer.train.compact_embedding import compact_token_embedding, full_token_embedding
    from indexer.train.optim import make_optimizer

    tokens = torch.zeros(6, 77, dtype=torch.long)  # tiny-test uses the full context of 77
    tokens[:, :10] = torch.randint(1, 300, (6, 10), generator=torch.Generator().manual_seed(0))
    results = []
    for compact in (False, True):
        torch.manual_seed(0)
        model = open_clip.create_model("tiny-test")
        if compact:
            assert compact_token_embedding(model, tokens.flatten())
        opt = make_optimizer(model, 1e-2, 0.1, (0.9, 0.98), 1e-6)
        for _ in range(3):
            opt.zero_grad()
            model.encode_text(tokens).pow(2).sum().backward()
            opt.step()
        with full_token_embedding(model):
            results.append({k: v.clone() for k, v in model.state_dict().items()})
    assert results[0].keys() == results[1].keys()
    for k in results[0]:
        torch.testing.assert_close(results[0][k], results[1][k], atol=1e-6, rtol=1e-5)
    assert not torch.equal(
        results[1]["token_embedding.weight"][tokens[0, 0]],
        open_clip.create_model("tiny-test").token_embedding.weight[tokens[0, 0]],
    )
