"""Retake docs/search-page.png from a running server: `python docs/screenshot.py URL [OUT]`.

For example, with `make demo` serving: python docs/screenshot.py 'http://127.0.0.1:8000/?q=dog+face'
Uses Playwright with Debian's Chromium (/usr/bin/chromium), as the browser tests do.
"""

from __future__ import annotations

import sys
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def screenshot(url: str, out: Path, width: int = 1280, height: int = 860) -> None:
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.goto(url)
        page.locator("#results .card").first.wait_for()
        page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete)")
        page.screenshot(path=str(out))
        browser.close()


if __name__ == "__main__":
    screenshot(
        sys.argv[1], Path(sys.argv[2] if len(sys.argv) > 2 else Path(__file__).parent / "search-page.png")
    )
