"""Bad inputs and damaged state: skipped files with reasons, a rebuilt cache, the lock."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from indexer.core.bundle.layout import SKIPPED
from indexer.core.bundle.read import open_bundle
from indexer.index.cache import CacheCorrupt, EmbeddingCache, cache_files
from indexer.index.lock import LockError, exclusive_lock, lock_path
from indexer.index.runner import IndexingError
from tests.conftest import run_cli
from tests.index.helpers import run_index


def _bad_files(folder: Path) -> dict[str, str]:
    """Write one file per failure kind; returns name -> expected skip code."""
    Image.new("RGB", (40, 40), (9, 9, 9)).save(folder / "ok_but_ppm.png", format="PPM")
    good = folder / "img00.png"
    (folder / "truncated.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (folder / "garbage.jpg").write_bytes(b"this is not an image at all" * 10)
    Image.new("L", (3000, 3000)).save(folder / "huge.png")  # 9 Mpx, over the cap set below
    return {
        "ok_but_ppm.png": "unsupported_format",
        "truncated.png": "truncated",
        "garbage.jpg": "not_an_image",
        "huge.png": "too_many_pixels",
    }


def test_bad_images_are_skipped_with_reasons(tiny_model_dir, folder, tmp_path):
    expected = _bad_files(folder)
    from indexer.data.sources import SourceSpec
    from indexer.index.embed import EmbedConfig
    from indexer.index.runner import ReindexConfig, reindex

    cfg = ReindexConfig(
        model_dir=tiny_model_dir,
        source=SourceSpec(str(folder)),
        bundles_dir=tmp_path / "b",
        embed=EmbedConfig(batch_size=3, workers=1, max_pixels=4_000_000),
    )
    res = reindex(cfg)
    assert res.images == 6 and res.skipped == 4
    b = open_bundle(tmp_path / "b")
    rows = [json.loads(line) for line in (b.root / SKIPPED).read_text().splitlines()]
    got = {Path(r["path"]).name: r["reason"] for r in rows}
    assert got == expected
    assert all(r["message"] for r in rows)
    b.close()


def test_missing_file_listed_in_a_csv_is_skipped(tiny_model_dir, folder, tmp_path):
    csv = tmp_path / "list.csv"
    csv.write_text("filepath,caption\nphotos/img00.png,zero\nphotos/gone.png,gone\nphotos/img01.png,one\n")
    res = run_index(tiny_model_dir, csv, tmp_path / "b")
    assert (res.images, res.skipped) == (2, 1)
    rows = [json.loads(x) for x in (tmp_path / "b" / res.bundle / SKIPPED).read_text().splitlines()]
    assert [(Path(r["path"]).name, r["reason"]) for r in rows] == [("gone.png", "not_found")]


def test_run_fails_only_when_every_image_fails(tiny_model_dir, tmp_path):
    src = tmp_path / "bad"
    src.mkdir()
    (src / "a.jpg").write_bytes(b"nope")
    (src / "b.png").write_bytes(b"also nope")
    with pytest.raises(IndexingError, match="none of the 2 images"):
        run_index(tiny_model_dir, src, tmp_path / "b")
    assert not (tmp_path / "b" / "CURRENT").exists()


def test_corrupted_cache_is_rebuilt_not_mixed(tiny_model_dir, folder, tmp_path):
    bundles = tmp_path / "b"
    first = run_index(tiny_model_dir, folder, bundles)
    (cache,) = cache_files(bundles)
    cache.write_bytes(b"garbage" * 1000)
    res = run_index(tiny_model_dir, folder, bundles)
    assert res.embedded == 6, "every vector is recomputed after the cache was found damaged"
    b = open_bundle(bundles)
    assert b.image_index.ntotal == 6 and b.version != first.bundle
    b.close()


def test_cache_with_wrong_dim_or_bad_rows_is_rebuilt(tiny_model_dir, folder, tmp_path):
    bundles = tmp_path / "b"
    run_index(tiny_model_dir, folder, bundles)
    (path,) = cache_files(bundles)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE meta SET value = '7' WHERE key = 'dim'")
    assert run_index(tiny_model_dir, folder, bundles).embedded == 6
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE vectors SET vec = x'00' WHERE sha256 = (SELECT sha256 FROM vectors LIMIT 1)")
    assert run_index(tiny_model_dir, folder, bundles).embedded == 6


def test_cache_checks_on_open(tmp_path):
    c = EmbeddingCache(tmp_path, "f" * 64, 4)
    c.put("image", [("a" * 64, np.ones(4, np.float32) / 2, 1, 1)])
    c.close()
    again = EmbeddingCache(tmp_path, "f" * 64, 4)
    assert again.rebuilt is None and again.known("image", ["a" * 64]) == {"a" * 64}
    again.close()
    other_dim = EmbeddingCache(tmp_path, "f" * 64, 8)
    assert other_dim.rebuilt and "4-d" in other_dim.rebuilt
    assert other_dim.known("image", ["a" * 64]) == set()
    other_dim.close()


def test_cache_blocks_stream_vectors_in_order_and_refuse_damage(tmp_path):
    c = EmbeddingCache(tmp_path, "f" * 64, 4)
    rng = np.random.default_rng(0)
    vecs = {f"{i:064x}": rng.normal(size=4).astype(np.float32) for i in range(7)}
    c.put("image", [(sha, v, None, None) for sha, v in vecs.items()])
    order = [*reversed(vecs), f"{3:064x}"]  # any order, duplicates included
    blocks = list(c.blocks("image", order, block=3))
    assert [len(b) for b in blocks] == [3, 3, 2]
    np.testing.assert_array_equal(np.concatenate(blocks), np.stack([vecs[sha] for sha in order]))
    with pytest.raises(CacheCorrupt, match="lost the vector"):
        list(c.blocks("image", ["9" * 64]))
    c.put("image", [(f"{5:064x}", np.array([np.nan, 0, 0, 0], np.float32), None, None)])
    with pytest.raises(CacheCorrupt, match="damaged vector"):
        list(c.blocks("image", order))
    c.close()


@pytest.mark.slow
def test_second_indexer_exits_at_once_naming_the_lock(tiny_model_dir, folder, tmp_path):
    bundles = tmp_path / "b"
    with exclusive_lock(bundles):
        with pytest.raises(LockError, match=str(lock_path(bundles))):
            run_index(tiny_model_dir, folder, bundles)
        proc = run_cli(
            ["index", "--model", str(tiny_model_dir), "--images", str(folder), "--bundles", str(bundles)]
        )
    assert proc.returncode == 1
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "lock" in err[0] and str(os.getpid()) in err[0]
    assert not (bundles / "CURRENT").exists()


@pytest.mark.slow
def test_stale_lock_of_a_dead_process_is_taken_over(tiny_model_dir, folder, tmp_path):
    bundles = tmp_path / "b"
    code = (
        "import sys, os; from pathlib import Path; from indexer.index.lock import exclusive_lock\n"
        "with exclusive_lock(Path(sys.argv[1])):\n    os._exit(0)\n"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(bundles)], check=True, env={**os.environ, "PYTHONPATH": "."}
    )
    record = json.loads(lock_path(bundles).read_text())
    assert record["pid"] != os.getpid(), "the dead holder's record is still in the file"
    t0 = time.perf_counter()
    assert run_index(tiny_model_dir, folder, bundles).images == 6
    assert time.perf_counter() - t0 < 120
