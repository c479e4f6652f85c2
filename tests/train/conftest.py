"""Fixtures for training tests: tiny-test runs on solid-colour data the tests make."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import pytest
from PIL import Image

from indexer.data.sources import SourceSpec
from indexer.train.config import ModelSpec, OptimConfig, TrainConfig
from tests.conftest import make_colour_dataset

NEW_COLOURS: dict[str, tuple[int, int, int]] = {
    "pink": (250, 150, 200),
    "teal": (0, 128, 128),
    "brown": (120, 70, 20),
    "grey": (128, 128, 128),
    "navy": (0, 0, 110),
    "lime": (180, 250, 60),
    "maroon": (110, 0, 20),
    "cyan": (0, 240, 240),
}


def write_csv(
    path: Path, rows: list[dict[str, str]], fields: tuple[str, str] = ("filepath", "caption")
) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(fields))
        w.writeheader()
        w.writerows(rows)
    return path


def make_new_colours(root: Path) -> Path:
    """8 colours not in the shared set, for fine-tuning."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for name, rgb in NEW_COLOURS.items():
        Image.new("RGB", (40, 40), rgb).save(root / "images" / f"{name}.png")
        rows.append({"filepath": f"images/{name}.png", "caption": f"a {name} square"})
    return write_csv(root / "captions.csv", rows)


def tiny_config(out: Path, train: Path | str, val: Path | str | None = None, **kw) -> TrainConfig:
    """A fast tiny-test run; keyword arguments replace TrainConfig fields (`optim`/`model` as dicts)."""
    optim = OptimConfig(**({"lr": 2e-3, "batch_size": 8, "warmup": 0.1} | kw.pop("optim", {})))
    model = ModelSpec(**({"model": "tiny-test"} | kw.pop("model", {})))
    base = TrainConfig(
        out=out,
        train=SourceSpec(str(train)),
        val=SourceSpec(str(val)) if val else None,
        model=model,
        optim=optim,
        epochs=3,
        device="cpu",
        workers=0,
        log_every=1,
        progress=False,
        crop_scale=1.0,
    )
    return replace(base, **kw)


@pytest.fixture(scope="session")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_colour_dataset(tmp_path_factory.mktemp("train-colours"))


@pytest.fixture(scope="session")
def new_colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_new_colours(tmp_path_factory.mktemp("new-colours"))


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, colours: Path):
    """One real run that learns the 8 colours (validated on the same set)."""
    from indexer.train.loop import train

    out = tmp_path_factory.mktemp("runs") / "base"
    return train(tiny_config(out, colours, colours, epochs=12))
