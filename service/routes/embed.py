"""`POST /v1/embed/text` and `POST /v1/embed/image`: the vectors, for users who keep their own index."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request

from service.auth import require_api_key
from service.deps import ServiceDep, mark_bundle, require_json
from service.errors import ApiError
from service.routes.images_form import EMBED_MULTIPART_DOC, run_image
from service.schemas import EmbedResponse, EmbedTextRequest, blank
from service.search import JobResult, TextJob

router = APIRouter(prefix="/v1/embed", tags=["embed"], dependencies=[Depends(require_api_key)])


def _response(request: Request, result: JobResult, start: float) -> EmbedResponse:
    mark_bundle(request, result.bundle)
    return EmbedResponse(
        bundle=result.bundle,
        took_ms=round((time.perf_counter() - start) * 1000.0, 3),
        model=result.model,
        dim=int(result.embeddings.shape[1]),
        embeddings=result.embeddings.tolist(),
    )


@router.post("/text", dependencies=[Depends(require_json)])
async def embed_text(body: EmbedTextRequest, request: Request, service: ServiceDep) -> EmbedResponse:
    """Embed up to `max_embed_texts` texts; empty texts and texts over the length limit are refused."""
    start = time.perf_counter()
    settings = service.settings
    if len(body.texts) > settings.max_embed_texts:
        raise ApiError(422, "too_many_texts", f"send at most {settings.max_embed_texts} texts per call")
    for i, text in enumerate(body.texts):
        if blank(text):
            raise ApiError(422, "empty_query", f"texts[{i}] is empty")
        if len(text) > settings.max_query_chars:
            raise ApiError(
                422,
                "query_too_long",
                f"texts[{i}] is over the limit of {settings.max_query_chars:,} characters",
            )
    result = await service.texts.submit(TextJob(texts=[t.strip() for t in body.texts]))
    return _response(request, result, start)


@router.post("/image", openapi_extra=EMBED_MULTIPART_DOC)
async def embed_image(request: Request, service: ServiceDep) -> EmbedResponse:
    """Embed one uploaded image (multipart `file`)."""
    start = time.perf_counter()
    result = await run_image(request, service, search=False)
    return _response(request, result, start)
