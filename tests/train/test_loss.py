"""The loss wrapper against loop-based references with seeded features."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from indexer.train.loss import MAX_LOGIT_SCALE, clamp_logit_scale, contrastive_loss, make_loss


def _features(n: int = 6, dim: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (
        F.normalize(torch.randn(n, dim, generator=g), dim=-1),
        F.normalize(torch.randn(n, dim, generator=g), dim=-1),
    )


def naive_clip_loss(img: torch.Tensor, txt: torch.Tensor, scale: float) -> float:
    n, total = len(img), 0.0
    for i in range(n):  # image i against every text, then text i against every image
        row = [scale * float(img[i] @ txt[j]) for j in range(n)]
        col = [scale * float(txt[i] @ img[j]) for j in range(n)]
        total += -row[i] + math.log(sum(math.exp(v) for v in row))
        total += -col[i] + math.log(sum(math.exp(v) for v in col))
    return total / (2 * n)


def naive_siglip_loss(img: torch.Tensor, txt: torch.Tensor, scale: float, bias: float) -> float:
    n, total = len(img), 0.0
    for i in range(n):
        for j in range(n):
            label = 1.0 if i == j else -1.0
            z = label * (scale * float(img[i] @ txt[j]) + bias)
            total += math.log1p(math.exp(-z))
    return total / n


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clip_loss_matches_loop_reference(seed: int) -> None:
    img, txt = _features(seed=seed)
    got = contrastive_loss(make_loss("clip"), img, txt, torch.tensor(10.0))
    assert float(got) == pytest.approx(naive_clip_loss(img, txt, 10.0), rel=1e-5)


def test_siglip_loss_matches_loop_reference() -> None:
    img, txt = _features(seed=3)
    got = contrastive_loss(make_loss("siglip"), img, txt, torch.tensor(10.0), torch.tensor(-10.0))
    assert float(got) == pytest.approx(naive_siglip_loss(img, txt, 10.0, -10.0), rel=1e-5)


def test_siglip_needs_a_bias() -> None:
    img, txt = _features()
    with pytest.raises(ValueError, match="logit_bias"):
        contrastive_loss(make_loss("siglip"), img, txt, torch.tensor(10.0))


def test_aligned_pairs_with_large_scale_give_near_zero_loss() -> None:
    img = torch.eye(8)
    assert float(contrastive_loss(make_loss("clip"), img, img.clone(), torch.tensor(100.0))) < 1e-6
    shuffled = img[torch.tensor([1, 0, 2, 3, 4, 5, 6, 7])]
    assert float(contrastive_loss(make_loss("clip"), img, shuffled, torch.tensor(100.0))) > 1.0


def test_unknown_loss_is_refused() -> None:
    with pytest.raises(ValueError, match="clip, siglip"):
        make_loss("triplet")


def test_logit_scale_is_clamped_to_ln_100() -> None:
    model = torch.nn.Module()
    model.logit_scale = torch.nn.Parameter(torch.tensor(9.0))
    clamp_logit_scale(model)
    assert float(model.logit_scale) == pytest.approx(MAX_LOGIT_SCALE)
    model.logit_scale.data.fill_(-1.0)
    clamp_logit_scale(model)
    assert float(model.logit_scale) == 0.0
