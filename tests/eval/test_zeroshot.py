"""Zero-shot classification: the accuracy against a loop, prompts and classes, labels read from the data,
and `clipsearch eval` reporting it next to retrieval."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import indexer.eval.runner as runner_module
from clipsearch.cli import app
from indexer.data.sources import DataError, SourceSpec, read_records
from indexer.eval.zeroshot import (
    PROMPT_SETS,
    class_embeddings,
    label_indices,
    prompt_templates,
    read_classes,
    zero_shot_accuracy,
)
from tests.conftest import COLOURS, make_colour_dataset

runner = CliRunner()


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("seed", [0, 1])
def test_accuracy_matches_a_loop(seed: int) -> None:
    rng = np.random.default_rng(seed)
    images, classes = _unit(rng.standard_normal((50, 8))), _unit(rng.standard_normal((12, 8)))
    labels = [tuple(rng.choice(12, size=rng.integers(0, 3), replace=False).tolist()) for _ in range(50)]
    got = zero_shot_accuracy(images, classes, labels, "simple")
    labelled = [i for i in range(50) if labels[i]]
    want = {}
    for k in (1, 5):
        hits = 0
        for i in labelled:
            order = sorted(range(12), key=lambda c: -float(images[i] @ classes[c]))
            hits += any(c in labels[i] for c in order[:k])
        want[k] = hits / len(labelled)
    assert (got.n, got.classes) == (len(labelled), 12)
    assert (got.top1, got.top5) == pytest.approx((want[1], want[5]))
    with pytest.raises(DataError, match="no image has a label"):
        zero_shot_accuracy(images, classes, [()] * 50, "simple")


def test_a_class_vector_is_the_renormalised_mean_of_its_prompts() -> None:
    seen: list[list[str]] = []

    def encode(texts: list[str]) -> np.ndarray:
        seen.append(texts)
        return _unit(np.stack([[len(t), t.count("a"), 1.0] for t in texts]))

    emb = class_embeddings(encode, ["cat", "zebra"], ["a {}.", "art of the {}"])
    assert seen == [["a cat.", "art of the cat", "a zebra.", "art of the zebra"]]
    want = _unit(encode(["a cat.", "art of the cat"]).mean(axis=0))
    np.testing.assert_allclose(emb[0], want, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)


def test_classes_prompts_and_labels(tmp_path: Path) -> None:
    assert read_classes("cat, dog,bird") == ("cat", "dog", "bird")
    (tmp_path / "classes.txt").write_text("cat\ndog\n\n")
    assert read_classes(str(tmp_path / "classes.txt")) == ("cat", "dog")
    with pytest.raises(DataError, match="at least 2 distinct"):
        read_classes("cat,cat")
    assert len(PROMPT_SETS["openai"]) == 80 and "itap of a {}." in prompt_templates("simple")
    (tmp_path / "prompts.txt").write_text("a drawing of a {}\n")
    assert prompt_templates(str(tmp_path / "prompts.txt")) == ("a drawing of a {}",)
    (tmp_path / "bad.txt").write_text("no placeholder\n")
    with pytest.raises(DataError, match="template with"):
        prompt_templates(str(tmp_path / "bad.txt"))
    classes, ids = label_indices([("dog",), (), ("cat", "dog")], None, ["a", "b", "c"])
    assert classes == ("cat", "dog") and ids == [(1,), (), (0, 1)]
    classes, ids = label_indices([("1",), ("bird",)], ("cat", "bird"), ["a", "b"])
    assert ids == [(1,), (1,)]  # an index into --classes, as ImageNet-style files give
    with pytest.raises(DataError, match="'fish' is not one of the 2"):
        label_indices([("fish",)], ("cat", "bird"), ["img.png"])


def test_sources_read_a_label_column(tmp_path: Path) -> None:
    with open(tmp_path / "d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerows([["filepath", "caption", "label"], ["a.png", "x", "cat"], ["a.png", "y", "cat"]])
        w.writerow(["b.png", "z", ""])
    records = read_records(SourceSpec(str(tmp_path / "d.csv")))
    assert [(r.captions, r.labels) for r in records] == [(("x", "y"), ("cat",)), (("z",), ())]
    lines = [{"image": "a.png", "caption": "x", "label": 3}, {"image": "b.png", "label": ["u", "v"]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    records = read_records(SourceSpec(str(tmp_path / "d.jsonl"), label_column="label"))
    assert [r.labels for r in records] == [("3",), ("u", "v")]
    assert read_records(SourceSpec(str(tmp_path / "d.csv"), label_column="none"))[0].labels == ()


class ColourEncoder:
    """Embeds an image by its nearest named colour and a text by the colour word it holds: a model that
    classifies the colour set perfectly, so the runner's wiring is what the test checks."""

    def __init__(self) -> None:
        self.names = list(COLOURS)
        self.info = SimpleNamespace(embed_dim=len(self.names))
        self.preprocess = lambda image: torch.tensor(np.asarray(image.convert("RGB").resize((4, 4)))).float()

    def _one_hot(self, idx: list[int]) -> np.ndarray:
        return np.eye(len(self.names), dtype=np.float32)[idx]

    def encode_pixels(self, pixels: torch.Tensor) -> np.ndarray:
        rgb = pixels.mean(dim=(1, 2)).numpy()
        ref = np.array(list(COLOURS.values()), dtype=np.float32)
        return self._one_hot([int(np.argmin(((ref - c) ** 2).sum(1))) for c in rgb])

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        return self._one_hot([next(i for i, n in enumerate(self.names) if n in t) for t in texts])


