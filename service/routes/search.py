"""`POST /v1/search/text` and `POST /v1/search/image`: k-NN over the bundle's images or texts."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from service.auth import require_api_key
from service.deps import ServiceDep, mark_bundle, require_json, search_spec
from service.errors import ApiError
from service.routes.images_form import MULTIPART_DOC, run_image
from service.schemas import SearchResponse, TextSearchRequest, blank
from service.search import JobResult, TextJob

router = APIRouter(prefix="/v1/search", tags=["search"], dependencies=[Depends(require_api_key)])


def _response(request: Request, result: JobResult, start: float) -> SearchResponse:
    mark_bundle(request, result.bundle)
    took_ms = (time.perf_counter() - start) * 1000.0
    return SearchResponse(bundle=result.bundle, took_ms=round(took_ms, 3), results=result.hits or [])


# These handlers are `async def` on purpose: they only await the batcher, whose model thread does the
# encoding, so nothing here blocks the event loop.
@router.post("/text", dependencies=[Depends(require_json)])
async def search_text(body: TextSearchRequest, request: Request, service: ServiceDep) -> SearchResponse:
    """Text→image (`target` images) or text→text (`target` texts) search."""
    start = time.perf_counter()
    query = body.query.strip()
    if blank(query):
        raise ApiError(422, "empty_query", "query is empty")
    limit = service.settings.max_query_chars
    if len(body.query) > limit:
        raise ApiError(
            422, "query_too_long", f"query is {len(body.query):,} characters, over the limit of {limit:,}"
        )
    spec = search_spec(body, service.settings, service.state)
    result = await service.texts.submit(TextJob(texts=[query], search=spec))
    return _response(request, result, start)


@router.post("/image", openapi_extra=MULTIPART_DOC)
async def search_image(request: Request, service: ServiceDep) -> SearchResponse:
    """Image→image (`target` images) or image→text (`target` texts) search with a multipart `file`."""
    start = time.perf_counter()
    result = await run_image(request, service, search=True)
    return _response(request, result, start)
