"""Run the app under uvicorn, with read deadlines and a connection cap: what `clipsearch serve` calls."""

from __future__ import annotations

import logging
import resource

import uvicorn
from fastapi import FastAPI

from service.app import create_app
from service.connections import ConnectionGuard, GuardSettings, guarded_protocol
from service.settings import ServiceSettings

log = logging.getLogger(__name__)
_SPARE_FDS = 256  # files, sockets and pipes the process needs beside its client connections


def uvicorn_config(app: FastAPI, settings: ServiceSettings, **overrides: object) -> uvicorn.Config:
    """uvicorn's config for `app`: its HTTP protocol watched by a `ConnectionGuard` built from `settings`."""
    guard = ConnectionGuard(
        GuardSettings(
            header_timeout_s=settings.header_timeout_s,
            body_timeout_s=settings.body_timeout_s,
            max_connections=settings.max_connections,
            retry_after_s=settings.retry_after_s,
        ),
        metrics=app.state.metrics,
    )
    app.state.connection_guard = guard
    base = overrides.pop("http_base", None)
    protocol = guarded_protocol(guard) if base is None else guarded_protocol(guard, base)  # type: ignore[arg-type]
    options: dict[str, object] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "http": protocol,
        # Keep-alive longer than typical client pools, so closed-loop clients reuse connections.
        "timeout_keep_alive": settings.keep_alive_s,
        **overrides,
    }
    return uvicorn.Config(app, **options)  # type: ignore[arg-type]


def _allow_open_files(connections: int) -> None:
    """Raise the soft open-file limit so `max_connections` can be reached (never above the hard one)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = connections + _SPARE_FDS
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        if new < want:
            log.warning(
                "open files are limited to %d: fewer than max_connections=%d can be open", new, connections
            )


def run(settings: ServiceSettings) -> None:
    """Serve until interrupted. One process: the model is loaded once and batching needs one queue."""
    _allow_open_files(settings.max_connections)
    uvicorn.Server(uvicorn_config(create_app(settings), settings)).run()
