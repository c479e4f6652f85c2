"""Browser-test fixtures: the real app served by uvicorn on loopback, and Debian's Chromium via Playwright."""

from __future__ import annotations

import csv
import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import uvicorn
from playwright.sync_api import Browser, Route, expect, sync_playwright

from tests.service.conftest import build_bundle

CHROMIUM = Path("/usr/bin/chromium")
# Assertions wait for the page up to this long: generous, since CI machines may be busy.
expect.set_options(timeout=15_000)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


class LiveServer:
    """The real `create_app(settings)` under uvicorn in a background thread, on a free loopback port."""

    def __init__(self, bundles: Path, **overrides: Any) -> None:
        from service.app import create_app
        from service.settings import ServiceSettings

        base: dict[str, Any] = {
            "bundles": bundles,
            "device": "cpu",
            "reload_poll_s": 0,
            "batch_max_wait_ms": 1,
        }
        settings = ServiceSettings(**{**base, **overrides})
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        config = uvicorn.Config(create_app(settings), log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


@pytest.fixture(scope="session")
def web_bundles(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path, colour_csv: Path) -> Path:
    """A bundles dir holding one bundle of the 8 colour squares (ids 0-7) and their captions (8-15)."""
    out = tmp_path_factory.mktemp("web-bundles")
    build_bundle(out, tiny_model_dir, colour_csv)
    return out


# The shop bundle: the colour squares with a CSV's extra columns (`tone`, `price`) as user fields, and
# file times in two months, for the Filters panel.
WARM = ("red", "orange", "yellow", "purple")
JUNE_2024 = datetime(2024, 6, 15, 12, tzinfo=UTC).timestamp()
JANUARY_2023 = datetime(2023, 1, 10, 12, tzinfo=UTC).timestamp()


@pytest.fixture(scope="session")
def shop_bundles(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    from tests.conftest import COLOURS, make_colour_dataset
    from tests.index.helpers import run_index

    root = tmp_path_factory.mktemp("web-shop")
    make_colour_dataset(root)
    with open(root / "shop.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["filepath", "caption", "tone", "price"])
        for i, name in enumerate(COLOURS):
            w.writerow([f"images/{name}.png", f"a {name} square", "warm" if name in WARM else "cool", i * 10])
            t = JUNE_2024 if name in WARM else JANUARY_2023
            os.utime(root / "images" / f"{name}.png", (t, t))
    bundles = root / "bundles"
    run_index(tiny_model_dir, root / "shop.csv", bundles)
    return bundles


@pytest.fixture(scope="session")
def shop_server(shop_bundles: Path) -> Iterator[LiveServer]:
    live = LiveServer(shop_bundles)
    yield live
    live.close()


@pytest.fixture
def shop(browser: Browser, shop_server: LiveServer) -> Iterator[Visit]:
    """A desktop-sized page on the shop bundle's server (same checks as `visit`)."""
    yield from _checked_visit(browser, shop_server)


@pytest.fixture(scope="session")
def server(web_bundles: Path) -> Iterator[LiveServer]:
    live = LiveServer(web_bundles)
    yield live
    live.close()


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    """Debian's Chromium. Missing is a failure, not a skip: CI installs it (.ci/run)."""
    if not CHROMIUM.exists():
        pytest.fail(
            f"{CHROMIUM} is missing: the browser tests need Debian's Chromium (apt-get install chromium)",
            pytrace=False,
        )
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


class Visit:
    """A fresh browser context on one server that refuses, and records, any request to another origin."""

    def __init__(self, browser: Browser, base_url: str, **context_options: Any) -> None:
        self.base_url = base_url
        self.context = browser.new_context(base_url=base_url, accept_downloads=True, **context_options)
        self.requests: list[str] = []
        self.foreign: list[str] = []
        self.search_bodies: list[str] = []  # JSON bodies of text searches, in order
        self.posts: list[tuple[str, bytes]] = []  # (path, body) of every POST, in order
        self.errors: list[str] = []
        self.context.route("**/*", self._route)
        self.page = self.context.new_page()
        self.page.set_default_timeout(15_000)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def _route(self, route: Route) -> None:
        url = route.request.url
        self.requests.append(url)
        if url.endswith("/v1/search/text"):
            self.search_bodies.append(route.request.post_data or "")
        if route.request.method == "POST":
            self.posts.append((urlsplit(url).path, route.request.post_data_buffer or b""))
        parts = urlsplit(url)
        if parts.scheme in ("blob", "data") or f"{parts.scheme}://{parts.netloc}" == self.base_url:
            route.continue_()
        else:
            self.foreign.append(url)
            route.abort()

    def close(self) -> None:
        self.context.close()


@pytest.fixture
def visit(browser: Browser, server: LiveServer) -> Iterator[Visit]:
    """A desktop-sized page on the ready server; fails the test if the page reached another origin."""
    yield from _checked_visit(browser, server)


def _checked_visit(browser: Browser, live: LiveServer) -> Iterator[Visit]:
    """A desktop-sized Visit on `live`; afterwards, fails the test if the page reached another origin or
    threw an uncaught error."""
    v = Visit(browser, live.url, viewport={"width": 1280, "height": 900})
    yield v
    v.close()
    assert v.foreign == [], f"the page made requests outside its origin: {v.foreign}"
    assert v.errors == [], f"uncaught errors in the page: {v.errors}"
