"""`dataset.json` of an emoji data set: what was built, from which font, and checks that it is complete."""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ValidationError

from indexer.core.hashing import file_sha256
from indexer.data.sources import DataError

DATASET_FILE = "dataset.json"
TABLES = ("captions.csv", "train.csv", "val.csv", "metadata.csv")


class SkipCounts(BaseModel):
    """Emoji of the catalogue the font could not draw, by reason."""

    blank: int = 0  # no glyph at all (newer than the font)
    tofu: int = 0  # the font's missing-glyph box
    unsupported: int = 0  # a sequence drawn as its separate parts


class SplitCounts(BaseModel):
    images: int
    concepts: int


class EmojiDatasetInfo(BaseModel):
    """Written last by `clipsearch data emoji`; its presence and checksums mean the build completed."""

    schema_version: Literal[1] = 1
    kind: Literal["emoji"] = "emoji"
    font: str
    font_sha256: str
    size: int
    seed: int
    val_fraction: float
    limit: int | None
    emoji_package: str
    # Pillow's text layout: `basic` (no raqm) cannot draw emoji sequences; None in older sets.
    layout: Literal["raqm", "basic"] | None = None
    catalogue: int  # fully-qualified emoji considered
    images: int  # rendered, one PNG each
    skipped: SkipCounts
    train: SplitCounts
    val: SplitCounts
    files: dict[str, str]  # table name -> sha256
    images_sha256: str  # over every image's path and sha256, in path order


def images_digest(root: Path, filepaths: Sequence[str]) -> str:
    """One sha256 for all images, so a changed, missing or extra image shows up in one comparison."""
    h = hashlib.sha256()
    for rel in filepaths:
        h.update(f"{rel}\0{file_sha256(root / rel)}\n".encode())
    return h.hexdigest()


def _filepaths(table: Path) -> list[str]:
    with open(table, newline="") as f:
        return [row["filepath"] for row in csv.DictReader(f)]


def check_emoji_dataset(root: Path, checksums: bool = True) -> EmojiDatasetInfo:
    """Load `root/dataset.json` and check that the tables and images it describes are all there.

    Raises DataError naming the first thing that is missing or changed.
    """
    path = root / DATASET_FILE
    if not path.is_file():
        raise DataError(f"{root} has no {DATASET_FILE}: not an emoji data set, or its build did not finish")
    try:
        info = EmojiDatasetInfo.model_validate_json(path.read_text())
    except ValidationError as e:
        raise DataError(f"{path} is not a valid {DATASET_FILE}: {e.errors()[0]['msg']}") from None
    for name in TABLES:
        if not (root / name).is_file():
            raise DataError(f"{root / name} is missing")
        if checksums and file_sha256(root / name) != info.files.get(name):
            raise DataError(f"{root / name} has changed since the data set was built")
    train, val = _filepaths(root / "train.csv"), _filepaths(root / "val.csv")
    if (len(train), len(val)) != (info.train.images, info.val.images):
        raise DataError(f"{root}: train/val row counts disagree with {DATASET_FILE}")
    every = sorted(_filepaths(root / "captions.csv"))
    if len(every) != info.images or sorted(train + val) != every:
        raise DataError(f"{root}: captions.csv is not exactly train.csv + val.csv")
    missing = [rel for rel in every if not (root / rel).is_file()]
    if missing:
        raise DataError(f"{root}: {len(missing)} images are missing, e.g. {missing[0]}")
    if checksums and images_digest(root, every) != info.images_sha256:
        raise DataError(f"{root}: images have changed since the data set was built")
    return info
