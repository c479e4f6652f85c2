"""Data readers: every supported source kind yields the same records; bad sources say what they found."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image

from indexer.core.images import IMAGE_EXTENSIONS
from indexer.data.sources import DataError, Record, SourceSpec, iter_folder, read_records


def _png(colour=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), colour).save(buf, format="PNG")
    return buf.getvalue()


def test_csv_relative_paths_and_grouped_captions(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "b.png").write_bytes(_png((0, 0, 255)))
    (tmp_path / "d.csv").write_text("filepath,caption\na.png,red one\nb.png,blue\na.png,red two\n")
    recs = read_records(SourceSpec(str(tmp_path / "d.csv")))
    assert [r.path for r in recs] == [tmp_path / "a.png", tmp_path / "b.png"]
    assert recs[0].captions == ("red one", "red two")
    assert recs[0].image_source() == tmp_path / "a.png"


def test_tsv_and_title_column(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    (tmp_path / "d.tsv").write_text("filepath\ttitle\na.png\ta title\n")
    assert read_records(SourceSpec(str(tmp_path / "d.tsv")))[0].captions == ("a title",)


def test_wrong_columns_list_what_was_found(tmp_path):
    (tmp_path / "d.csv").write_text("img,text_en\na.png,x\n")
    with pytest.raises(DataError, match=r"columns found: img, text_en"):
        read_records(SourceSpec(str(tmp_path / "d.csv")))
    with pytest.raises(DataError, match="no caption column 'cap'"):
        read_records(SourceSpec(str(tmp_path / "d.csv"), image_column="img", caption_column="cap"))


def test_jsonl_with_caption_lists(tmp_path):
    (tmp_path / "a.png").write_bytes(_png())
    lines = [{"image": "a.png", "captions": ["one", "two"]}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert read_records(SourceSpec(str(tmp_path / "d.jsonl")))[0].captions == ("one", "two")
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:1"):
        read_records(SourceSpec(str(tmp_path / "bad.jsonl")))


def test_folder_with_txt_captions_skips_hidden_and_non_images(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "x.jpg").write_bytes(_png())
    (tmp_path / "sub" / "x.txt").write_text("first\n\nsecond\n")
    (tmp_path / "y.png").write_bytes(_png())
    (tmp_path / ".hidden.png").write_bytes(_png())
    (tmp_path / "notes.md").write_text("hi")
    recs = read_records(SourceSpec(str(tmp_path)))
    assert [r.path.name for r in recs] == ["x.jpg", "y.png"]
    assert recs[0].captions == ("first", "second") and recs[1].captions == ()


def _folder_by_rglob(root) -> list[Record]:
    """The reference: `sorted(rglob)` with a `stat` per file, as `iter_folder` was first written."""
    root = root.resolve()
    out = []
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if p.is_file():
            cap = p.with_suffix(".txt")
            lines = cap.read_text().splitlines() if cap.is_file() else []
            out.append(Record(key=str(p), captions=tuple(x.strip() for x in lines if x.strip()), path=p))
    return out


def test_folder_walk_matches_rglob_order_and_rules(tmp_path):
    root = tmp_path / "c"
    for rel in ("a/b.png", "a-c.png", "a.b.JPG", "A.png", "z/y/x.webp", ".h/in.png", "a/.in.png", "e.png."):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(_png())
    (root / "a.b.txt").write_text("dotted stem\n")
    (root / "a" / "b.txt").write_text("nested\n")
    (root / "dir.png").mkdir()  # a folder with an image name is not an image
    (root / "z" / "y" / "x.txt").mkdir()  # nor is a folder a caption
    (root / "link.png").symlink_to(root / "A.png")  # a symlink to a file is a file
    (root / "linked").symlink_to(root / "a")  # a symlinked folder is not entered
    (root / "dangling.png").symlink_to(root / "missing.png")
    (root / "loop.png").symlink_to(root / "loop.png")
    got = list(iter_folder(root))
    assert got == _folder_by_rglob(root)
    assert [r.path.relative_to(root.resolve()).as_posix() for r in got] == [
        "A.png",
        "a/b.png",
        "a-c.png",
        "a.b.JPG",
        "link.png",
        "z/y/x.webp",
    ]
    assert got[1].captions == ("nested",) and got[3].captions == ("dotted stem",)


def _shard(path, items):
    with tarfile.open(path, "w") as tar:
        for name, data in items:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_like_img2dataset(tmp_path):
    _shard(tmp_path / "00000.tar", [("000.jpg", _png()), ("000.txt", b"a red thing"), ("000.json", b"{}")])
    _shard(
        tmp_path / "00001.tar",
        [("001.png", _png()), ("001.json", json.dumps({"caption": "json cap"}).encode())],
    )
    recs = read_records(SourceSpec(str(tmp_path / "{00000..00001}.tar")))
    assert [r.captions for r in recs] == [("a red thing",), ("json cap",)]
    assert recs[0].image_source() == _png()
    assert len(read_records(SourceSpec(str(tmp_path)))) == 2
    with pytest.raises(DataError, match="not found"):
        read_records(SourceSpec(str(tmp_path / "{00000..00005}.tar")))


def test_unknown_and_missing_sources(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_records(SourceSpec(str(tmp_path / "nope.csv")))
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="unknown source kind"):
        read_records(SourceSpec(str(tmp_path / "x.parquet")))
