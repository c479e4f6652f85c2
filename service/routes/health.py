"""Liveness, readiness, `/v1/info` and the Prometheus `/metrics`."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.auth import require_api_key
from service.deps import ServiceDep, mark_bundle
from service.errors import not_ready
from service.schemas import (
    FallbackInfo,
    HealthResponse,
    IndexInfo,
    InfoResponse,
    ModelInfoResponse,
    ReadyResponse,
)
from service.state import ServiceState

router = APIRouter(tags=["health"])


@router.get("/healthz")
def healthz() -> HealthResponse:
    """The process is up (it may still be waiting for a bundle)."""
    return HealthResponse(status="ok")


def _fallback(state: ServiceState) -> FallbackInfo | None:
    fb = state.fallback
    return FallbackInfo(current=fb.current, reason=fb.reason) if fb is not None else None


@router.get("/readyz")
def readyz(request: Request, service: ServiceDep) -> ReadyResponse:
    """200 when a verified bundle is loaded (with `fallback` set while it is not the one CURRENT names),
    else 503 with the reason."""
    snap = service.state.current
    if snap is None:
        raise not_ready(service.state.last_error or "no bundle loaded", service.settings.retry_after_s)
    mark_bundle(request, snap.version)
    return ReadyResponse(status="ready", bundle=snap.version, fallback=_fallback(service.state))


@router.get("/metrics", response_class=Response)
def metrics(service: ServiceDep) -> Response:
    """Prometheus text format."""
    for name, batcher in (("text", service.texts), ("image", service.images)):
        service.metrics.queue_depth.labels(name).set(batcher.depth)
    service.metrics.fallback.set(1 if service.state.fallback is not None else 0)
    return Response(service.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get("/v1/info", dependencies=[Depends(require_api_key)])
def info(request: Request, service: ServiceDep) -> InfoResponse:
    """The bundle served, its model, item counts and the device queries run on."""
    with service.state.lease() as snap:
        mark_bundle(request, snap.version)
        m = snap.bundle.manifest
        model = snap.encoder.info
        s = service.settings
        types = snap.bundle.stack.field_types()
        return InfoResponse(
            bundle=snap.version,
            created_at=m.created_at,
            model=ModelInfoResponse(
                name=m.model.name,
                embed_dim=model.embed_dim,
                image_size=model.image_size,
                context_length=model.context_length,
                fingerprint=model.fingerprint,
            ),
            images=IndexInfo(
                count=m.images.count,
                factory=m.images.factory,
                metric=m.images.metric,
                recall_at_10=m.images.recall_at_10,
                recall_warning=m.images.recall_warning,
            ),
            texts=IndexInfo(
                count=m.texts.count,
                factory=m.texts.factory,
                metric=m.texts.metric,
                recall_at_10=m.texts.recall_at_10,
                recall_warning=m.texts.recall_warning,
            ),
            device=str(snap.encoder.device),
            max_k=s.max_k,
            max_query_chars=s.max_query_chars,
            max_body_bytes=s.max_body_bytes,
            loaded_at=snap.loaded_at,
            user_fields=list(types),
            user_field_types=types,
            fallback=_fallback(service.state),
        )
