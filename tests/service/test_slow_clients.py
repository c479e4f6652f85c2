"""Slow clients: header and body deadlines answer 408 and close, and past the connection cap a new
client still gets in (the longest-waiting unfinished connection makes room), under both of uvicorn's
HTTP protocols (httptools, the default when installed, and h11)."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.app import create_app
from tests.service import helpers
from tests.service.conftest import serving, settings_for

pytestmark = pytest.mark.timeout(120)
DEADLINE = 0.6  # seconds, for headers and bodies alike in these tests


@pytest.fixture(params=[HttpToolsProtocol, H11Protocol], ids=["httptools", "h11"])
def url(request: pytest.FixtureRequest, bundles_dir: Path) -> Iterator[str]:
    settings = settings_for(
        bundles_dir, header_timeout_s=DEADLINE, body_timeout_s=DEADLINE, max_connections=6
    )
    with serving(create_app(settings), http_base=request.param) as base:
        yield base


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    return sock


def _answer(sock: socket.socket, within: float = 8.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    start, data = time.monotonic(), b""
    sock.settimeout(within)
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.monotonic() - start


def _metrics(url: str) -> str:
    return httpx.get(f"{url}/metrics").text


def test_headers_that_trickle_get_408_and_the_connection_closes(url: str) -> None:
    sock = _connect(url)
    sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    data, took = _answer(sock)
    assert data.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in data and b"headers" in data
    assert took < DEADLINE + 3
    assert 'clipsearch_connections_closed_total{reason="header_timeout"}' in _metrics(url)


def test_a_connection_that_sends_nothing_is_closed(url: str) -> None:
    data, took = _answer(_connect(url))
    assert data == b"" and took < DEADLINE + 3


def test_a_body_that_stops_arriving_gets_408(url: str) -> None:
    sock = _connect(url)
    sock.sendall(
        b"POST /v1/search/text HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b'content-length: 100\r\n\r\n{"query": "re'
    )
    data, took = _answer(sock)
    assert data.startswith(b"HTTP/1.1 408 ") and b"body did not arrive" in data and took < DEADLINE + 3
    metrics = _metrics(url)
    assert 'clipsearch_connections_closed_total{reason="body_timeout"}' in metrics
    assert 'route="/v1/search/text",status="408"' in metrics


def test_an_upload_that_stalls_gets_408(url: str) -> None:
    image = helpers.png()
    head = (
        b"POST /v1/search/image HTTP/1.1\r\nHost: x\r\ncontent-type: multipart/form-data; boundary=b\r\n"
        + f"content-length: {len(image) + 200}\r\n\r\n".encode()
    )
    sock = _connect(url)
    sock.sendall(
        head + b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n' + image[:50]
    )
    data, _ = _answer(sock)
    assert data.startswith(b"HTTP/1.1 408 ")


def test_a_kept_alive_connection_gets_a_fresh_header_deadline(url: str) -> None:
    with httpx.Client(base_url=url) as http:  # a normal client is not disturbed by the deadlines
        for _ in range(3):
            assert http.post("/v1/search/text", json={"query": "red"}).status_code == 200
            time.sleep(DEADLINE * 1.5)  # idle longer than the header deadline: idle is not headers
    sock = _connect(url)
    sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(DEADLINE * 1.5)
    sock.sendall(b"GET /readyz HTTP/1.1\r\nHost: x\r\n")  # the next request starts, then stalls
    data, _ = _answer(sock)
    assert data.count(b"HTTP/1.1 200 ") == 1 and b"HTTP/1.1 408 " in data


def test_past_the_cap_a_new_client_gets_in_by_closing_the_longest_waiting(url: str) -> None:
    stalled = []
    for _ in range(8):  # more than max_connections, all stuck before their headers end
        sock = _connect(url)
        sock.sendall(b"GET /readyz HTTP/1.1\r\n")
        stalled.append(sock)
        time.sleep(0.02)
    r = httpx.post(f"{url}/v1/search/text", json={"query": "red"}, timeout=10)
    assert r.status_code == 200
    assert 'clipsearch_connections_closed_total{reason="evicted"}' in _metrics(url)
    for sock in stalled:
        sock.close()


def test_past_the_cap_with_every_connection_busy_a_new_one_gets_503(url: str) -> None:
    busy = []
    for _ in range(6):  # bodies being read: never evicted
        sock = _connect(url)
        sock.sendall(
            b"POST /v1/embed/text HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
            b"content-length: 50\r\n\r\n{"
        )
        busy.append(sock)
    time.sleep(0.1)
    data, _ = _answer(_connect(url))
    assert data.startswith(b"HTTP/1.1 503 ") and b"too_many_connections" in data and b"retry-after: 1" in data
    for sock in busy:
        sock.close()
    time.sleep(DEADLINE)
    assert httpx.get(f"{url}/readyz").status_code == 200
