"""Data readers: every supported source kind yields the same records; bad sources say what they found."""

from __future__ import annotations

import io
import json
import tarfile

import pytest
from PIL import Image

from indexer.data import DataError, SourceSpec, read_records


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
    assert recs[0].read_bytes() == (tmp_path / "a.png").read_bytes()


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
    assert recs[0].read_bytes() == _png()
    assert len(read_records(SourceSpec(str(tmp_path)))) == 2
    with pytest.raises(DataError, match="not found"):
        read_records(SourceSpec(str(tmp_path / "{00000..00005}.tar")))


def test_unknown_and_missing_sources(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_records(SourceSpec(str(tmp_path / "nope.csv")))
    (tmp_path / "x.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="unknown source kind"):
        read_records(SourceSpec(str(tmp_path / "x.parquet")))
