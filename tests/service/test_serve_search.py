"""Text and image search: ordering, targets, k/offset/min_score, image modes that must work."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient

from tests.service import helpers

N_IMAGES, N_TEXTS = 9, 8


def search_text(client: TestClient, **body: object) -> dict:  # type: ignore[type-arg]
    r = client.post("/v1/search/text", json={"query": "a red square", **body})
    assert r.status_code == 200, r.text
    assert r.headers["x-bundle-version"] == r.json()["bundle"]
    return r.json()  # type: ignore[no-any-return]


def test_text_to_images_sorted_with_image_urls(client: TestClient) -> None:
    body = search_text(client, k=5)
    hits = body["results"]
    scores = [h["score"] for h in hits]
    assert len(hits) == 5 and scores == sorted(scores, reverse=True)
    for hit in hits:
        assert hit["kind"] == "image" and 0 <= hit["id"] < N_IMAGES
        assert hit["image_url"] == f"/v1/items/{hit['id']}/image"
        assert hit["path"].endswith(".png")
    assert body["took_ms"] >= 0


def test_text_to_texts_returns_captions(client: TestClient) -> None:
    hits = search_text(client, k=3, target="texts")["results"]
    assert len(hits) == 3
    for hit in hits:
        assert hit["kind"] == "text" and hit["id"] >= N_IMAGES
        assert hit["text"].startswith("a ") and hit["image_url"] is None


def test_exact_caption_finds_itself_first(client: TestClient) -> None:
    hits = search_text(client, query="a blue square", k=1, target="texts")["results"]
    assert hits[0]["text"] == "a blue square"
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_k_beyond_the_index_returns_what_there_is(client: TestClient) -> None:
    hits = search_text(client, k=100)["results"]
    assert len(hits) == N_IMAGES
    assert all(h["id"] >= 0 for h in hits)
    assert len({h["id"] for h in hits}) == N_IMAGES


def test_offset_pages_through_the_ranking(client: TestClient) -> None:
    full = [h["id"] for h in search_text(client, k=9)["results"]]
    page = [h["id"] for h in search_text(client, k=3, offset=3)["results"]]
    assert page == full[3:6]
    tail = [h["id"] for h in search_text(client, k=5, offset=7)["results"]]
    assert tail == full[7:]


def test_min_score_filters_and_combines_with_offset(client: TestClient) -> None:
    full = search_text(client, k=9)["results"]
    cut = full[4]["score"]
    kept = search_text(client, k=9, min_score=cut)["results"]
    assert [h["id"] for h in kept] == [h["id"] for h in full if h["score"] >= cut]
    paged = search_text(client, k=2, offset=1, min_score=cut)["results"]
    assert [h["id"] for h in paged] == [h["id"] for h in kept][1:3]
    assert search_text(client, k=5, min_score=1.0)["results"] == []


def upload(client: TestClient, data: bytes, name: str = "q.png", **form: object) -> dict:  # type: ignore[type-arg]
    r = client.post(
        "/v1/search/image", files={"file": (name, data)}, data={k: str(v) for k, v in form.items()}
    )
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def test_image_to_images_finds_the_same_picture_first(client: TestClient) -> None:
    hits = upload(client, helpers.png((230, 20, 20)), k=3)["results"]
    assert hits[0]["path"].endswith(("red.png", "escape.png"))
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert all(h["kind"] == "image" for h in hits)


def test_image_to_texts(client: TestClient) -> None:
    hits = upload(client, helpers.png((20, 40, 230)), k=4, target="texts", offset=1)["results"]
    assert len(hits) == 4 and all(h["kind"] == "text" for h in hits)


@pytest.mark.parametrize(
    "make",
    [helpers.cmyk_jpeg, helpers.png_16bit, helpers.palette_with_transparency, helpers.animated_gif],
    ids=["cmyk", "16bit", "palette-transparency", "animated-gif"],
)
def test_unusual_image_modes_work(client: TestClient, make: Callable[[], bytes]) -> None:
    hits = upload(client, make(), k=2)["results"]
    assert len(hits) == 2
