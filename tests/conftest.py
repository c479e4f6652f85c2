"""Shared fixtures: a tiny random model and a synthetic image–caption set, both made by the tests."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from PIL import Image

from indexer.core import hashing
from indexer.core.architectures import register_shipped_configs
from indexer.core.bundle.items import Item, Skipped
from indexer.core.bundle.manifest import IndexSpec
from indexer.core.encoder import Encoder
from indexer.index.publish import BundleContents

REPO = Path(__file__).resolve().parents[1]

register_shipped_configs()  # tests build `tiny-test` with open_clip directly, as any open_clip user would

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 20, 20),
    "green": (20, 200, 40),
    "blue": (20, 40, 230),
    "yellow": (240, 230, 20),
    "purple": (140, 30, 170),
    "orange": (250, 140, 10),
    "black": (5, 5, 5),
    "white": (250, 250, 250),
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A randomly initialised `tiny-test` model saved in open_clip's local-dir layout."""
    import open_clip

    from indexer.core.architectures import model_config
    from indexer.core.modeldir import save_model_dir

    torch.manual_seed(0)
    model = open_clip.create_model("tiny-test")
    return save_model_dir(model, model_config("tiny-test"), tmp_path_factory.mktemp("tiny-model"))


def make_colour_dataset(root: Path, size: int = 40) -> Path:
    """8 solid-colour PNGs and `captions.csv` (filepath,caption) under `root`; returns the CSV."""
    images = root / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, rgb in COLOURS.items():
        path = images / f"{name}.png"
        Image.new("RGB", (size, size), rgb).save(path)
        rows.append({"filepath": f"images/{name}.png", "caption": f"a {name} square"})
    csv_path = root / "captions.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["filepath", "caption"])
        w.writeheader()
        w.writerows(rows)
    return csv_path


@pytest.fixture(scope="session")
def colour_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only session dataset; tests that modify data should call `make_colour_dataset` themselves."""
    return make_colour_dataset(tmp_path_factory.mktemp("colours"))


def run_cli(
    args: Sequence[str], cwd: Path | None = None, timeout: float = 300, **kw
) -> subprocess.CompletedProcess[str]:
    """Run `clipsearch ARGS` in a real subprocess (`python -m clipsearch`), capturing text output."""
    env = {**os.environ, "PYTHONPATH": str(REPO), **kw.pop("env", {})}
    return subprocess.run(
        [sys.executable, "-m", "clipsearch", *args],
        cwd=cwd or REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def bundle_contents(model_dir, n_images=3, n_texts=2, dim=32) -> BundleContents:
    """Random unit vectors for `n_images` images and `n_texts` texts, ready for `publish`."""
    enc = Encoder.from_dir(model_dir, "cpu")
    rng = np.random.default_rng(0)

    def index(ids):
        x = rng.normal(size=(len(ids), dim)).astype(np.float32)
        faiss.normalize_L2(x)
        idx = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        idx.add_with_ids(x, np.asarray(ids, dtype=np.int64))
        return idx

    img_ids, txt_ids = list(range(n_images)), list(range(n_images, n_images + n_texts))
    items = [Item(id=i, kind="image", path=f"/x/{i}.png") for i in img_ids]
    items += [Item(id=i, kind="text", text=f"text {i}") for i in txt_ids]
    return BundleContents(
        model_dir=model_dir,
        model=enc.info,
        image_index=index(img_ids),
        text_index=index(txt_ids),
        images=IndexSpec(file="images.faiss", count=n_images),
        texts=IndexSpec(file="texts.faiss", count=n_texts),
        items=items,
        skipped=[Skipped("/x/bad.png", "truncated")],
    )


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Paths `file_sha256` reads from now on, in call order, in every project module that uses it."""
    calls: list[Path] = []
    original = hashing.file_sha256

    def counting(path: Path, *args: object, **kwargs: object) -> str:
        calls.append(Path(path))
        return original(path, *args, **kwargs)  # type: ignore[arg-type]

    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] in ("indexer", "service") and getattr(mod, "file_sha256", None) is original:
            monkeypatch.setattr(mod, "file_sha256", counting)
    return calls
