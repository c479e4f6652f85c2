"""Service fixtures: one bundle of the colour images, published once per session and shared by every test."""

from __future__ import annotations

import contextlib
import csv
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import faiss
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.testclient import TestClient

from indexer.core.bundle.items import Item
from indexer.core.bundle.manifest import IndexSpec
from indexer.core.encoder import Encoder
from indexer.core.images import load_image
from indexer.index.publish import BundleContents, publish
from service.app import create_app
from service.server import uvicorn_config
from service.settings import ServiceSettings
from tests.conftest import make_colour_dataset

ADMIN_KEY = "admin-secret-key"


def _id_index(emb: np.ndarray, ids: np.ndarray) -> faiss.Index:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(emb.shape[1]))
    index.add_with_ids(emb, ids.astype(np.int64))
    return index


def build_bundle(
    bundles_dir: Path,
    model_dir: Path,
    csv_path: Path,
    extra_images: Sequence[Path] = (),
    stats: dict[str, object] | None = None,
) -> Path:
    """Embed a colour data set (and `extra_images`, uncaptioned) and publish it as a bundle.

    Image ids are 0..n-1, text ids n..; each image's caption is also its `text`.
    """
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    paths = [csv_path.parent / r["filepath"] for r in rows] + list(extra_images)
    captions = [r["caption"] for r in rows] + [None] * len(extra_images)
    encoder = Encoder.from_dir(model_dir, device="cpu")
    images = [load_image(p) for p in paths]
    image_emb = encoder.encode_images(images)
    texts = [c for c in captions if c]
    text_emb = encoder.encode_texts(texts)
    n = len(paths)
    items = [
        Item(
            id=i,
            kind="image",
            path=os.path.abspath(p),
            text=c,
            size=p.stat().st_size,
            mtime=p.stat().st_mtime,
            width=im.width,
            height=im.height,
        )
        for i, (p, c, im) in enumerate(zip(paths, captions, images, strict=True))
    ]
    items += [
        Item(id=n + j, kind="text", text=t, path=os.path.abspath(paths[j])) for j, t in enumerate(texts)
    ]
    model = encoder.info
    contents = BundleContents(
        model_dir=model_dir,
        model=model,
        image_index=_id_index(image_emb, np.arange(n)),
        text_index=_id_index(text_emb, np.arange(n, n + len(texts))),
        images=IndexSpec(file="images.faiss", count=n),
        texts=IndexSpec(file="texts.faiss", count=len(texts)),
        items=items,
        stats=stats,
    )
    return publish(bundles_dir, contents)


@pytest.fixture(scope="session")
def collection(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The colour data set plus `images/escape.png`, a symlink to a picture outside the collection."""
    root = tmp_path_factory.mktemp("collection")
    csv_path = make_colour_dataset(root)
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    outside.write_bytes((root / "images" / "red.png").read_bytes())
    (root / "images" / "escape.png").symlink_to(outside)
    return csv_path


@pytest.fixture(scope="session")
def bundles_dir(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, collection: Path) -> Path:
    """A bundles dir with one published bundle: 9 images (8 colours + the escaping symlink), 8 texts."""
    out = tmp_path_factory.mktemp("bundles")
    build_bundle(out, tiny_model_dir, collection, extra_images=[collection.parent / "images" / "escape.png"])
    return out


def settings_for(bundles: Path, **overrides: object) -> ServiceSettings:
    base: dict[str, object] = {
        "bundles": bundles,
        "device": "cpu",
        "admin_key": ADMIN_KEY,
        "reload_poll_s": 0,
        "batch_max_wait_ms": 1,
    }
    return ServiceSettings(**{**base, **overrides})  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def client(bundles_dir: Path) -> Iterator[TestClient]:
    """A running app over the session bundle (admin key set, no API key, no polling)."""
    with TestClient(create_app(settings_for(bundles_dir)), raise_server_exceptions=False) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serving(app: FastAPI, **overrides: object) -> Iterator[str]:
    """Run `app` under a real uvicorn, configured as `clipsearch serve` does (deadlines, connection cap),
    on a free loopback port in a thread; yields the base URL."""
    port = free_port()
    config = uvicorn_config(
        app, app.state.settings, host="127.0.0.1", port=port, log_level="warning", lifespan="on", **overrides
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)
