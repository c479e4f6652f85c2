"""The search page in a real browser (Debian's Chromium) against the real app over a real bundle."""

from __future__ import annotations

import json
import re
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import expect

from tests.service.conftest import build_bundle
from tests.web.conftest import LiveServer, Visit

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CAPTIONS = {f"a {c} square" for c in ("red", "green", "blue", "yellow", "purple", "orange", "black", "white")}


def _query(page) -> dict[str, list[str]]:
    return parse_qs(urlsplit(page.url).query)


def _scores(page) -> list[float]:
    return [float(s) for s in page.locator("#results .score").all_inner_texts()]


def _wait_results(page, n: int | None = None) -> None:
    cards = page.locator("#results .card")
    if n is None:
        expect(cards.first).to_be_visible()
    else:
        expect(cards).to_have_count(n)
    expect(page.locator("body")).not_to_have_class(re.compile("busy"))


def test_typing_shows_loaded_images_with_captions_and_scores(visit: Visit, web_bundles: Path):
    page = visit.page
    page.goto("/")
    version = (web_bundles / "CURRENT").read_text().strip()
    expect(page.locator("#info")).to_contain_text(version)
    expect(page.locator("#info")).to_contain_text("8 images")
    page.locator("#q").press_sequentially("a red square", delay=20)  # no Enter: search-as-you-type
    _wait_results(page, 8)
    images = page.locator("#results .card img")
    page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete)")
    widths = images.evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
    assert len(widths) == 8 and all(w > 0 for w in widths), widths
    alts = images.evaluate_all("imgs => imgs.map(i => i.alt)")
    assert set(alts) == CAPTIONS, "each image's alt text is its caption"
    assert set(page.locator("#results .caption").all_inner_texts()) == CAPTIONS
    scores = _scores(page)
    assert scores == sorted(scores, reverse=True), "results are shown largest score first"
    expect(page.locator("#status")).to_contain_text(re.compile(r"8 images · [\d.]+ ms"))
    assert _query(page)["q"] == ["a red square"]


def test_enter_back_forward_and_reload_round_trip_the_query(visit: Visit):
    page = visit.page
    page.goto("/")
    for q in ("red", "blue square"):
        page.locator("#q").fill(q)
        page.locator("#q").press("Enter")
        expect(page).to_have_url(re.compile(r"\?q=" + q.replace(" ", r"\+")))
        _wait_results(page, 8)
    page.go_back()
    expect(page.locator("#q")).to_have_value("red")
    _wait_results(page, 8)
    page.go_forward()
    expect(page.locator("#q")).to_have_value("blue square")
    page.reload()
    expect(page.locator("#q")).to_have_value("blue square")
    _wait_results(page, 8)


def test_a_shared_url_restores_target_page_size_and_min_score(visit: Visit):
    page = visit.page
    page.goto("/?q=green&target=texts&k=12&min=-1")
    expect(page.locator("#target-texts")).to_be_checked()
    expect(page.locator("#k")).to_have_value("12")
    expect(page.locator("#min-score")).to_have_value("-1")
    _wait_results(page, 8)
    quotes = page.locator("#results .card.text .quote").all_inner_texts()
    assert set(quotes) == CAPTIONS
    page.locator("label[for=target-images]").click()
    expect(page).to_have_url(re.compile("target=images"))
    expect(page.locator("#results .card img")).to_have_count(8)
    page.go_back()
    expect(page.locator("#target-texts")).to_be_checked()
    expect(page.locator("#results .card.text")).to_have_count(8)


def test_uploading_an_image_shows_captions_then_similar_images(visit: Visit, colour_csv: Path):
    page = visit.page
    page.goto("/")
    page.locator("#file").set_input_files(str(colour_csv.parent / "images" / "red.png"))
    expect(page).to_have_url(re.compile(r"upload=\w+"))
    expect(page.locator("#target-texts")).to_be_checked()  # image -> captions by default
    _wait_results(page, 8)
    assert set(page.locator("#results .quote").all_inner_texts()) == CAPTIONS
    expect(page.locator("#query-image")).to_be_visible()
    page.locator("label[for=target-images]").click()  # the image -> image toggle
    expect(page.locator("#results .card img")).to_have_count(8)
    # The same picture is in the bundle, so it is its own nearest image, at cosine ~1.
    expect(page.locator("#results .card").first.locator("img")).to_have_attribute("alt", "a red square")
    assert _scores(page)[0] == pytest.approx(1.0, abs=1e-3)
    page.reload()  # the dropped image is kept in this tab, so a reload repeats the search
    expect(page.locator("#results .card img")).to_have_count(8)


def test_dropping_and_pasting_an_image_search_with_it(visit: Visit, colour_csv: Path):
    page = visit.page
    page.goto("/")
    data = list((colour_csv.parent / "images" / "blue.png").read_bytes())
    make = (
        "bytes => { const dt = new DataTransfer();"
        " dt.items.add(new File([new Uint8Array(bytes)], 'b.png', {type: 'image/png'})); return dt; }"
    )
    dt = page.evaluate_handle(make, data)
    page.dispatch_event("#dropzone", "drop", {"dataTransfer": dt})
    _wait_results(page, 8)
    first_upload = _query(page)["upload"]
    page.evaluate(
        f"""bytes => {{
            const dt = ({make})(bytes);
            document.dispatchEvent(new ClipboardEvent('paste', {{clipboardData: dt, bubbles: true}}));
        }}""",
        data,
    )
    expect(page).not_to_have_url(re.compile("upload=" + first_upload[0]))
    _wait_results(page, 8)
    assert set(page.locator("#results .quote").all_inner_texts()) == CAPTIONS


