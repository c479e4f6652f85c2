"""Admin key (401/403/disabled), the optional API key on query routes, and the CORS allow-list."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from tests.service.conftest import ADMIN_KEY, settings_for

API_KEY = "query-key"


def code(r: object) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]  # type: ignore[attr-defined]


def test_admin_needs_a_key(client: TestClient) -> None:
    r = client.post("/v1/admin/reload")
    assert code(r) == (401, "unauthorized") and r.headers["www-authenticate"] == "Bearer"


def test_admin_wrong_key(client: TestClient) -> None:
    assert code(client.post("/v1/admin/reload", headers={"Authorization": "Bearer nope"})) == (
        403,
        "forbidden",
    )
    assert code(client.post("/v1/admin/reload", headers={"Authorization": f"Basic {ADMIN_KEY}"})) == (
        401,
        "unauthorized",
    )


def test_admin_right_key(client: TestClient) -> None:
    r = client.post("/v1/admin/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status_code == 200 and r.json()["changed"] is False


def test_admin_disabled_without_a_configured_key(bundles_dir: Path) -> None:
    with TestClient(create_app(settings_for(bundles_dir, admin_key=None))) as c:
        r = c.post("/v1/admin/reload", headers={"Authorization": "Bearer anything"})
        assert code(r) == (403, "admin_disabled")


@pytest.fixture(scope="module")
def locked(bundles_dir: Path) -> Iterator[TestClient]:
    settings = settings_for(
        bundles_dir, api_key=API_KEY, cors_origins="https://app.example, https://b.example"
    )
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/v1/search/text"), ("POST", "/v1/embed/text"), ("GET", "/v1/items/0"), ("GET", "/v1/info")],
)
def test_api_key_protects_query_routes(locked: TestClient, method: str, path: str) -> None:
    body = {"query": "red"} if path.endswith("search/text") else {"texts": ["red"]}
    kw = {"json": body} if method == "POST" else {}
    assert code(locked.request(method, path, **kw)) == (401, "unauthorized")
    assert code(locked.request(method, path, headers={"Authorization": "Bearer bad"}, **kw)) == (
        403,
        "forbidden",
    )
    assert (
        locked.request(method, path, headers={"Authorization": f"Bearer {API_KEY}"}, **kw).status_code == 200
    )


@pytest.mark.parametrize("path", ["/v1/admin/reload", "/v1/search/text"])
def test_bearer_is_the_only_way_to_send_a_key(locked: TestClient, path: str) -> None:
    """The README documents one way for the page, the client and admin: `X-API-Key` is not another."""
    for key in (ADMIN_KEY, API_KEY):
        r = locked.post(path, headers={"X-API-Key": key}, json={"query": "red"})
        assert code(r) == (401, "unauthorized") and "Authorization: Bearer" in r.json()["error"]["message"]
        assert "X-API-Key is not accepted" in r.json()["error"]["message"]


def test_image_routes_need_the_api_key(locked: TestClient) -> None:
    assert code(locked.post("/v1/search/image", files={"file": ("a.png", b"x")})) == (401, "unauthorized")
    assert code(locked.post("/v1/search", files={"file": ("a.png", b"x")})) == (401, "unauthorized")
    assert code(locked.get("/v1/items/0/image")) == (401, "unauthorized")


def test_health_metrics_and_page_stay_open(locked: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/"):
        assert locked.get(path).status_code == 200


def test_cors_allows_listed_origins_only(locked: TestClient) -> None:
    pre = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST"}
    ok = locked.options(
        "/v1/search/text", headers={**pre, "Access-Control-Request-Headers": "authorization,content-type"}
    )
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://app.example"
    bad = locked.options("/v1/search/text", headers={**pre, "Origin": "https://evil.example"})
    assert bad.status_code == 400 and "access-control-allow-origin" not in bad.headers
    r = locked.get("/readyz", headers={"Origin": "https://b.example"})
    assert r.headers["access-control-allow-origin"] == "https://b.example"
    assert "x-bundle-version" in r.headers["access-control-expose-headers"].lower()
    assert (
        "access-control-allow-origin"
        not in locked.get("/readyz", headers={"Origin": "https://evil.example"}).headers
    )


def test_no_cors_headers_when_no_origins_configured(client: TestClient) -> None:
    r = client.get("/readyz", headers={"Origin": "https://app.example"})
    assert "access-control-allow-origin" not in r.headers
