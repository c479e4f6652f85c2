"""A full queue answers 503 with Retry-After at once, and the server recovers when the queue drains."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from service.app import create_app
from tests.service.conftest import serving, settings_for


def test_full_queue_is_503_with_retry_after(bundles_dir: Path) -> None:
    app = create_app(settings_for(bundles_dir, queue_size=1, batch_max_size=1, retry_after_s=2))
    entered, release = threading.Event(), threading.Event()
    with serving(app) as url:
        encoder = app.state.service.state.current.encoder
        real = encoder.encode_texts

        def blocking(texts: Any, trim: bool = False) -> np.ndarray:
            entered.set()
            release.wait(30)
            return real(texts, trim=trim)

        encoder.encode_texts = blocking
        body = {"query": "a red square"}
        with ThreadPoolExecutor(2) as pool, httpx.Client(base_url=url, timeout=30) as http:
            first = pool.submit(http.post, "/v1/search/text", json=body)  # in the model thread
            assert entered.wait(30)
            second = pool.submit(http.post, "/v1/search/text", json=body)  # fills the queue of 1
            while app.state.service.texts.depth < 1:
                threading.Event().wait(0.01)
            r = http.post("/v1/search/text", json=body)
            assert r.status_code == 503
            assert r.json()["error"]["code"] == "overloaded" and r.headers["retry-after"] == "2"
            release.set()
            assert first.result().status_code == 200 and second.result().status_code == 200
        encoder.encode_texts = real
        with httpx.Client(base_url=url) as http:
            assert http.post("/v1/search/text", json=body).status_code == 200
            assert 'status="503"' in http.get("/metrics").text