def test_large_view_shows_details_and_finds_similar_images(visit: Visit):
    page = visit.page
    page.goto("/?q=yellow")
    _wait_results(page, 8)
    first = page.locator("#results .card").first
    caption = first.locator("img").get_attribute("alt")
    score = first.locator(".score").inner_text()
    item_id = first.get_attribute("data-id")
    first.click()
    dialog = page.locator("#detail")
    expect(dialog).to_be_visible()
    expect(page.locator("#detail-title")).to_have_text(caption)
    expect(page.locator("#detail-score")).to_have_text(score)
    expect(page.locator("#detail-id")).to_have_text(item_id)
    expect(page.locator("#detail-img")).to_have_attribute("alt", caption)
    assert _query(page)["view"] == [item_id]
    page.locator("#detail-similar").click()
    expect(dialog).to_be_hidden()
    expect(page).to_have_url(re.compile(f"similar={item_id}"))
    _wait_results(page, 8)
    expect(page.locator("#results .card").first).to_have_attribute("data-id", item_id)
    assert _scores(page)[0] == pytest.approx(1.0, abs=1e-3)
    page.go_back()  # back to the open view of the text search
    expect(dialog).to_be_visible()
    page.go_back()
    expect(dialog).to_be_hidden()
    expect(page.locator("#q")).to_have_value("yellow")


def test_keyboard_alone_searches_opens_and_closes_results(visit: Visit):
    page = visit.page
    page.goto("/")
    page.locator("body").press("/")
    expect(page.locator("#q")).to_be_focused()
    page.keyboard.type("purple")
    page.keyboard.press("Enter")
    _wait_results(page, 8)
    for _ in range(20):  # Tab through the controls to the first result
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.classList.contains('card')"):
            break
    cards = page.locator("#results .card")
    expect(cards.first).to_be_focused()
    page.keyboard.press("ArrowRight")
    expect(cards.nth(1)).to_be_focused()
    page.keyboard.press("Enter")
    expect(page.locator("#detail")).to_be_visible()
    expect(page.locator("#detail-id")).to_have_text(cards.nth(1).get_attribute("data-id"))
    page.keyboard.press("ArrowRight")
    expect(page.locator("#detail-id")).to_have_text(cards.nth(2).get_attribute("data-id"))
    page.keyboard.press("Escape")
    expect(page.locator("#detail")).to_be_hidden()
    expect(page).not_to_have_url(re.compile("view="))  # closing the view went back in history
    expect(cards.nth(2)).to_be_focused()


def test_nothing_matches_says_so(visit: Visit):
    page = visit.page
    page.goto("/?q=red&min=0.999")
    expect(page.locator("#message")).to_contain_text("Nothing matches “red” with a score of at least 0.999")
    expect(page.locator("#results .card")).to_have_count(0)
    expect(page.locator("#download")).to_be_disabled()


def test_a_rejected_file_says_why(visit: Visit, tmp_path: Path):
    page = visit.page
    page.goto("/")
    bogus = tmp_path / "notes.png"
    bogus.write_bytes(b"these bytes are not an image at all\n" * 4)
    page.locator("#file").set_input_files(str(bogus))
    message = page.locator("#message")
    expect(message).to_contain_text("This file was rejected")
    expect(message).to_have_attribute("data-kind", "error")
    expect(page.locator("#results .card")).to_have_count(0)


def test_not_ready_is_shown_and_the_page_recovers(
    browser, tmp_path: Path, tiny_model_dir: Path, colour_csv: Path
):
    bundles = tmp_path / "bundles"
    bundles.mkdir()
    live = LiveServer(bundles, reload_poll_s=0.2, reload_retry_s=0.2)
    visit = Visit(browser, live.url)
    try:
        page = visit.page
        page.goto("/?q=orange")
        expect(page.locator("#message")).to_contain_text("not ready")
        expect(page.locator("#info")).to_have_text("not ready")
        build_bundle(bundles, tiny_model_dir, colour_csv)  # the server picks it up; the page polls
        expect(page.locator("#results .card img")).to_have_count(8, timeout=30_000)
        expect(page.locator("#message")).to_be_hidden()
        expect(page.locator("#info")).to_contain_text("8 images")
    finally:
        visit.close()
        live.close()
    assert visit.foreign == []