def _labelled(root: Path, label_of: dict[str, str]) -> Path:
    src = make_colour_dataset(root)
    with open(src, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(root / "labelled.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["filepath", "caption", "label"])
        w.writeheader()
        w.writerows({**r, "label": label_of[r["caption"].split()[1]]} for r in rows)
    return root / "labelled.csv"


def test_eval_reports_zero_shot_next_to_retrieval(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(runner_module.Encoder, "from_dir", classmethod(lambda cls, *a, **k: ColourEncoder()))
    data = _labelled(tmp_path / "d", {n: n for n in COLOURS})
    args = ["eval", "--model", str(tmp_path), "--data", str(data), "--json", "--device", "cpu"]
    out = json.loads(runner.invoke(app, args).stdout)
    assert set(out) == {"n", "text_to_image", "image_to_text", "zero_shot"}
    assert out["text_to_image"]["R@1"] == 1.0
    assert out["zero_shot"] == {"n": 8, "classes": 8, "top1": 1.0, "top5": 1.0, "prompts": "simple"}
    # Labels as indices into --classes, one of them wrong: 7 of 8 right.
    names = list(COLOURS)
    wrong = {n: str(names.index(n)) for n in names} | {"red": str(names.index("blue"))}
    data = _labelled(tmp_path / "e", wrong)
    res = runner.invoke(app, [*args[:4], str(data), "--classes", ",".join(names), "--prompts", "name"])
    assert res.exit_code == 0, res.output
    assert "zero-shot: 8 labelled images, 8 classes, prompts name: top-1 0.875, top-5" in res.stdout
    assert "text->image" in res.stdout


def test_eval_without_labels_keeps_its_shape_and_refuses_classes(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(runner_module.Encoder, "from_dir", classmethod(lambda cls, *a, **k: ColourEncoder()))
    data = make_colour_dataset(tmp_path / "d")
    args = ["eval", "--model", str(tmp_path), "--data", str(data), "--device", "cpu"]
    out = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert set(out) == {"n", "text_to_image", "image_to_text"}
    res = runner.invoke(app, [*args, "--classes", "red,blue"])
    assert res.exit_code == 1 and "no image has a label" in res.output
    res = runner.invoke(app, [*args, "--prompts", "nonsense"])
    assert res.exit_code == 1 and "--prompts nonsense" in res.output
