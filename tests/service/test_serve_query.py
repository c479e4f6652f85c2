"""`POST /v1/search` (weighted texts, items and vectors) against a hand computation, and `dedup` against a
known set of copies, over a bundle the real indexer built."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from indexer.core.bundle.read import open_bundle
from service.app import create_app
from service.client import Client
from service.search import collapse, combine
from tests.index.helpers import make_image, run_index
from tests.service.conftest import settings_for

COPIES = {"a": 3, "b": 2}  # image a.png has 3 byte-identical copies, b.png 2


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path
) -> Iterator[tuple[TestClient, Path]]:
    root = tmp_path_factory.mktemp("query")
    photos = root / "photos"
    for seed, name in enumerate(["a", "b", "c", "d", "e", "f"]):
        make_image(photos / f"{name}.png", seed=seed * 7 + 1)
        (photos / f"{name}.txt").write_text(f"picture {name}\n")
    for name, n in COPIES.items():
        for i in range(n):
            shutil.copy(photos / f"{name}.png", photos / f"{name}-copy{i}.png")
    bundles = root / "bundles"
    run_index(tiny_model_dir, photos, bundles)
    with TestClient(create_app(settings_for(bundles)), raise_server_exceptions=False) as c:
        yield c, bundles


def test_combine_is_the_normalised_weighted_sum_of_unit_vectors() -> None:
    got = combine(np.array([[2.0, 0.0], [0.0, 3.0]], np.float32), [1.0, -0.5])
    assert got is not None
    np.testing.assert_allclose(got, np.array([1.0, -0.5]) / np.sqrt(1.25), rtol=1e-6)
    assert combine(np.array([[1.0, 0.0], [1.0, 0.0]], np.float32), [1.0, -1.0]) is None


def test_weighted_terms_match_a_hand_computation(served: tuple[TestClient, Path]) -> None:
    client, bundles = served
    b = open_bundle(bundles)
    try:
        images = b.items.all("image")
        ids = [it.id for it in images]
        xb = b.stack.vectors("images", ids)
        item = images[2].id
        item_vec = b.stack.vectors("images", [item])[0]
    finally:
        b.close()
    texts = client.post("/v1/embed/text", json={"texts": ["picture a", "picture c"]}).json()["embeddings"]
    vec = np.random.default_rng(0).normal(size=xb.shape[1])
    terms = [
        {"text": "picture a", "weight": 1.0},
        {"text": "picture c", "weight": -0.5},
        {"item": item, "weight": 0.7},
        {"vector": vec.tolist(), "weight": 0.3},
    ]
    r = client.post("/v1/search", json={"terms": terms, "k": 5})
    assert r.status_code == 200, r.text
    units = [np.asarray(v) / np.linalg.norm(v) for v in (texts[0], texts[1], item_vec, vec)]
    q = 1.0 * units[0] - 0.5 * units[1] + 0.7 * units[2] + 0.3 * units[3]
    q /= np.linalg.norm(q)
    scores = xb @ q
    order = np.argsort(-scores, kind="stable")[:5]
    hits = r.json()["results"]
    np.testing.assert_allclose([h["score"] for h in hits], scores[order], atol=1e-4)
    assert {h["id"] for h in hits} == {ids[i] for i in order} or len(set(np.round(scores, 4))) < len(scores)
    cs = Client(http=client)  # the Python client sends the same request (not closed: it is the fixture's)
    again = cs.search([("picture a", 1.0), ("picture c", -0.5), (item, 0.7), (vec.tolist(), 0.3)], k=5)
    assert [h.id for h in again.results] == [h["id"] for h in hits]


@pytest.mark.parametrize(
    ("terms", "code"),
    [
        ([{"text": "x", "item": 1}], "invalid_request"),
        ([{"text": "  "}], "empty_query"),
        ([{"item": 10_000}], "item_not_found"),
        ([{"vector": [1.0, 2.0]}], "invalid_request"),
        ([{"text": "picture a"}, {"text": "picture a", "weight": -1.0}], "empty_query"),
    ],
)
def test_bad_terms_are_422(served: tuple[TestClient, Path], terms: list[dict], code: str) -> None:  # type: ignore[type-arg]
    r = served[0].post("/v1/search", json={"terms": terms})
    assert r.status_code == 422 and r.json()["error"]["code"] == code, r.text


def test_dedup_shows_each_set_of_copies_once(served: tuple[TestClient, Path]) -> None:
    client, _ = served
    plain = client.post("/v1/search/text", json={"query": "picture a", "k": 11}).json()["results"]
    assert len(plain) == 11  # 6 pictures + 5 copies
    for endpoint, body in (
        ("/v1/search/text", {"query": "picture a"}),
        ("/v1/search", {"terms": [{"text": "picture a"}]}),
    ):
        hits = client.post(endpoint, json={**body, "k": 10, "dedup": 0.9999}).json()["results"]
        stems = [Path(h["path"]).stem.split("-")[0] for h in hits]
        assert sorted(stems) == ["a", "b", "c", "d", "e", "f"], stems  # one of each set of copies
        best = {Path(h["path"]).stem.split("-")[0]: h["score"] for h in reversed(plain)}
        np.testing.assert_allclose([h["score"] for h in hits], sorted(best.values(), reverse=True), atol=1e-5)
    page2 = client.post("/v1/search/text", json={"query": "picture a", "k": 3, "offset": 3, "dedup": 0.9999})
    page1 = client.post("/v1/search/text", json={"query": "picture a", "k": 3, "dedup": 0.9999})
    ids = [h["id"] for h in page1.json()["results"] + page2.json()["results"]]
    assert len(set(ids)) == 6


def test_collapse_keeps_the_first_of_each_group() -> None:
    v = np.array([[1, 0], [1, 0], [0.6, 0.8], [0, 1]], np.float32)
    pairs = [(10, 0.9), (11, 0.9), (12, 0.5), (13, 0.1)]
    assert collapse(pairs, v, 0.99) == [(10, 0.9), (12, 0.5), (13, 0.1)]
    assert collapse(pairs, v, 0.5) == [(10, 0.9), (13, 0.1)]


def test_an_items_duplicates_are_its_copies(served: tuple[TestClient, Path]) -> None:
    client, _ = served
    hits = client.post("/v1/search/text", json={"query": "picture a", "k": 11}).json()["results"]
    by_stem = {Path(h["path"]).stem: h["id"] for h in hits}
    r = client.get(f"/v1/items/{by_stem['a-copy1']}/duplicates", params={"threshold": 0.9999})
    assert r.status_code == 200, r.text
    group = r.json()["group"]
    assert sorted(Path(m["path"]).stem for m in group) == ["a", "a-copy0", "a-copy1", "a-copy2"]
    assert [m["id"] for m in group] == sorted(m["id"] for m in group) and group[0]["score"] == pytest.approx(
        1.0
    )
    alone = client.get(f"/v1/items/{by_stem['c']}/duplicates", params={"threshold": 0.9999}).json()["group"]
    assert [m["id"] for m in alone] == [by_stem["c"]]
    assert client.get(f"/v1/items/{by_stem['c']}/duplicates", params={"threshold": 2}).status_code == 422
    cs = Client(http=client)
    assert len(cs.duplicates(by_stem["b"], threshold=0.9999).group) == 3


def _photo(bundles: Path, stem: str) -> bytes:
    b = open_bundle(bundles)
    try:
        path = next(it.path for it in b.items.all("image") if it.path and Path(it.path).stem == stem)
    finally:
        b.close()
    return Path(path).read_bytes()


def test_multipart_search_equals_the_json_search_with_the_images_vector(
    served: tuple[TestClient, Path],
) -> None:
    client, bundles = served
    photo = _photo(bundles, "d")
    vec = client.post("/v1/embed/image", files={"file": ("d.png", photo)}).json()["embeddings"][0]
    terms = [{"text": "picture a", "weight": -0.4}]
    options = {"k": 4, "target": "images", "offset": 1, "dedup": 0.9999, "min_score": -1.0}
    want = client.post("/v1/search", json={"terms": [*terms, {"vector": vec, "weight": 0.8}], **options})
    assert want.status_code == 200, want.text
    form = {"terms": json.dumps(terms), "weight": "0.8", **{k: str(v) for k, v in options.items()}}
    got = client.post("/v1/search", files={"file": ("d.png", photo)}, data=form)
    assert got.status_code == 200, got.text
    assert [h["id"] for h in got.json()["results"]] == [h["id"] for h in want.json()["results"]]
    np.testing.assert_allclose(
        [h["score"] for h in got.json()["results"]], [h["score"] for h in want.json()["results"]], atol=1e-5
    )
    # The image alone (weight 1, no terms) is an image search: the photo itself first, at cosine ~1.
    alone = client.post("/v1/search", files={"file": ("d.png", photo)}, data={"k": "1", "terms": ""}).json()[
        "results"
    ]
    assert Path(alone[0]["path"]).stem.startswith("d") and alone[0]["score"] == pytest.approx(1.0, abs=1e-4)
    flt = {"path": {"glob": "*/c.png"}}
    kept = client.post("/v1/search", files={"file": ("d.png", photo)}, data={"filter": json.dumps(flt)})
    assert [Path(h["path"]).name for h in kept.json()["results"]] == ["c.png"]
    cs = Client(http=client)
    again = cs.search([("picture a", -0.4)], image=photo, image_weight=0.8, **options)  # type: ignore[arg-type]
    assert [h.id for h in again.results] == [h["id"] for h in want.json()["results"]]


@pytest.mark.parametrize(
    ("form", "status", "code", "names"),
    [
        ({"terms": "[{nope"}, 422, "invalid_request", "terms"),
        ({"terms": '{"text": "x"}'}, 422, "invalid_request", "terms"),
        ({"terms": '[{"text": "x", "item": 1}]'}, 422, "invalid_request", "terms[0]"),
        ({"terms": '[{"text": " "}]'}, 422, "empty_query", "terms[0].text"),
        ({"filter": "{nope"}, 422, "invalid_filter", "filter"),
        ({"filter": '{"nosuch": {"eq": 1}}'}, 422, "invalid_filter", "nosuch"),
        ({"weight": "heavy"}, 422, "invalid_request", "weight"),
        ({"weight": "0"}, 422, "empty_query", "cancel"),
        ({"k": "0"}, 422, "invalid_request", "k"),
        ({"colour": "red"}, 422, "invalid_request", "colour"),
    ],
)
def test_bad_multipart_fields_are_422_naming_the_field(
    served: tuple[TestClient, Path], form: dict[str, str], status: int, code: str, names: str
) -> None:
    client, bundles = served
    r = client.post("/v1/search", files={"file": ("a.png", _photo(bundles, "a"))}, data=form)
    assert r.status_code == status and r.json()["error"]["code"] == code, r.text
    assert names in r.json()["error"]["message"]


def test_an_undecodable_upload_is_refused_as_on_the_image_route(served: tuple[TestClient, Path]) -> None:
    client, _ = served
    for endpoint in ("/v1/search/image", "/v1/search"):
        r = client.post(endpoint, files={"file": ("n.png", b"not an image")})
        assert r.status_code == 400 and r.json()["error"]["code"] == "not_an_image", (endpoint, r.text)
    r = client.post("/v1/search", data={"terms": "[]"})  # form-encoded, no file: still refused clearly
    assert r.status_code == 415, r.text
    r = client.post("/v1/search", files={"other": ("a.png", b"x")})
    assert r.status_code == 422 and r.json()["error"]["code"] == "missing_file", r.text
