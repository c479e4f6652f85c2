"""Every bad input the issue lists gets a 4xx with `{"error": {"code", "message"}}`, never a 5xx."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service import helpers
from tests.service.conftest import settings_for


def error(r: httpx.Response, status: int, code: str | None = None) -> str:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"code", "message"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return str(err["message"])


def search(client: TestClient, **body: object) -> httpx.Response:
    return client.post("/v1/search/text", json={"query": "a red square", **body})


def upload(client: TestClient, data: bytes, name: str = "q.png", **form: object) -> httpx.Response:
    return client.post(
        "/v1/search/image", files={"file": (name, data)}, data={k: str(v) for k, v in form.items()}
    )


def test_empty_query(client: TestClient) -> None:
    error(search(client, query=""), 422, "empty_query")


def test_whitespace_query(client: TestClient) -> None:
    error(search(client, query=" \t\n "), 422, "empty_query")


@pytest.mark.parametrize("query", ["\x00", "\x00\x00\x00", " \x00\t\u200b\ufeff "])
def test_query_of_only_invisible_characters_is_empty(client: TestClient, query: str) -> None:
    error(search(client, query=query), 422, "empty_query")
    error(client.post("/v1/embed/text", json={"texts": ["ok", query]}), 422, "empty_query")


def test_query_over_the_length_limit(client: TestClient) -> None:
    assert "1,000" in error(search(client, query="a" * 1001), 422, "query_too_long")


def test_query_at_the_length_limit_works(client: TestClient) -> None:
    assert search(client, query="a" * 1000).status_code == 200


def test_missing_query(client: TestClient) -> None:
    r = client.post("/v1/search/text", json={"k": 3})
    assert "query" in error(r, 422, "missing_field")


@pytest.mark.parametrize("k", [0, -1, 101])
def test_k_outside_bounds(client: TestClient, k: int) -> None:
    assert "k" in error(search(client, k=k), 422, "invalid_request")


def test_k_not_an_integer(client: TestClient) -> None:
    error(search(client, k="ten"), 422, "invalid_request")


@pytest.mark.parametrize(("field", "value"), [("k", True), ("k", "3"), ("k", 3.0), ("offset", False)])
def test_json_integers_are_strict(client: TestClient, field: str, value: object) -> None:
    """`"k": true` is not k = 1: a JSON body's integers must be JSON integers."""
    assert field in error(search(client, **{field: value}), 422, "invalid_request")


def test_strict_json_still_takes_what_the_page_and_client_send(client: TestClient) -> None:
    r = search(client, k=3, offset=1, min_score=0, target="texts")
    assert r.status_code == 200, r.text
    assert search(client, min_score=True).status_code == 422


def test_negative_offset(client: TestClient) -> None:
    assert "offset" in error(search(client, offset=-1), 422, "invalid_request")


def test_unknown_target(client: TestClient) -> None:
    assert "target" in error(search(client, target="videos"), 422, "invalid_request")


def test_min_score_outside_cosine_range(client: TestClient) -> None:
    error(search(client, min_score=2), 422, "invalid_request")


def test_unknown_field(client: TestClient) -> None:
    error(search(client, limit=3), 422, "invalid_request")


def test_malformed_json(client: TestClient) -> None:
    r = client.post(
        "/v1/search/text", content=b'{"query": "red', headers={"content-type": "application/json"}
    )
    error(r, 422, "malformed_json")


def test_json_that_is_not_an_object(client: TestClient) -> None:
    r = client.post("/v1/search/text", json=["a red square"])
    error(r, 422, "invalid_request")


def test_wrong_content_type_for_text_search(client: TestClient) -> None:
    r = client.post("/v1/search/text", content=b"a red square", headers={"content-type": "text/plain"})
    error(r, 415, "unsupported_media_type")
    error(client.post("/v1/search/text", data={"query": "red"}), 415, "unsupported_media_type")


def test_wrong_content_type_for_image_search(client: TestClient) -> None:
    r = client.post("/v1/search/image", json={"file": "red.png"})
    error(r, 415, "unsupported_media_type")


def test_no_file(client: TestClient) -> None:
    r = client.post("/v1/search/image", data={"k": "3"}, files={"other": ("x.txt", b"hello")})
    error(r, 422, "missing_file")


