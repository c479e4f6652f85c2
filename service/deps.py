"""The objects a request handler reaches through `Depends`: settings, state, batchers, metrics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from indexer.core.bundle.filters import Filter, FilterError
from indexer.core.images import DecodeOptions
from service.batcher import MicroBatcher
from service.errors import ApiError
from service.metrics import Metrics
from service.schemas import SearchParams
from service.search import ImageJob, JobResult, SearchSpec, TextJob
from service.settings import ServiceSettings
from service.state import ServiceState


@dataclass
class Service:
    """Everything the lifespan builds once per process."""

    settings: ServiceSettings
    state: ServiceState
    metrics: Metrics
    texts: MicroBatcher[TextJob, JobResult]
    images: MicroBatcher[ImageJob, JobResult]
    decode_options: DecodeOptions


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


def mark_bundle(request: Request, version: str) -> None:
    """Record the bundle a request used; `BundleHeaderMiddleware` sends it as `X-Bundle-Version`."""
    request.state.bundle_version = version


def search_spec(params: SearchParams, settings: ServiceSettings, state: ServiceState) -> SearchSpec:
    """Check the bounds that are settings (not schema constants) and the filter, and build the spec."""
    if params.k > settings.max_k:
        raise ApiError(422, "invalid_request", f"k must be between 1 and {settings.max_k}, got {params.k}")
    if params.offset > settings.max_offset:
        raise ApiError(422, "invalid_request", f"offset must be between 0 and {settings.max_offset}")
    where = checked_filter(state, params.filter)
    return SearchSpec(params.target, params.k, params.offset, params.min_score, where, params.dedup)


def checked_filter(state: ServiceState, raw: object) -> Filter | None:
    """The request's `filter`, parsed and checked against the served bundle's fields (422 naming the
    field when it is wrong); None when there is none."""
    if raw is None:
        return None
    with state.lease() as snap:
        try:
            return snap.bundle.parse_filter(raw)
        except FilterError as e:
            raise ApiError(422, "invalid_filter", str(e)) from e


def require_json(request: Request) -> None:
    """Dependency of JSON routes: a body sent as anything but JSON is 415, not a confusing 422."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json" and not ctype.endswith("+json"):
        raise ApiError(
            415, "unsupported_media_type", f"send the body as application/json (got {ctype or 'none'})"
        )
