"""The search page's Filters panel in Chromium, over a bundle with user fields (`tone`, `price`) and file
times in two months: facets from `/v1/facets`, the filter kept in the URL and sent on every kind of search."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Page, expect

from tests.web.conftest import WARM, Visit

pytestmark = [pytest.mark.browser, pytest.mark.slow]

WARM_CAPTIONS = {f"a {c} square" for c in WARM}


def _wait_results(page: Page, n: int) -> None:
    expect(page.locator("#results .card")).to_have_count(n)
    expect(page.locator("body")).not_to_have_class(re.compile("busy"))


def _captions(page: Page) -> set[str]:
    return set(page.locator("#results .card img").evaluate_all("imgs => imgs.map(i => i.alt)"))


def _sent_filter(visit: Visit) -> tuple[str, object]:
    """(path, filter) of the last search the page sent: from the JSON body or the multipart field."""
    path, body = next(p for p in reversed(visit.posts) if p[0].startswith("/v1/search"))
    if path == "/v1/search/image":
        m = re.search(rb'name="filter"\r\n\r\n(.*?)\r\n--', body, re.S)
        return path, json.loads(m.group(1)) if m else None
    return path, json.loads(body).get("filter")


def test_a_checked_facet_narrows_every_kind_of_search_and_stays_in_the_url(shop: Visit, shop_bundles: Path):
    page = shop.page
    page.goto("/?q=a+square")
    _wait_results(page, 8)
    page.locator("#filters summary").click()
    tone = page.locator("#facets fieldset", has_text="tone")
    expect(tone.locator(".facet-name")).to_have_text(["cool", "warm"])  # counted by GET /v1/facets
    expect(tone.locator(".count")).to_have_text(["4", "4"])
    warm = page.locator('#facets input[data-field="tone"][value="warm"]')
    warm.check()
    expect(page).to_have_url(re.compile(r"f\.tone=warm"))
    _wait_results(page, 4)
    assert _captions(page) == WARM_CAPTIONS
    assert _sent_filter(shop) == ("/v1/search/text", {"tone": {"in": ["warm"]}})
    expect(page.locator("#filter-count")).to_have_text("1 on")
    expect(page.locator("#status")).to_contain_text("1 filter")

    page.locator("#q").fill("red + 0.5:orange")  # query arithmetic goes to POST /v1/search
    page.locator("#q").press("Enter")
    expect(page).to_have_url(re.compile(r"q=red.*f\.tone=warm"))
    _wait_results(page, 4)
    assert _sent_filter(shop) == ("/v1/search", {"tone": {"in": ["warm"]}})

    page.locator("#results .card").first.click()  # "more like this" keeps the filter
    page.locator("#detail-similar").click()
    expect(page).to_have_url(re.compile(r"similar=\d+.*f\.tone=warm"))
    _wait_results(page, 4)
    assert _captions(page) == WARM_CAPTIONS
    assert _sent_filter(shop) == ("/v1/search/image", {"tone": {"in": ["warm"]}})

    image = shop_bundles.parent / "images" / "blue.png"  # a cool colour, searched among the warm ones
    page.locator("#file").set_input_files(str(image))
    expect(page).to_have_url(re.compile(r"upload=\w+"))
    page.locator("label[for=target-images]").click()
    _wait_results(page, 4)
    assert _captions(page) == WARM_CAPTIONS

    page.reload()  # reload keeps the filter: checked, and sent
    expect(warm).to_be_checked()
    _wait_results(page, 4)
    unfiltered = re.compile(r"\?q=a\+square(&target=images)?$")  # as first loaded
    for _ in range(8):  # back, through each search above, to the unfiltered text search
        if unfiltered.search(page.url):
            break
        page.go_back()
    expect(page).to_have_url(unfiltered)
    _wait_results(page, 8)
    expect(warm).not_to_be_checked()
    expect(page.locator("#filter-count")).to_be_hidden()


def test_a_number_field_and_two_values_of_one_field(shop: Visit):
    page = shop.page
    page.goto("/?q=a+square&f.price=10&f.price=20")  # green and blue: `in` within a field
    _wait_results(page, 2)
    assert _captions(page) == {"a green square", "a blue square"}
    assert _sent_filter(shop)[1] == {"price": {"in": ["10", 10, "20", 20]}}  # the URL's text, and as a number
    expect(page.locator("#filters")).to_have_attribute("open", "")  # a URL with filters shows them
    expect(page.locator('#facets input[data-field="price"][value="10"]')).to_be_checked()
    page.locator('#facets input[data-field="tone"][value="cool"]').check()  # AND across fields
    _wait_results(page, 2)
    page.locator('#facets input[data-field="price"][value="20"]').uncheck()
    _wait_results(page, 1)
    assert _captions(page) == {"a green square"}
    assert parse_qs(urlsplit(page.url).query)["f.price"] == ["10"]


def test_path_prefix_and_date_range_by_keyboard(shop: Visit, shop_bundles: Path):
    page = shop.page
    page.goto("/?q=a+square")
    _wait_results(page, 8)
    page.locator("#filters summary").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#f-path")).to_be_visible()
    folder = page.evaluate("fetch('/v1/items/0').then(r => r.json()).then(i => i.folder)")
    page.keyboard.press("Tab")
    expect(page.locator("#f-path")).to_be_focused()
    page.keyboard.type(f"{folder}/b")
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"path=.*%2Fb"))
    _wait_results(page, 2)
    assert _captions(page) == {"a blue square", "a black square"}
    assert _sent_filter(shop)[1] == {"path": {"prefix": f"{folder}/b"}}

    page.locator("#f-path").fill("")
    page.locator("#f-date").select_option("mtime")  # the file times: warm colours in June 2024
    page.locator("#f-from").fill("2024-06-01")
    page.locator("#f-to").fill("2024-06-30")
    expect(page).to_have_url(re.compile(r"from=2024-06-01&to=2024-06-30&date=mtime"))
    _wait_results(page, 4)
    assert _captions(page) == WARM_CAPTIONS
    assert _sent_filter(shop)[1] == {"mtime": {"gte": "2024-06-01", "lte": "2024-06-30"}}

    page.locator("#f-date").select_option("taken_at")  # squares have no EXIF capture time
    expect(page.locator("#message")).to_contain_text("Nothing matches “a square” within the filters")
    page.locator("#message button", has_text="Clear filters").click()
    _wait_results(page, 8)
    expect(page.locator("#f-from")).to_have_value("")
    expect(page).to_have_url(re.compile(r"\?q=a\+square&target=images$"))


def test_a_checkbox_toggled_with_the_keyboard_keeps_its_focus(shop: Visit):
    page = shop.page
    page.goto("/?q=a+square")
    _wait_results(page, 8)
    page.locator("#filters summary").click()
    cool = page.locator('#facets input[data-field="tone"][value="cool"]')
    cool.focus()
    page.keyboard.press("Space")
    _wait_results(page, 4)
    expect(cool).to_be_checked()
    expect(cool).to_be_focused()
    page.keyboard.press("Space")
    _wait_results(page, 8)


@pytest.mark.parametrize(
    ("url", "named"),
    [("/?q=red&f.nosuch=1", "filter.nosuch"), ("/?q=red&from=last+summer", "filter.taken_at.gte")],
)
def test_a_refused_filter_says_which_field_and_can_be_cleared(shop: Visit, url: str, named: str):
    page = shop.page
    page.goto(url)
    message = page.locator("#message")
    expect(message).to_contain_text("The filters were refused")
    expect(message).to_contain_text(named)
    expect(message).to_have_attribute("data-kind", "error")
    expect(page.locator("#filters")).to_have_attribute("open", "")
    message.locator("button", has_text="Clear filters").click()
    _wait_results(page, 8)
    expect(message).to_be_hidden()


def test_the_open_panel_fits_a_phone_screen(browser, shop_server):
    visit = Visit(
        browser, shop_server.url, viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True
    )
    try:
        page = visit.page
        page.goto("/?q=a+square&f.tone=cool")
        _wait_results(page, 4)
        expect(page.locator("#filters")).to_have_attribute("open", "")
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        for control in ("#f-path", "#f-date", "#f-from", "#f-to", "#f-clear", '#facets input[value="warm"]'):
            box = page.locator(control).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375, control
    finally:
        visit.close()
    assert visit.foreign == [] and visit.errors == []


def test_filtered_captions_find_nothing_and_the_page_says_why(shop: Visit):
    page = shop.page
    page.goto("/?q=a+square&target=texts&f.tone=warm")  # caption items carry no user fields
    expect(page.locator("#message")).to_contain_text("Captions usually carry none of the photo metadata")
    page.locator("label[for=target-images]").click()
    _wait_results(page, 4)
