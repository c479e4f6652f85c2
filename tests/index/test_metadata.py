"""What the indexer records per image: file facts, EXIF capture time and camera, user fields from extra
CSV/JSONL columns and sidecar `.json`, and what `--exclude` leaves out; kept through re-runs and deltas."""

from __future__ import annotations

import csv
import json
import sqlite3
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from PIL import Image

from indexer.core.bundle.items import ITEMS_FORMAT
from indexer.core.bundle.read import open_bundle
from indexer.data.sources import SourceSpec, read_records
from tests.index.helpers import make_folder, make_image, run_index


def _exif_photo(path: Path, when: str, make: str, model: str, offset: str | None = None) -> Path:
    make_image(path, seed=hash(path.name) % 1000)
    img = Image.open(path)
    exif = Image.Exif()
    exif[271], exif[272] = make, model
    sub = exif.get_ifd(0x8769)
    sub[36867] = when
    if offset:
        sub[36881] = offset
    img.convert("RGB").save(path.with_suffix(".jpg"), exif=exif)
    path.unlink()
    return path.with_suffix(".jpg")


def _images(bundles: Path) -> dict[str, object]:
    b = open_bundle(bundles)
    try:
        return {Path(it.path).name: it for it in b.items.all("image")}
    finally:
        b.close()


def test_folder_images_carry_file_facts_exif_and_sidecar_fields(tiny_model_dir, tmp_path) -> None:
    photos = make_folder(tmp_path / "photos", 2)
    shot = _exif_photo(photos / "trip" / "beach.png", "2024:07:14 16:30:00", "Google", "Pixel 8", "+02:00")
    (photos / "trip" / "beach.json").write_text(
        json.dumps({"rating": 5, "tags": ["sea", "sun"], "in_album": True})
    )
    (photos / "img00.png.json").write_text(json.dumps({"album": "home", "place": {"city": "Lyon"}}))
    bundles = tmp_path / "bundles"
    run_index(tiny_model_dir, photos, bundles)
    items = _images(bundles)
    beach = items["beach.jpg"]
    assert beach.folder == str(shot.parent)
    assert beach.camera == "Google Pixel 8"
    assert beach.taken_at == datetime(2024, 7, 14, 14, 30, tzinfo=UTC).timestamp()  # 16:30 at +02:00
    assert (beach.width, beach.height, beach.size) == (48, 48, shot.stat().st_size)
    assert dict(beach.fields) == {"rating": 5, "tags": ("sea", "sun"), "in_album": 1}
    assert dict(items["img00.png"].fields) == {"album": "home", "place.city": "Lyon"}
    assert items["img01.png"].taken_at is None and items["img01.png"].camera is None
    b = open_bundle(bundles)
    try:
        conn = sqlite3.connect(b.root / "items.sqlite")
        assert conn.execute("PRAGMA user_version").fetchone()[0] == ITEMS_FORMAT
        flt = b.parse_filter(
            {"camera": {"eq": "Google Pixel 8"}, "tags": {"eq": "sun"}, "taken_at": {"gte": "2024-07-14"}}
        )
        assert b.matching("images", flt) == 1
    finally:
        b.close()


def test_extra_csv_and_jsonl_columns_are_typed_user_fields(tmp_path) -> None:
    for i in range(3):
        make_image(tmp_path / f"p{i}.png", seed=i)
    with open(tmp_path / "items.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption", "category", "price", "sku", "size"])
        w.writerows([["p0.png", "a", "shoes", "10", "001", "L"], ["p1.png", "b", "bags", "12.5", "A7", ""]])
        w.writerow(["p2.png", "c", "", "3", "9", ""])
    rows = {Path(r.key).name: dict(r.extra) for r in read_records(SourceSpec(str(tmp_path / "items.csv")))}
    # price: all numbers, one with decimals -> float; sku has a non-number -> text; `size` is built in
    assert rows == {
        "p0.png": {"category": "shoes", "price": 10.0, "sku": "001"},
        "p1.png": {"category": "bags", "price": 12.5, "sku": "A7"},
        "p2.png": {"price": 3.0, "sku": "9"},
    }
    lines = [{"filepath": "p0.png", "caption": "x", "stock": 3, "tags": ["a", "b"], "note": None}]
    (tmp_path / "items.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    rec = read_records(SourceSpec(str(tmp_path / "items.jsonl")))[0]
    assert dict(rec.extra) == {"stock": 3, "tags": ("a", "b")}


def test_exclude_leaves_out_matching_folders_and_files(tmp_path) -> None:
    photos = make_folder(tmp_path / "photos", 2, captions=False)
    make_image(photos / "node_modules" / "x.png", seed=9)
    make_image(photos / "a" / "cache" / "y.png", seed=8)
    make_image(photos / "a" / "keep.png", seed=7)
    make_image(photos / "a" / "skip.tmp.png", seed=6)
    spec = SourceSpec(str(photos), exclude=("node_modules", "a/cache", "*.tmp.png"))
    names = sorted(Path(r.key).relative_to(photos.resolve()).as_posix() for r in read_records(spec))
    assert names == ["a/keep.png", "img00.png", "img01.png"]


def test_metadata_survives_a_delta_and_a_rerun(tiny_model_dir, tmp_path) -> None:
    from indexer.index.live import LiveIndexer
    from indexer.index.runner import ReindexConfig

    photos = make_folder(tmp_path / "photos", 3)
    (photos / "img01.json").write_text(json.dumps({"rating": 2}))
    bundles = tmp_path / "bundles"
    run_index(tiny_model_dir, photos, bundles)
    cfg = ReindexConfig(model_dir=tiny_model_dir, source=SourceSpec(str(photos)), bundles_dir=bundles)
    live = LiveIndexer(cfg, open_bundle(bundles))
    try:
        (photos / "img01.json").write_text(json.dumps({"rating": 4}))  # only the sidecar changes
        from indexer.data.sources import folder_changes

        result = live.apply(folder_changes(photos, [photos / "img01.json"]))
        assert result is not None and result.updated == 0
    finally:
        live.close()
    assert dict(_images(bundles)["img01.png"].fields) == {"rating": 4}
    run_index(tiny_model_dir, photos, bundles)
    assert dict(_images(bundles)["img01.png"].fields) == {"rating": 4}
    assert np.isfinite(_images(bundles)["img02.png"].mtime)
