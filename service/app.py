"""`create_app(settings)`: the FastAPI app factory; its lifespan loads the bundle and starts the batchers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import TypeVar

import anyio
import torch
from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware
from fastapi.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from indexer.core.images import DecodeOptions
from service.batcher import MicroBatcher
from service.deps import Service
from service.errors import install_error_handlers
from service.metrics import Metrics, RequestMetricsMiddleware
from service.routes import admin, embed, facets, health, items, pages, search
from service.routes.pages import STATIC_DIR
from service.schemas import ERROR_RESPONSES
from service.search import BatchRunner, ImageJob, JobResult, TextJob
from service.settings import ServiceSettings
from service.state import ServiceState, Snapshot
from service.uploads import BodyLimitMiddleware

log = logging.getLogger(__name__)

BUNDLE_HEADER = "X-Bundle-Version"
JobT = TypeVar("JobT")


class BundleHeaderMiddleware:
    """Adds `X-Bundle-Version` to every response whose handler used a bundle (see `deps.mark_bundle`)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                version = scope.get("state", {}).get("bundle_version")
                if version:
                    message["headers"] = [
                        *message.get("headers", []),
                        (b"x-bundle-version", version.encode()),
                    ]
            await send(message)

        await self.app(scope, receive, send_wrapper)


def _build_service(settings: ServiceSettings, metrics: Metrics, executor: ThreadPoolExecutor) -> Service:
    def on_swap(snap: Snapshot) -> None:
        metrics.bundle.info({"version": snap.version, "model": snap.bundle.manifest.model.name})
        metrics.bundle_loaded.set(snap.loaded_at)

    state = ServiceState(settings, on_swap=on_swap, on_refuse=lambda reason: metrics.refusals.inc())
    runner = BatchRunner(state, metrics)
    texts: MicroBatcher[TextJob, JobResult] = _batcher("text", runner.run_texts, executor, settings, metrics)
    images: MicroBatcher[ImageJob, JobResult] = _batcher(
        "image", runner.run_images, executor, settings, metrics
    )
    return Service(settings, state, metrics, texts, images, DecodeOptions(max_pixels=settings.max_pixels))


def _batcher(
    kind: str,
    process: Callable[[Sequence[JobT]], Sequence[JobResult | BaseException]],
    executor: ThreadPoolExecutor,
    settings: ServiceSettings,
    metrics: Metrics,
) -> MicroBatcher[JobT, JobResult]:
    return MicroBatcher(
        kind,
        process,
        executor,
        max_size=settings.batch_max_size,
        max_wait_ms=settings.batch_max_wait_ms,
        queue_size=settings.queue_size,
        retry_after_s=settings.retry_after_s,
        workers=settings.batch_workers,
        on_batch=metrics.batch_size.labels(kind).observe,
    )


async def _watch_current(service: Service) -> None:
    """Poll CURRENT and swap in a new bundle when it changes (and keep retrying while none is loaded)."""
    interval = service.settings.reload_poll_s
    while True:
        await asyncio.sleep(interval)
        try:
            result = await anyio.to_thread.run_sync(service.state.reload)
        except Exception:  # never let the watcher die; the next poll tries again
            log.exception("bundle reload crashed")
            continue
        if result.changed:
            service.metrics.reloads.labels("changed").inc()


def create_app(settings: ServiceSettings | None = None) -> FastAPI:
    """The clipsearch service. Settings default to `CLIPSEARCH_*` environment variables."""
    settings = settings or ServiceSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.threads:
            torch.set_num_threads(settings.threads)
        metrics: Metrics = app.state.metrics
        with ThreadPoolExecutor(settings.batch_workers, thread_name_prefix="clipsearch-model") as executor:
            service = _build_service(settings, metrics, executor)
            app.state.service = service
            start = time.perf_counter()
            result = await anyio.to_thread.run_sync(service.state.reload)
            log.info("startup load: %s in %.2fs", result, time.perf_counter() - start)
            service.texts.start()
            service.images.start()
            watcher = asyncio.create_task(_watch_current(service)) if settings.reload_poll_s > 0 else None
            try:
                yield
            finally:
                if watcher is not None:
                    watcher.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watcher
                await service.texts.stop()
                await service.images.stop()
                service.state.close()

    app = FastAPI(
        title="clipsearch",
        summary="Text→image, image→text and image→image search over a FAISS bundle.",
        version="1",
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    install_error_handlers(app)
    for module in (health, search, embed, items, facets, admin, pages):
        app.include_router(module.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    # Added inner to outer: the metrics middleware sees every answer, CORS headers reach errors too.
    app.add_middleware(BundleHeaderMiddleware)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
            expose_headers=[BUNDLE_HEADER, "Retry-After"],
            max_age=600,
        )
    app.add_middleware(RequestMetricsMiddleware, metrics=app.state.metrics)
    return app
