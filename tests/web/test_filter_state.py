"""The page's URL state for filters (`service/static/state.js`): URL -> state -> the API's `filter` object
and back, run in Node: no browser needed."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO
from tests.web.node import run_module

STATE_JS = REPO / "service" / "static" / "state.js"


def _run(expr: str) -> object:
    return run_module(STATE_JS, expr, setup="globalThis.location = { pathname: '/' };")


@pytest.mark.parametrize(
    ("query", "flt"),
    [
        ("?q=red", None),
        ("?q=red&path=/photos/2024/", {"path": {"prefix": "/photos/2024/"}}),
        ("?q=red&from=2024-06-01", {"taken_at": {"gte": "2024-06-01"}}),
        ("?q=red&to=2024-06-30&date=mtime", {"mtime": {"lte": "2024-06-30"}}),
        ("?q=red&date=mtime", None),  # a date field without dates filters nothing
        ("?q=red&f.camera=Canon+EOS&f.camera=Nikon", {"camera": {"in": ["Canon EOS", "Nikon"]}}),
        ("?q=red&f.price=10&f.tone=warm", {"price": {"in": ["10", 10]}, "tone": {"in": ["warm"]}}),
        (
            "?similar=3&f.tone=warm&from=2024-06-01&to=2024-06-30&path=/a/",
            {
                "path": {"prefix": "/a/"},
                "taken_at": {"gte": "2024-06-01", "lte": "2024-06-30"},
                "tone": {"in": ["warm"]},
            },
        ),
    ],
)
def test_the_url_gives_the_filter_object(query: str, flt: object) -> None:
    assert _run(f"m.filterOf(m.parse({json.dumps(query)}))") == flt


def test_filters_round_trip_through_the_url_and_count() -> None:
    url = "?q=red&target=images&path=%2Fa%2F&from=2024-06-01&date=mtime&f.price=10&f.tone=cool&f.tone=warm"
    assert _run(f"m.format(m.parse({json.dumps(url)}))") == url
    assert _run(f"m.filterCount(m.parse({json.dumps(url)}))") == 4  # path, dates, price, tone
    # Filters stay in the URL without a query (kept while the next search is typed); a new filter is a
    # new question for the server, the same filters in another order are not.
    assert _run("m.format(m.parse('?f.tone=warm'))") == "?f.tone=warm"
    assert _run("m.sameQuery(m.parse('?q=a&f.tone=warm'), m.parse('?q=a'))") is False
    assert _run("m.sameQuery(m.parse('?q=a&f.x=1&f.y=2'), m.parse('?q=a&f.y=2&f.x=1'))") is True
