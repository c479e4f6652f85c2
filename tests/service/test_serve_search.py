"""Text and image search: ordering, targets, k/offset/min_score, the bundle header."""

from __future__ import annotations

import io

from fastapi.testclient import TestClient
from PIL import Image


def png(rgb: tuple[int, int, int] = (230, 20, 20), size: int = 40) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), rgb).save(buf, format="PNG")
    return buf.getvalue()


def test_text_search_returns_sorted_images(client: TestClient) -> None:
    r = client.post("/v1/search/text", json={"query": "a red square", "k": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert r.headers["x-bundle-version"] == body["bundle"]
    scores = [h["score"] for h in body["results"]]
    assert len(scores) == 5 and scores == sorted(scores, reverse=True)
    for hit in body["results"]:
        assert hit["kind"] == "image"
        assert hit["image_url"] == f"/v1/items/{hit['id']}/image"
        assert 0 <= hit["id"] < 9