def test_scrolling_to_the_end_loads_the_next_pages(browser, server: LiveServer):
    visit = Visit(browser, server.url, viewport={"width": 1000, "height": 500})
    try:
        page = visit.page
        page.goto("/?q=black&k=2")
        cards = page.locator("#results .card")
        expect(cards.first).to_be_visible()
        for _ in range(10):
            page.mouse.wheel(0, 5000)
            page.wait_for_timeout(150)
            if cards.count() == 8:
                break
        expect(cards).to_have_count(8)
        ids = [c.get_attribute("data-id") for c in cards.all()]
        assert len(set(ids)) == 8, "pages do not repeat results"
        scores = _scores(page)
        assert scores == sorted(scores, reverse=True)
        offsets = [json.loads(body)["offset"] for body in visit.search_bodies]
        assert offsets == [0, 2, 4, 6, 8][: len(offsets)] and len(offsets) >= 4, offsets
    finally:
        visit.close()


def test_results_download_as_json(visit: Visit):
    page = visit.page
    page.goto("/?q=white&target=texts")
    _wait_results(page, 8)
    with page.expect_download() as info:
        page.locator("#download").click()
    data = json.loads(Path(info.value.path()).read_text())
    assert data["query"]["text"] == "white" and data["query"]["target"] == "texts"
    shown = [int(c.get_attribute("data-id")) for c in page.locator("#results .card").all()]
    assert [r["id"] for r in data["results"]] == shown
    assert {r["text"] for r in data["results"]} == CAPTIONS


def test_phone_sized_screen_fits_without_sideways_scrolling(browser, server: LiveServer):
    visit = Visit(browser, server.url, viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    try:
        page = visit.page
        page.goto("/?q=a+green+square")
        _wait_results(page, 8)
        assert page.evaluate("document.documentElement.scrollWidth") <= 375
        boxes = [c.bounding_box() for c in page.locator("#results .card").all()[:2]]
        assert boxes[0]["y"] == boxes[1]["y"] and boxes[1]["x"] > boxes[0]["x"], "two cards per row"
        assert all(b["x"] >= 0 and b["x"] + b["width"] <= 375 for b in boxes)
        for control in ("#q", "#pick", "label[for=target-texts]", "#k", "#min-score", "#download"):
            box = page.locator(control).bounding_box()
            assert box and box["x"] >= 0 and box["x"] + box["width"] <= 375, control
        page.locator("#results .card").first.tap()
        expect(page.locator("#detail")).to_be_visible()
        box = page.locator("#detail").bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= 375
    finally:
        visit.close()
    assert visit.foreign == []


def test_the_page_never_leaves_its_origin(visit: Visit):
    page = visit.page
    page.goto("/?q=red")
    _wait_results(page, 8)
    page.locator("#results .card").first.click()
    expect(page.locator("#detail")).to_be_visible()
    html = page.content()
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html), "the page links to another origin"
    origin = visit.base_url
    assert visit.requests, "requests were not observed"
    assert all(u.startswith(origin) for u in visit.requests), visit.requests
    paths = {urlsplit(u).path for u in visit.requests}
    assert {"/", "/static/app.js", "/static/style.css", "/v1/info", "/v1/search/text"} <= paths


def test_a_server_with_an_api_key_asks_for_it_once(browser, web_bundles: Path):
    live = LiveServer(web_bundles, api_key="s3cret-key")
    visit = Visit(browser, live.url)
    try:
        page = visit.page
        page.goto("/?q=red")
        expect(page.locator("#message")).to_contain_text("needs an API key")
        page.locator("#api-key").fill("wrong")
        page.locator("#api-key").press("Enter")
        expect(page.locator("#message")).to_contain_text("API key was refused")
        page.locator("#api-key").fill("s3cret-key")
        page.locator("#api-key").press("Enter")
        expect(page.locator("#results .card img")).to_have_count(8)
        # <img> cannot send the key: the page fetches each image with it and shows it as a blob.
        page.wait_for_function(
            "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
        )
        expect(page.locator("#info")).to_contain_text("8 images")
        page.reload()  # the key is kept for this tab
        expect(page.locator("#results .card img")).to_have_count(8)
    finally:
        visit.close()
        live.close()
    assert visit.foreign == []


def test_a_shared_link_to_a_result_opens_its_large_view(visit: Visit):
    page = visit.page
    page.goto("/?q=red&view=3")  # item 3 is the yellow square, whatever its rank for "red"
    expect(page.locator("#detail")).to_be_visible()
    expect(page.locator("#detail-title")).to_have_text("a yellow square")
    expect(page.locator("#detail-id")).to_have_text("3")
    page.wait_for_function("document.getElementById('detail-img').naturalWidth > 0")
    page.keyboard.press("Escape")
    expect(page.locator("#detail")).to_be_hidden()
    expect(page).to_have_url(re.compile(r"/\?q=red&target=images$"))
    _wait_results(page, 8)


def test_the_empty_page_suggests_captions_to_try(visit: Visit):
    page = visit.page
    page.goto("/")
    ideas = page.locator("#ideas .idea")
    expect(ideas.first).to_be_visible()
    texts = ideas.all_inner_texts()
    assert texts and set(texts) <= CAPTIONS, texts
    ideas.first.click()
    expect(page.locator("#q")).to_have_value(texts[0])
    expect(page).to_have_url(re.compile(r"\?q=a\+\w+\+square"))
    _wait_results(page, 8)
    expect(page.locator("#hint")).to_be_hidden()
