"""Start without a bundle, hot reload (admin and polling), refusing a bad bundle, reload under load."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from indexer.core.modeldir import WEIGHTS_NAME, model_fingerprint
from indexer.index.publish import set_current
from service.app import create_app
from service.state import ServiceState
from tests.conftest import make_colour_dataset
from tests.service import helpers
from tests.service.conftest import ADMIN_KEY, build_bundle, serving, settings_for

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture(scope="module")
def small_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-image variant of the colour set, so a response shows which bundle answered it."""
    csv_path = make_colour_dataset(tmp_path_factory.mktemp("small"))
    lines = csv_path.read_text().splitlines()
    csv_path.write_text("\n".join(lines[:5]) + "\n")
    return csv_path


def wait_until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def test_starts_without_a_bundle_and_becomes_ready(
    tmp_path: Path, tiny_model_dir: Path, colour_csv: Path
) -> None:
    with TestClient(create_app(settings_for(tmp_path, reload_poll_s=0.05))) as c:
        assert c.get("/healthz").status_code == 200
        r = c.get("/readyz")
        assert r.status_code == 503 and "CURRENT" in r.json()["error"]["message"]
        q = c.post("/v1/search/text", json={"query": "red"})
        assert q.status_code == 503 and q.json()["error"]["code"] == "not_ready" and q.headers["retry-after"]
        assert c.post("/v1/search/image", files={"file": ("a.png", helpers.png())}).status_code == 503
        version = build_bundle(tmp_path, tiny_model_dir, colour_csv).name
        wait_until(lambda: c.get("/readyz").status_code == 200)
        assert c.get("/readyz").json()["bundle"] == version


def test_admin_reload_switches_bundles(
    tmp_path: Path, tiny_model_dir: Path, colour_csv: Path, small_csv: Path
) -> None:
    first = build_bundle(tmp_path, tiny_model_dir, colour_csv).name
    with TestClient(create_app(settings_for(tmp_path))) as c:
        assert len(c.post("/v1/search/text", json={"query": "red", "k": 100}).json()["results"]) == 8
        second = build_bundle(tmp_path, tiny_model_dir, small_csv).name
        r = c.post("/v1/admin/reload", headers=ADMIN)
        assert r.status_code == 200 and r.json() == {"bundle": second, "changed": True, "error": None}
        s = c.post("/v1/search/text", json={"query": "red", "k": 100})
        assert s.json()["bundle"] == second and len(s.json()["results"]) == 4
        assert c.get("/v1/info").json()["images"]["count"] == 4
        assert first != second
        again = c.post("/v1/admin/reload", headers=ADMIN).json()
        assert again["changed"] is False


def test_bundle_failing_verification_keeps_the_old_one(
    tmp_path: Path, tiny_model_dir: Path, colour_csv: Path, small_csv: Path
) -> None:
    first = build_bundle(tmp_path, tiny_model_dir, colour_csv).name
    with TestClient(create_app(settings_for(tmp_path, reload_poll_s=0.05))) as c:
        staged = build_bundle(tmp_path / "staging", tiny_model_dir, small_csv)  # out of the poller's sight
        with open(staged / "images.faiss", "ab") as f:
            f.write(b"\0")
        broken = staged.rename(tmp_path / staged.name)
        set_current(tmp_path, broken.name)
        r = c.post("/v1/admin/reload", headers=ADMIN)
        assert r.status_code == 409 and r.json()["error"]["code"] == "reload_failed"
        assert "images.faiss" in r.json()["error"]["message"]
        time.sleep(0.2)  # several polls: none may swap the broken bundle in
        assert c.get("/readyz").json()["bundle"] == first
        s = c.post("/v1/search/text", json={"query": "red", "k": 100})
        assert s.status_code == 200 and s.json()["bundle"] == first and len(s.json()["results"]) == 8
        assert 'clipsearch_reloads_total{outcome="failed"}' in c.get("/metrics").text


def test_polling_notices_a_new_current(
    tmp_path: Path, tiny_model_dir: Path, colour_csv: Path, small_csv: Path
) -> None:
    build_bundle(tmp_path, tiny_model_dir, colour_csv)
    with TestClient(create_app(settings_for(tmp_path, reload_poll_s=0.05))) as c:
        second = build_bundle(tmp_path, tiny_model_dir, small_csv).name
        wait_until(lambda: c.get("/readyz").json()["bundle"] == second)
    assert (tmp_path / ".leases" / second).is_dir()


