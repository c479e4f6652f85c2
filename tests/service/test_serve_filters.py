"""Filters on every search endpoint, metadata on every result, and `GET /v1/facets`, over a bundle the real
indexer built from a CSV with extra columns."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.conftest import COLOURS, make_colour_dataset
from tests.index.helpers import run_index
from tests.service import helpers
from tests.service.conftest import settings_for

WARM = {"red", "orange", "yellow", "purple"}


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[TestClient]:
    root = tmp_path_factory.mktemp("shop")
    make_colour_dataset(root)
    with open(root / "shop.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption", "tone", "price", "tags"])
        for i, name in enumerate(COLOURS):
            w.writerow(
                [f"images/{name}.png", f"a {name} square", "warm" if name in WARM else "cool", i * 10, name]
            )
    bundles = root / "bundles"
    run_index(tiny_model_dir, root / "shop.csv", bundles)
    with TestClient(create_app(settings_for(bundles)), raise_server_exceptions=False) as c:
        yield c


def _names(hits: list[dict]) -> set[str]:  # type: ignore[type-arg]
    return {Path(h["path"]).stem for h in hits}


def test_text_search_keeps_only_what_the_filter_matches_and_results_carry_metadata(shop: TestClient) -> None:
    r = shop.post(
        "/v1/search/text", json={"query": "a red square", "k": 8, "filter": {"tone": {"eq": "warm"}}}
    )
    assert r.status_code == 200, r.text
    hits = r.json()["results"]
    assert _names(hits) == WARM  # k=8 asked, the 4 that exist returned
    hit = hits[0]
    assert hit["fields"]["tone"] == "warm" and isinstance(hit["fields"]["price"], int)
    assert (hit["width"], hit["height"]) == (40, 40) and hit["size"] > 0 and hit["folder"].endswith("images")


@pytest.mark.parametrize(
    ("flt", "want"),
    [
        ({"price": {"gte": 20, "lt": 50}}, {"blue", "yellow", "purple"}),
        ({"path": {"glob": "*/images/b*.png"}}, {"blue", "black"}),
        ({"any": [{"tags": {"in": ["red", "white"]}}, {"price": {"eq": 30}}]}, {"red", "white", "yellow"}),
        ({"tone": {"eq": "cool"}, "tags": {"prefix": "g"}}, {"green"}),
        ({"tone": {"eq": "none such"}}, set()),
    ],
)
def test_filters_combine_as_documented(shop: TestClient, flt: dict, want: set[str]) -> None:  # type: ignore[type-arg]
    r = shop.post("/v1/search/text", json={"query": "a square", "k": 8, "filter": flt})
    assert r.status_code == 200, r.text
    assert _names(r.json()["results"]) == want


def test_image_search_takes_the_filter_as_a_json_form_field(shop: TestClient) -> None:
    form = {"k": "8", "filter": json.dumps({"tone": {"eq": "cool"}})}
    r = shop.post("/v1/search/image", files={"file": ("q.png", helpers.png())}, data=form)
    assert r.status_code == 200, r.text
    assert _names(r.json()["results"]) == set(COLOURS) - WARM
    bad = shop.post("/v1/search/image", files={"file": ("q.png", helpers.png())}, data={"filter": "{nope"})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_filter"


@pytest.mark.parametrize(
    ("flt", "field"),
    [
        ({"colour": {"eq": "red"}}, "filter.colour"),
        ({"size": {"glob": "1*"}}, "filter.size.glob"),
        ({"width": {"gte": "wide"}}, "filter.width.gte"),
        ({"any": [{"tone": {"like": "w"}}]}, "filter.any[0].tone"),
    ],
)
def test_invalid_filters_are_422_naming_the_field(shop: TestClient, flt: dict, field: str) -> None:  # type: ignore[type-arg]
    r = shop.post("/v1/search/text", json={"query": "a square", "filter": flt})
    assert r.status_code == 422
    err = r.json()["error"]
    assert err["code"] == "invalid_filter" and err["message"].startswith(field), err


def test_facets_count_values_over_what_the_filter_keeps(shop: TestClient) -> None:
    r = shop.get("/v1/facets", params={"field": "tone"})
    assert r.status_code == 200, r.text
    assert r.json()["values"] == [{"value": "cool", "count": 4}, {"value": "warm", "count": 4}]
    r = shop.get("/v1/facets", params={"field": "width", "filter": json.dumps({"price": {"lt": 30}})})
    assert r.json()["values"] == [{"value": 40, "count": 3}] and r.json()["matching"] == 3
    assert shop.get("/v1/facets", params={"field": "nope"}).status_code == 422
    assert shop.get("/v1/facets", params={"field": "tone", "filter": "[1]"}).status_code == 422


def test_item_endpoint_carries_the_user_fields(shop: TestClient) -> None:
    hits = shop.post("/v1/search/text", json={"query": "a red square", "k": 1}).json()["results"]
    item = shop.get(f"/v1/items/{hits[0]['id']}").json()
    assert item["fields"] == hits[0]["fields"] and item["folder"] == hits[0]["folder"]


def test_info_lists_the_user_fields_a_filter_may_name(shop: TestClient) -> None:
    info = shop.get("/v1/info").json()
    fields = info["user_fields"]
    assert fields == ["price", "tags", "tone"]  # the CSV's extra columns, sorted; caption is not one
    assert info["user_field_types"] == {"price": ["int"], "tags": ["str"], "tone": ["str"]}
    for name in fields:
        assert shop.get("/v1/facets", params={"field": name}).status_code == 200
