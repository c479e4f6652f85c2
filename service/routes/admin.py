"""`POST /v1/admin/reload`: switch to the bundle CURRENT names now (admin key required)."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Depends, Request

from service.auth import require_admin
from service.deps import ServiceDep, mark_bundle
from service.errors import ApiError
from service.schemas import ReloadResponse

router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(require_admin)])


@router.post("/reload")
async def reload(request: Request, service: ServiceDep) -> ReloadResponse:
    """Load CURRENT if it changed. A bundle that fails verification is refused (409) and the old one stays."""
    result = await anyio.to_thread.run_sync(service.state.reload, True)
    service.metrics.reloads.labels(
        "failed" if result.error else "changed" if result.changed else "unchanged"
    ).inc()
    if result.version is not None:
        mark_bundle(request, result.version)
    if result.error is not None:
        served = result.version or "nothing"
        raise ApiError(409, "reload_failed", f"{result.error} (still serving {served})")
    return ReloadResponse(bundle=result.version, changed=result.changed)
