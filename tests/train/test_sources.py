"""Training reads every source form the data readers know: JSONL, an image folder, WebDataset shards."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest

from indexer.train.loop import train
from tests.conftest import COLOURS
from tests.train.conftest import tiny_config


def _make(kind: str, colours: Path, root: Path) -> Path:
    images = colours.parent / "images"
    if kind == "jsonl":
        path = root / "data.jsonl"
        lines = [
            json.dumps({"image": str(images / f"{c}.png"), "caption": [f"a {c} square", c]}) for c in COLOURS
        ]
        path.write_text("\n".join(lines))
        return path
    if kind == "folder":
        folder = root / "folder"
        folder.mkdir()
        for c in COLOURS:
            (folder / f"{c}.png").write_bytes((images / f"{c}.png").read_bytes())
            (folder / f"{c}.txt").write_text(f"a {c} square\n")
        return folder
    shard = root / "shard-00000.tar"
    with tarfile.open(shard, "w") as tar:
        for k, c in enumerate(COLOURS):
            tar.add(images / f"{c}.png", arcname=f"{k:05d}.png")
            txt = root / f"{k:05d}.txt"
            txt.write_text(f"a {c} square")
            tar.add(txt, arcname=f"{k:05d}.txt")
    return shard


@pytest.mark.parametrize("kind", ["jsonl", "folder", "webdataset"])
def test_train_on_each_source_form(tmp_path: Path, colours: Path, kind: str) -> None:
    source = _make(kind, colours, tmp_path)
    result = train(tiny_config(tmp_path / "run", source, source, epochs=1))
    assert result.status == "finished" and result.best_val.n == (16 if kind == "jsonl" else 8)
    resolved = json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]
    assert resolved["train_images"] == 8
