"""Items, embeddings, info, health, metrics and the page: every read endpoint against the session bundle."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from indexer.core.bundle.items import ITEM_COLUMNS
from indexer.core.bundle.read import open_bundle
from indexer.core.encoder import Encoder
from service.schemas import ItemResponse
from tests.service import helpers


def test_item_metadata_for_image_and_text(client: TestClient, bundles_dir: Path) -> None:
    image = client.get("/v1/items/2").json()
    assert image["kind"] == "image" and image["path"].endswith("blue.png")
    assert image["text"] == "a blue square" and image["width"] == 40
    assert image["image_url"] == "/v1/items/2/image"
    text = client.get("/v1/items/11").json()
    assert text["kind"] == "text" and text["image_url"] is None and text["text"] == "a blue square"
    assert image["bundle"] == open_bundle(bundles_dir).version


def test_item_response_carries_every_item_column() -> None:
    # The API's item shape is written out for its documentation; it must not drift from the item store.
    assert set(ItemResponse.model_fields) == set(ITEM_COLUMNS) | {"bundle", "image_url", "fields"}


def test_item_image_serves_the_stored_file(client: TestClient, collection: Path) -> None:
    r = client.get("/v1/items/2/image")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == (collection.parent / "images" / "blue.png").read_bytes()
    assert r.headers["x-bundle-version"]


def test_item_image_refuses_a_symlink_leading_outside(client: TestClient) -> None:
    escape = client.get("/v1/items/8").json()
    assert escape["path"].endswith("escape.png")
    r = client.get("/v1/items/8/image")
    assert r.status_code == 403 and r.json()["error"]["code"] == "outside_collection"


def test_item_image_replaced_on_disk_is_refused(tmp_path: Path, tiny_model_dir: Path) -> None:
    """A file replaced in place after indexing (here by a text file) is not served as the item's image."""
    from service.app import create_app
    from tests.index.helpers import make_folder, run_index
    from tests.service.conftest import settings_for

    src = make_folder(tmp_path / "photos", 3, captions=False)
    run_index(tiny_model_dir, src, tmp_path / "b")
    with TestClient(create_app(settings_for(tmp_path / "b"))) as c:
        ids = {Path(c.get(f"/v1/items/{i}").json()["path"]).name: i for i in range(3)}
        assert c.get(f"/v1/items/{ids['img00.png']}/image").status_code == 200
        (src / "img00.png").write_text("not an image any more")
        r = c.get(f"/v1/items/{ids['img00.png']}/image")
        assert r.status_code == 409 and r.json()["error"]["code"] == "changed_on_disk", r.text
        same_size = src / "img01.png"
        st = same_size.stat()
        os.utime(same_size, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # edited in place
        assert c.get(f"/v1/items/{ids['img01.png']}/image").json()["error"]["code"] == "changed_on_disk"
        ok = c.get(f"/v1/items/{ids['img02.png']}/image")
        assert ok.status_code == 200 and ok.content == (src / "img02.png").read_bytes()


def test_text_item_has_no_image(client: TestClient) -> None:
    r = client.get("/v1/items/10/image")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_an_image"


def test_embed_text_matches_the_encoder(client: TestClient, tiny_model_dir: Path) -> None:
    r = client.post(
        "/v1/embed/text", json={"texts": ["a red square", "a much longer sentence about a green square"]}
    )
    assert r.status_code == 200, r.text
    body = r.json()
    emb = np.array(body["embeddings"], dtype=np.float32)
    assert emb.shape == (2, body["dim"]) == (2, 32)
    want = Encoder.from_dir(tiny_model_dir, device="cpu").encode_texts(
        ["a red square", "a much longer sentence about a green square"]
    )
    np.testing.assert_allclose(emb, want, atol=1e-5)
    assert r.headers["x-bundle-version"] == body["bundle"]


def test_embed_image_matches_the_encoder(client: TestClient, tiny_model_dir: Path) -> None:
    r = client.post("/v1/embed/image", files={"file": ("r.png", helpers.png((20, 200, 40)))})
    assert r.status_code == 200, r.text
    emb = np.array(r.json()["embeddings"], dtype=np.float32)
    want = Encoder.from_dir(tiny_model_dir, device="cpu").encode_images(
        [Image.new("RGB", (40, 40), (20, 200, 40))]
    )
    np.testing.assert_allclose(emb, want, atol=1e-5)
    assert np.linalg.norm(emb[0]) == pytest.approx(1.0, abs=1e-5)


def test_info(client: TestClient, bundles_dir: Path) -> None:
    info = client.get("/v1/info").json()
    bundle = open_bundle(bundles_dir)
    assert info["bundle"] == bundle.version
    assert info["model"]["fingerprint"] == bundle.manifest.model.fingerprint
    assert info["model"]["embed_dim"] == 32
    assert info["images"]["count"] == 9 and info["texts"]["count"] == 8
    assert info["device"] == "cpu" and info["max_k"] == 100


def test_health_and_ready(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok", "bundle": None}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert ready.headers["x-bundle-version"] == ready.json()["bundle"]


def test_metrics_count_requests_stages_batches_and_bundle(client: TestClient) -> None:
    client.post("/v1/search/text", json={"query": "a red square"})
    client.post("/v1/search/image", files={"file": ("r.png", helpers.png())})
    client.post("/v1/search/text", json={"query": ""})
    text = client.get("/metrics").text
    assert 'clipsearch_requests_total{method="POST",route="/v1/search/text",status="200"}' in text
    assert 'clipsearch_requests_total{method="POST",route="/v1/search/text",status="422"}' in text
    for stage, kind in (("encode", "text"), ("search", "text"), ("decode", "image"), ("encode", "image")):
        assert f'clipsearch_stage_seconds_count{{kind="{kind}",stage="{stage}"}}' in text
    assert 'clipsearch_batch_size_count{kind="text"}' in text
    version = client.get("/readyz").json()["bundle"]
    assert f'clipsearch_bundle_info{{model="model",version="{version}"}} 1.0' in text or version in text


def test_page_and_static(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    static = client.get("/static/index.html")
    assert static.status_code == 200 and static.text == page.text


def test_openapi_lists_every_endpoint(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/healthz",
        "/readyz",
        "/v1/info",
        "/metrics",
        "/v1/search/text",
        "/v1/search/image",
        "/v1/embed/text",
        "/v1/embed/image",
        "/v1/items/{item_id}",
        "/v1/items/{item_id}/image",
        "/v1/admin/reload",
    ):
        assert path in paths
    assert "multipart/form-data" in paths["/v1/search/image"]["post"]["requestBody"]["content"]


def test_docs_page(client: TestClient) -> None:
    r = client.get("/docs")
    assert r.status_code == 200 and "swagger" in r.text.lower()


def test_unicode_and_emoji_queries(client: TestClient) -> None:
    for query in ("🐶 on a skateboard", "一只红色的正方形", "café au lait"):
        r = client.post("/v1/search/text", json={"query": query, "k": 2})
        assert r.status_code == 200 and len(r.json()["results"]) == 2


def test_collection_root_from_manifest_stats(tmp_path: Path, tiny_model_dir: Path, collection: Path) -> None:
    """A root the indexer records in the manifest wins over the images' common folder."""
    from indexer.core.bundle.read import open_bundle_dir
    from service.state import collection_root
    from tests.service.conftest import build_bundle

    narrow = collection.parent / "images"
    out = build_bundle(tmp_path, tiny_model_dir, collection, stats={"collection_root": str(narrow / "sub")})
    bundle = open_bundle_dir(out)
    try:
        assert collection_root(bundle) == (narrow / "sub").resolve()
    finally:
        bundle.close()
    derived = open_bundle_dir(build_bundle(tmp_path / "b", tiny_model_dir, collection))
    try:
        assert collection_root(derived) == narrow.resolve()
    finally:
        derived.close()
