"""Chunked retrieval metrics against a brute-force reference, and the `clipsearch eval --json` shape."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from indexer.eval.metrics import pairs_from_captions, retrieval_metrics
from tests.conftest import run_cli


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(image_emb: np.ndarray, text_emb: np.ndarray, captions: list[list[str]]) -> dict:
    """Full score matrix, argsort, first positive: the definition, written the slow way."""
    texts = list(dict.fromkeys(c for caps in captions for c in caps))
    scores = text_emb @ image_emb.T  # [texts, images]

    def summary(ranks: list[int]) -> dict:
        r = np.array(ranks)
        return {
            "R@1": np.mean(r <= 1),
            "R@5": np.mean(r <= 5),
            "R@10": np.mean(r <= 10),
            "median_rank": np.median(r),
        }

    t2i = []
    for t, text in enumerate(texts):
        order = list(np.argsort(-scores[t], kind="stable"))
        t2i.append(1 + min(order.index(i) for i, caps in enumerate(captions) if text in caps))
    i2t = []
    for i, caps in enumerate(captions):
        if not caps:
            continue
        order = list(np.argsort(-scores[:, i], kind="stable"))
        i2t.append(1 + min(order.index(texts.index(c)) for c in caps))
    n = sum(len(set(caps)) for caps in captions)
    return {"n": n, "text_to_image": summary(t2i), "image_to_text": summary(i2t)}


def _random_set(seed: int, n_images: int = 60, dim: int = 16):
    rng = np.random.default_rng(seed)
    words = [f"concept {k}" for k in range(40)]
    # Some images share a caption, some have two captions, one has none.
    captions = [[words[rng.integers(len(words))]] for _ in range(n_images)]
    for i in range(0, n_images, 7):
        captions[i].append(f"extra caption {i}")
    captions[5] = []
    pairs = pairs_from_captions(captions)
    return _unit(rng, n_images, dim), _unit(rng, len(pairs.texts), dim), captions, pairs


@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_match_brute_force(seed: int) -> None:
    image_emb, text_emb, captions, pairs = _random_set(seed)
    got = retrieval_metrics(image_emb, text_emb, pairs, chunk=2048).as_dict()
    want = brute_force(image_emb, text_emb, captions)
    assert got["n"] == want["n"]
    for direction in ("text_to_image", "image_to_text"):
        assert got[direction] == pytest.approx(want[direction])


def test_chunk_size_does_not_change_the_result() -> None:
    image_emb, text_emb, _, pairs = _random_set(2, n_images=90)
    reference = retrieval_metrics(image_emb, text_emb, pairs, chunk=4096)
    for chunk in (1, 3, 7, 32):
        assert retrieval_metrics(image_emb, text_emb, pairs, chunk=chunk) == reference


def test_caption_shared_by_several_images_counts_for_any_of_them() -> None:
    # Two images captioned "cat"; the text embedding equals the second image only.
    image_emb = np.eye(4, dtype=np.float32)
    captions = [["cat"], ["cat"], ["dog"], ["bird"]]
    pairs = pairs_from_captions(captions)
    assert pairs.texts == ("cat", "dog", "bird")
    text_emb = np.stack([image_emb[1], image_emb[2], image_emb[3]])
    m = retrieval_metrics(image_emb, text_emb, pairs)
    assert m.text_to_image.r_at_1 == 1.0  # "cat" finds image 1 first, and image 1 is a "cat" image
    assert m.n == 4


def test_perfect_embeddings_score_one() -> None:
    image_emb = np.eye(5, dtype=np.float32)
    pairs = pairs_from_captions([[f"t{i}"] for i in range(5)])
    m = retrieval_metrics(image_emb, image_emb.copy(), pairs, chunk=2)
    assert m.text_to_image.as_dict() == {"R@1": 1.0, "R@5": 1.0, "R@10": 1.0, "median_rank": 1.0}
    assert m.image_to_text.median_rank == 1.0 and m.score() == 1.0


@pytest.mark.slow
def test_eval_cli_json_shape(tiny_model_dir: Path, colour_csv: Path) -> None:
    res = run_cli(
        [
            "eval",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(colour_csv),
            "--json",
            "--batch-size",
            "3",
            "--device",
            "cpu",
        ]
    )
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)  # exactly one JSON object and nothing else on stdout
    assert set(out) == {"n", "text_to_image", "image_to_text"}
    assert out["n"] == 8
    for direction in ("text_to_image", "image_to_text"):
        assert set(out[direction]) == {"R@1", "R@5", "R@10", "median_rank"}
        assert 0.0 <= out[direction]["R@1"] <= out[direction]["R@5"] <= out[direction]["R@10"] == 1.0


@pytest.mark.slow
def test_eval_cli_bad_input_is_one_line(tiny_model_dir: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("picture,words\nx.png,a thing\n")
    res = run_cli(["eval", "--model", str(tiny_model_dir), "--data", str(csv_path)])
    assert res.returncode == 1
    assert res.stderr.strip().startswith("error:") and "columns found: picture, words" in res.stderr
    assert "Traceback" not in res.stderr
