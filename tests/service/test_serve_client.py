"""`Client` and `AsyncClient` against a real uvicorn on a free loopback port, every endpoint."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.app import create_app
from service.client import ApiClientError, AsyncClient, Client
from tests.service import helpers
from tests.service.conftest import ADMIN_KEY, serving, settings_for

API_KEY = "client-key"


@pytest.fixture(scope="module")
def base_url(bundles_dir: Path) -> Iterator[str]:
    with serving(create_app(settings_for(bundles_dir, api_key=API_KEY, max_body_bytes=64 * 1024))) as url:
        yield url


def test_sync_client_covers_every_endpoint(base_url: str, collection: Path) -> None:
    with Client(base_url, api_key=API_KEY, admin_key=ADMIN_KEY) as cs:
        assert cs.healthz().status == "ok"
        version = cs.readyz().bundle
        assert version and cs.info().bundle == version
        hits = cs.search_text("a red square", k=3).results
        assert len(hits) == 3 and hits[0].kind == "image"
        texts = cs.search_text("a red square", k=2, target="texts", offset=1, min_score=-1).results
        assert len(texts) == 2 and texts[0].kind == "text"
        red = collection.parent / "images" / "red.png"
        same = cs.search_image(red, k=1).results[0]
        assert same.score == pytest.approx(1.0, abs=1e-4)
        assert cs.search_image(red.read_bytes(), k=2, target="texts").results[0].kind == "text"
        with open(red, "rb") as f:
            assert cs.embed_image(f).dim == 32
        assert len(cs.embed_texts(["a", "b"]).embeddings) == 2
        assert cs.item(same.id).path == same.path
        assert cs.item_image(2) == (collection.parent / "images" / "blue.png").read_bytes()
        assert cs.reload().changed is False
        assert "clipsearch_requests_total" in cs.metrics()


def test_sync_client_raises_api_errors(base_url: str) -> None:
    with Client(base_url, api_key=API_KEY) as cs:
        with pytest.raises(ApiClientError) as e:
            cs.search_text("   ")
        assert e.value.status == 422 and e.value.code == "empty_query"
        with pytest.raises(ApiClientError) as e:
            cs.item(99999)
        assert e.value.status == 404
        with pytest.raises(ApiClientError) as e:
            cs.reload()  # no admin key given
        assert e.value.status == 401
    with Client(base_url) as anonymous, pytest.raises(ApiClientError) as e:
        anonymous.info()
    assert e.value.code == "unauthorized"


def test_async_client_covers_every_endpoint(base_url: str) -> None:
    async def go() -> None:
        async with AsyncClient(base_url, api_key=API_KEY, admin_key=ADMIN_KEY) as cs:
            assert (await cs.healthz()).status == "ok"
            assert (await cs.readyz()).status == "ready"
            info = await cs.info()
            results = await asyncio.gather(*(cs.search_text(f"a square {i}", k=2) for i in range(8)))
            assert all(r.bundle == info.bundle and len(r.results) == 2 for r in results)
            hit = (await cs.search_image(helpers.png(), k=1, target="images")).results[0]
            mixed = await cs.search([], image=helpers.png(), k=1)  # the multipart POST /v1/search
            assert mixed.results[0].id == hit.id and mixed.results[0].score == pytest.approx(
                hit.score, abs=1e-5
            )
            info_fields = (await cs.info()).user_fields
            assert info_fields == []  # this bundle has no user fields
            assert (await cs.item(hit.id)).id == hit.id
            assert (await cs.item_image(0)).startswith(b"\x89PNG")
            assert len((await cs.embed_texts(["x"])).embeddings[0]) == 32
            assert (await cs.embed_image(helpers.png())).dim == 32
            assert (await cs.reload()).bundle == info.bundle
            assert "clipsearch_batch_size" in await cs.metrics()

    asyncio.run(go())


def test_streamed_upload_over_the_limit_is_413_on_a_real_server(base_url: str) -> None:
    """Chunked transfer (no Content-Length) is cut off once it passes the limit."""

    def chunks() -> Iterator[bytes]:
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        for _ in range(64):
            yield b"\0" * 4096

    headers = {"Authorization": f"Bearer {API_KEY}", "content-type": "multipart/form-data; boundary=x"}
    with httpx.Client(base_url=base_url) as http:
        request = http.build_request("POST", "/v1/search/image", content=chunks(), headers=headers)
        assert "content-length" not in request.headers
        r = http.send(request)
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
