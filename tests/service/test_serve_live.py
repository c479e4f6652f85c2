"""The service follows a live collection: a delta version is opened by difference (the base in memory is
reused, not read or hashed again), ids keep their meaning, and under concurrent queries and reloads every
answer comes from one whole version."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient

from indexer.core.bundle.items import Item
from indexer.core.bundle.read import open_bundle_dir, read_current
from indexer.index.segments import SegmentContents, publish_version
from service.app import create_app
from service.state import ServiceState
from tests.conftest import make_colour_dataset
from tests.service.conftest import build_bundle, settings_for


def _unit(rng: np.random.Generator, n: int, dim: int = 32) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _bundles(tmp_path: Path, model: Path) -> Path:
    bundles = tmp_path / "bundles"
    build_bundle(bundles, model, make_colour_dataset(tmp_path / "data"))  # 8 images (ids 0-7), 8 texts
    return bundles


def test_a_delta_is_loaded_by_difference_and_ids_keep_their_meaning(tmp_path, tiny_model_dir, hashed):
    bundles = _bundles(tmp_path, tiny_model_dir)
    state = ServiceState(settings_for(bundles))
    assert state.reload().changed
    first = state.current
    writer = open_bundle_dir(bundles / read_current(bundles), mmap=True)
    new_row = Item(id=100, kind="image", path=str(tmp_path / "data" / "images" / "new.png"), text="new")
    delta = SegmentContents(frozenset({3, 100}), [new_row], _unit(np.random.default_rng(0), 1))
    publish_version(bundles, writer, delta=delta).close()
    writer.close()

    hashed.clear()
    assert state.reload().changed
    snap = state.current
    assert not [p for p in hashed if p.suffix in (".faiss", ".safetensors") and "segments" not in p.parts]
    assert snap.bundle.layers[0] is first.bundle.layers[0], "the verified base is reused from memory"
    assert snap.encoder is first.encoder
    assert snap.collection_root == first.collection_root
    with state.lease() as s:
        assert s.bundle.items.get(3) is None and s.bundle.items.get(100) == new_row
        assert s.bundle.items.get(2).path.endswith("blue.png"), "an untouched id means what it meant"
        assert s.bundle.count("images") == 8
    state.close()


def test_every_answer_comes_from_one_whole_version(tmp_path, tiny_model_dir):
    """Queries run while deltas (each deleting one image and adding two) are published and polled in."""
    bundles = _bundles(tmp_path, tiny_model_dir)
    live: dict[str, set[int]] = {}
    writer = open_bundle_dir(bundles / read_current(bundles), mmap=True)
    live[writer.version] = {it.id for it in writer.items.all("image")}
    rng = np.random.default_rng(1)
    stop = threading.Event()
    answers: list[tuple[str, list[int]]] = []

    def query(c: TestClient) -> None:
        while not stop.is_set():
            r = c.post("/v1/search/text", json={"query": "a square", "k": 100})
            assert r.status_code == 200, r.text
            body = r.json()
            answers.append((body["bundle"], [hit["id"] for hit in body["results"]]))

    with (
        TestClient(create_app(settings_for(bundles, reload_poll_s=0.02))) as c,
        ThreadPoolExecutor(3) as pool,
    ):
        futures = [pool.submit(query, c) for _ in range(3)]
        next_id = 100
        for step in range(12):
            ids = sorted(live[writer.version])
            gone = ids[step % len(ids)]
            rows = [Item(id=next_id + j, kind="image", path=f"/x/{next_id + j}.png") for j in range(2)]
            delta = SegmentContents(frozenset({gone, next_id, next_id + 1}), rows, _unit(rng, 2))
            new = publish_version(bundles, writer, delta=delta)
            writer.close()
            writer = new
            live[writer.version] = (set(ids) - {gone}) | {next_id, next_id + 1}
            next_id += 2
            threading.Event().wait(0.08)
        threading.Event().wait(0.3)
        stop.set()
        for f in futures:
            f.result()
    writer.close()
    seen = {version for version, _ in answers}
    assert len(seen) >= 3, f"reloads happened while querying ({len(answers)} answers, {len(seen)} versions)"
    for version, ids in answers:
        assert set(ids) == live[version], "exactly that version's items, nothing of another"
        assert len(ids) == len(set(ids))