def test_multipart_with_only_fields(client: TestClient) -> None:
    r = client.post(
        "/v1/search/image",
        content=b'--b\r\nContent-Disposition: form-data; name="k"\r\n\r\n3\r\n--b--\r\n',
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    error(r, 422, "missing_file")


def test_two_files(client: TestClient) -> None:
    files = [("file", ("a.png", helpers.png())), ("file", ("b.png", helpers.png((0, 0, 255))))]
    error(client.post("/v1/search/image", files=files), 422, "too_many_files")


def test_bad_form_k(client: TestClient) -> None:
    error(upload(client, helpers.png(), k=0), 422, "invalid_request")
    error(upload(client, helpers.png(), k="x"), 422, "invalid_request")
    error(upload(client, helpers.png(), offset=-2), 422, "invalid_request")


def test_random_bytes(client: TestClient) -> None:
    error(upload(client, os.urandom(4096), name="noise.png"), 400, "not_an_image")


def test_empty_file(client: TestClient) -> None:
    error(upload(client, b""), 400, "not_an_image")


def test_truncated_image(client: TestClient) -> None:
    error(upload(client, helpers.truncated_png()), 400, "truncated")


def test_decompression_bomb_rejected_from_header(client: TestClient) -> None:
    data = helpers.bomb_png()
    assert len(data) < 2000
    assert "pixels" in error(upload(client, data), 413, "too_many_pixels")


def test_format_outside_allow_list(client: TestClient) -> None:
    assert "ICO" in error(upload(client, helpers.ico(), name="x.ico"), 415, "unsupported_format")


def test_unknown_item_id(client: TestClient) -> None:
    error(client.get("/v1/items/12345"), 404, "item_not_found")
    error(client.get("/v1/items/12345/image"), 404, "item_not_found")


def test_item_id_not_a_number(client: TestClient) -> None:
    error(client.get("/v1/items/abc"), 422, "invalid_request")


def test_huge_item_id(client: TestClient) -> None:
    error(client.get(f"/v1/items/{2**70}"), 404, "item_not_found")


def test_unknown_route_and_method(client: TestClient) -> None:
    error(client.get("/v1/nothing"), 404, "not_found")
    error(client.get("/v1/search/text"), 405, "method_not_allowed")


def test_embed_bad_inputs(client: TestClient) -> None:
    error(client.post("/v1/embed/text", json={"texts": []}), 422, "invalid_request")
    error(client.post("/v1/embed/text", json={"texts": ["ok", " "]}), 422, "empty_query")
    error(client.post("/v1/embed/text", json={"texts": ["x"] * 65}), 422, "too_many_texts")
    error(client.post("/v1/embed/image", files={"file": ("n.png", b"nope")}), 400, "not_an_image")
    r = client.post("/v1/embed/image", files={"file": ("r.png", helpers.png())}, data={"offset": "-1"})
    assert "offset" in error(r, 422, "invalid_request"), "embedding takes no search options"


LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def small_body_client(bundles_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(settings_for(bundles_dir, max_body_bytes=LIMIT))) as c:
        yield c


def test_multipart_upload_over_limit_streamed(small_body_client: TestClient) -> None:
    def body() -> Iterator[bytes]:
        yield b'--x\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        for _ in range(LIMIT // 4096 + 4):
            yield b"\0" * 4096

    headers = {"content-type": "multipart/form-data; boundary=x"}
    request = small_body_client.build_request("POST", "/v1/search/image", content=body(), headers=headers)
    error(small_body_client.send(request), 413, "body_too_large")


def test_body_over_limit_with_content_length(small_body_client: TestClient) -> None:
    r = upload(small_body_client, os.urandom(LIMIT + 1))
    assert "65,536" in error(r, 413, "body_too_large")


def test_body_over_limit_streamed_without_content_length(small_body_client: TestClient) -> None:
    chunk = b"x" * 8192

    def body() -> Iterator[bytes]:
        for _ in range(LIMIT // len(chunk) + 4):
            yield chunk

    headers = {"content-type": "application/json"}
    request = small_body_client.build_request("POST", "/v1/search/text", content=body(), headers=headers)
    assert "content-length" not in request.headers
    error(small_body_client.send(request), 413, "body_too_large")


def test_json_body_over_limit(small_body_client: TestClient) -> None:
    error(
        small_body_client.post("/v1/search/text", json={"query": "x" * (LIMIT + 10)}), 413, "body_too_large"
    )
