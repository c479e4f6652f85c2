"""Prometheus metrics: requests by route and status, per-stage latency, batch sizes, the bundle served.

Each app gets its own registry, so several apps (tests, benchmarks) can live in one process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

_STAGE_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The service's metric families, registered on one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "clipsearch_requests", "HTTP requests answered.", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "clipsearch_request_seconds",
            "HTTP request latency.",
            ["route"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.stage = Histogram(
            "clipsearch_stage_seconds",
            "Latency of one stage: decode (per image), encode and search (per batch).",
            ["stage", "kind"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "clipsearch_batch_size",
            "Queries per encoder batch.",
            ["kind"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.queue_depth = Gauge(
            "clipsearch_queue_depth", "Queries waiting per encoder queue.", ["kind"], registry=r
        )
        self.bundle = Info("clipsearch_bundle", "The bundle being served.", registry=r)
        self.bundle_loaded = Gauge(
            "clipsearch_bundle_loaded_timestamp_seconds", "When the served bundle was loaded.", registry=r
        )
        self.reloads = Counter("clipsearch_reloads", "Reload attempts by outcome.", ["outcome"], registry=r)
        self.refusals = Counter(
            "clipsearch_bundle_refusals", "Bundles refused (each bundle and reason once).", registry=r
        )
        self.open_connections = Gauge("clipsearch_open_connections", "HTTP connections open now.", registry=r)
        self.connections_closed = Counter(
            "clipsearch_connections_closed",
            "Connections the server closed: header_timeout, body_timeout, evicted (at the cap), refused.",
            ["reason"],
            registry=r,
        )
        self.fallback = Gauge(
            "clipsearch_serving_fallback",
            "1 while serving an older bundle because the one CURRENT names was refused at start-up.",
            registry=r,
        )

    @contextmanager
    def time_stage(self, stage: str, kind: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.stage.labels(stage, kind).observe(time.perf_counter() - start)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """Counts every request by route template (not raw path, to keep label cardinality bounded)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            name = getattr(route, "path", None) or "unmatched"
            status = 408 if scope.get("clipsearch.timed_out") else status  # the server answered 408 itself
            self.metrics.requests.labels(scope["method"], name, str(status)).inc()
            self.metrics.latency.labels(name).observe(time.perf_counter() - start)
