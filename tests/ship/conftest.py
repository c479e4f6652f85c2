"""Fixtures for the shipping checks: a stand-in /readyz server for running healthcheck probes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest


class ReadyzStub:
    """A loopback HTTP server whose every answer has status `status`; it records the paths asked."""

    def __init__(self) -> None:
        self.status = 200
        self.paths: list[str] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stub.paths.append(self.path)
                body = b'{"status": "ready"}' if stub.status == 200 else b'{"error": {"code": "not_ready"}}'
                self.send_response(stub.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:  # keep test output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def readyz_stub() -> Iterator[ReadyzStub]:
    stub = ReadyzStub()
    yield stub
    stub.close()
