"""The search box's query arithmetic (`service/static/terms.js`), run in Node: no browser needed."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO
from tests.web.node import run_module

TERMS_JS = REPO / "service" / "static" / "terms.js"


def _parse(query: str) -> object:
    return run_module(TERMS_JS, f"m.parseTerms({json.dumps(query)})")


@pytest.mark.parametrize(
    ("query", "terms"),
    [
        ("a red square", None),
        ("red-green square", None),  # a hyphen inside a term is text
        ("beach + sunset", [{"text": "beach", "weight": 1}, {"text": "sunset", "weight": 1}]),
        ("beach - people", [{"text": "beach", "weight": 1}, {"text": "people", "weight": -1}]),
        (
            "2:cat + dog - 0.5:grass",
            [{"text": "cat", "weight": 2}, {"text": "dog", "weight": 1}, {"text": "grass", "weight": -0.5}],
        ),
        ("0.5:a cat", [{"text": "a cat", "weight": 0.5}]),
    ],
)
def test_the_search_box_reads_rclip_arithmetic(query: str, terms: object) -> None:
    assert _parse(query) == terms
