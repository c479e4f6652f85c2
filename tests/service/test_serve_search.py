"""Text and image search: ordering, targets, k/offset/min_score, image modes that must work."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from PIL import Image

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
    blue = helpers.png((20, 40, 230))
    full = upload(client, blue, k=5, target="texts")["results"]
    hits = upload(client, blue, k=4, target="texts", offset=1)["results"]
    assert len(hits) == 4 and all(h["kind"] == "text" for h in hits)
    assert [h["id"] for h in hits] == [h["id"] for h in full[1:5]]  # offset pages the same ranking
    assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in full[1:5]], abs=1e-5)


def _transparent_half_on_white() -> Image.Image:
    img = Image.new("RGB", (40, 40), (230, 20, 20))
    img.paste((255, 255, 255), (0, 0, 20, 40))  # the left half is the transparent palette entry
    return img


# Each unusual upload and the plain RGB picture the shared decoder must turn it into: transparency on
# white, 16-bit scaled to 8 (50000 >> 8 = 195), the first frame of an animation.
UNUSUAL: dict[str, tuple[Callable[[], bytes], Callable[[], Image.Image]]] = {
    "cmyk": (helpers.cmyk_jpeg, lambda: Image.new("CMYK", (40, 40), (0, 220, 220, 20)).convert("RGB")),
    "16bit": (helpers.png_16bit, lambda: Image.new("RGB", (40, 40), (195, 195, 195))),
    "palette-transparency": (helpers.palette_with_transparency, _transparent_half_on_white),
    "animated-gif": (helpers.animated_gif, lambda: Image.new("RGB", (40, 40), (230, 20, 20))),
}


@pytest.mark.parametrize("case", list(UNUSUAL))
def test_unusual_image_modes_work(client: TestClient, case: str) -> None:
    make, expected = UNUSUAL[case]
    hits = upload(client, make(), k=3)["results"]
    want = upload(client, helpers.encode(expected(), "PNG"), k=3)["results"]
    assert len(hits) == 3
    # The same hits with the same scores as the picture it decodes to, so the mode was converted as
    # documented, not merely accepted (JPEG is lossy: there only the top hit, with a tolerance).
    assert hits[0]["id"] == want[0]["id"]
    if case == "cmyk":
        assert hits[0]["score"] == pytest.approx(want[0]["score"], abs=0.02)
    else:
        assert [h["id"] for h in hits] == [h["id"] for h in want]
        assert [h["score"] for h in hits] == pytest.approx([h["score"] for h in want], abs=1e-5)
    if case == "animated-gif":  # its first frame is the collection's red square
        assert hits[0]["path"].endswith(("red.png", "escape.png"))
        assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