def test_reload_under_concurrent_load_never_fails_or_mixes(
    tmp_path: Path, tiny_model_dir: Path, colour_csv: Path, small_csv: Path
) -> None:
    """Clients search while CURRENT flips between two bundles; every answer is whole and from one bundle."""
    big = build_bundle(tmp_path, tiny_model_dir, colour_csv).name
    small = build_bundle(tmp_path, tiny_model_dir, small_csv).name
    set_current(tmp_path, big)
    sizes = {big: 8, small: 4}
    with serving(create_app(settings_for(tmp_path))) as url:
        stop = time.monotonic() + 4.0
        image = helpers.png()

        def client_loop(i: int) -> list[tuple[int, str, int]]:
            seen = []
            with httpx.Client(base_url=url, timeout=30) as http:
                while time.monotonic() < stop:
                    if i % 2:
                        r = http.post("/v1/search/image", files={"file": ("q.png", image)}, data={"k": "100"})
                    else:
                        r = http.post("/v1/search/text", json={"query": f"square {i}", "k": 100})
                    body = r.json()
                    seen.append((r.status_code, body.get("bundle", ""), len(body.get("results", []))))
                    assert r.headers.get("x-bundle-version") == body.get("bundle")
            return seen

        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client_loop, i) for i in range(5)]
            reloads = 0
            with httpx.Client(base_url=url, headers=ADMIN, timeout=30) as admin:
                while time.monotonic() < stop:
                    set_current(tmp_path, small if reloads % 2 == 0 else big)
                    assert admin.post("/v1/admin/reload").status_code == 200
                    reloads += 1
                    time.sleep(0.1)
            results = [row for f in futures for row in f.result()]
    assert reloads >= 4
    assert len(results) > 20
    assert all(status == 200 for status, _, _ in results), {s for s, _, _ in results}
    assert all(count == sizes[bundle] for _, bundle, count in results)
    assert {bundle for _, bundle, _ in results} == {big, small}


@pytest.mark.parametrize("checksums", [True, False])
def test_loading_a_bundle_reads_the_weights_once(
    bundles_dir: Path, hashed: list[Path], checksums: bool
) -> None:
    """Verification hashes the weights and checks them against the manifest's fingerprint; the model load
    then trusts that fingerprint instead of hashing the same bytes again. Without checksums, the model load
    is what hashes them, so the fingerprint the service reports is still the weights' own."""
    state = ServiceState(settings_for(bundles_dir, verify_checksums=checksums))
    assert state.reload().error is None
    try:
        weights = [p for p in hashed if p.name == WEIGHTS_NAME]
        assert len(weights) == 1
        snap = state.current
        assert snap is not None and snap.encoder.info.fingerprint == model_fingerprint(snap.bundle.model_dir)
    finally:
        state.close()


def _damage(bundle: Path) -> None:
    with open(bundle / "images.faiss", "ab") as f:
        f.write(b"\0")


@pytest.mark.parametrize("current", ["damaged", "dangling", "empty"])
def test_a_fresh_start_whose_current_is_refused_serves_the_newest_bundle_that_verifies(
    tmp_path: Path, tiny_model_dir: Path, colour_csv: Path, small_csv: Path, caplog, current: str
) -> None:
    oldest = build_bundle(tmp_path, tiny_model_dir, small_csv).name
    good = build_bundle(tmp_path, tiny_model_dir, colour_csv).name
    bad = build_bundle(tmp_path, tiny_model_dir, small_csv)
    _damage(bad)  # the newest bundle does not verify
    names = {"damaged": bad.name, "dangling": "20990101T000000000000Z-ffffff", "empty": ""}
    (tmp_path / "CURRENT").write_text(names[current] + "\n")
    with (
        caplog.at_level("ERROR", logger="service.state"),
        TestClient(create_app(settings_for(tmp_path))) as c,
    ):
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["bundle"] == good != oldest
        fallback = ready.json()["fallback"]
        assert fallback["current"] == (names[current] or None) and fallback["reason"]
        assert c.get("/v1/info").json()["fallback"] == fallback
        hits = c.post("/v1/search/text", json={"query": "red", "k": 100}).json()
        assert hits["bundle"] == good and len(hits["results"]) == 8
        metrics = c.get("/metrics").text
        assert (
            "clipsearch_serving_fallback 1.0" in metrics and "clipsearch_bundle_refusals_total 1.0" in metrics
        )
        said = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
        assert f"serving {good} instead" in said and fallback["reason"] in said
        if current == "damaged":
            assert "images.faiss" in fallback["reason"]
        fixed = build_bundle(tmp_path, tiny_model_dir, small_csv).name  # publishing again ends it
        assert c.post("/v1/admin/reload", headers=ADMIN).json()["bundle"] == fixed
        assert c.get("/readyz").json()["fallback"] is None
        assert "clipsearch_serving_fallback 0.0" in c.get("/metrics").text


def test_a_running_server_keeps_its_bundle_and_logs_the_refusal_at_error(
    tmp_path: Path, tiny_model_dir: Path, colour_csv: Path, small_csv: Path, caplog
) -> None:
    first = build_bundle(tmp_path, tiny_model_dir, colour_csv).name
    with TestClient(create_app(settings_for(tmp_path))) as c:
        staged = build_bundle(tmp_path / "staging", tiny_model_dir, small_csv)
        _damage(staged)
        set_current(tmp_path, staged.rename(tmp_path / staged.name).name)
        with caplog.at_level("ERROR", logger="service.state"):
            assert c.post("/v1/admin/reload", headers=ADMIN).status_code == 409
        (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
        assert staged.name in record.getMessage() and "images.faiss" in record.getMessage()
        assert c.get("/readyz").json() == {"status": "ready", "bundle": first, "fallback": None}
