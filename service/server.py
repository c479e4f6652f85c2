"""Run the app under uvicorn: what `clipsearch serve` calls."""

from __future__ import annotations

import uvicorn

from service.app import create_app
from service.settings import ServiceSettings


def run(settings: ServiceSettings) -> None:
    """Serve until interrupted. One process: the model is loaded once and batching needs one queue."""
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # Keep-alive longer than typical client pools, so closed-loop clients reuse connections.
        timeout_keep_alive=30,
    )
