"""Helpers for the indexer's tests: small varied image folders and a one-call in-process indexer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from indexer.data.sources import SourceSpec
from indexer.index.build import IndexConfig
from indexer.index.embed import EmbedConfig
from indexer.index.runner import ReindexConfig, ReindexResult, reindex


def make_image(path: Path, seed: int, size: int = 48) -> Path:
    """A distinct picture per seed: a colour gradient plus noise (solid colours embed too alike)."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=3)
    ramp = np.linspace(0, 1, size)[None, :, None] * rng.integers(-120, 120, size=3)
    noise = rng.integers(0, 40, size=(size, size, 3))
    arr = np.clip(base + ramp + noise, 0, 255).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def make_folder(root: Path, n: int, captions: bool = True) -> Path:
    """`n` PNGs `img{i}.png` with a caption file each (`a picture number i`)."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        make_image(root / f"img{i:02d}.png", seed=i)
        if captions:
            (root / f"img{i:02d}.txt").write_text(f"a picture number {i}\n")
    return root


def run_index(model: Path, images: Path | str, bundles: Path, **kw: object) -> ReindexResult:
    """`reindex` in-process with test-friendly defaults (no decode workers, small batches)."""
    embed = EmbedConfig(
        batch_size=int(kw.pop("batch_size", 4)),
        workers=int(kw.pop("workers", 0)),
        cpu_int8=bool(kw.pop("cpu_int8", False)),
    )
    index = kw.pop("index", IndexConfig())
    cfg = ReindexConfig(
        model_dir=model, source=SourceSpec(str(images)), bundles_dir=bundles, embed=embed, index=index, **kw
    )  # type: ignore[arg-type]
    return reindex(cfg)
