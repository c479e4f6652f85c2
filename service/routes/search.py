"""`POST /v1/search/text`, `POST /v1/search/image` and `POST /v1/search` (weighted terms; as multipart, with
an uploaded image among them): k-NN over the bundle's images or texts."""

from __future__ import annotations

import time
from collections.abc import Sequence

import anyio
import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.routing import APIRoute
from starlette.routing import Match
from starlette.types import Scope

from service.auth import require_api_key
from service.deps import Service, ServiceDep, mark_bundle, require_json, search_spec
from service.errors import ApiError
from service.routes.images_form import (
    MULTIPART_DOC,
    TERMS_FIELDS,
    TERMS_MULTIPART_DOC,
    image_job,
    parse_params,
    run_image,
)
from service.schemas import (
    ImageQueryForm,
    QuerySearchRequest,
    SearchResponse,
    SearchTerm,
    TextSearchRequest,
    blank,
)
from service.search import ImageJob, JobResult, SearchSpec, TextJob, combine, search_vector
from service.state import Snapshot

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


class MultipartRoute(APIRoute):
    """A route that matches only multipart bodies, so one path serves a JSON and a multipart variant."""

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        match, child = super().matches(scope)
        ctype = dict(scope.get("headers") or []).get(b"content-type", b"")
        if match is Match.NONE or not ctype.lower().startswith(b"multipart/form-data"):
            return Match.NONE, {}
        return match, child


async def search_terms_image(request: Request, service: ServiceDep) -> SearchResponse:
    """`POST /v1/search` as multipart: the uploaded `file` is a term of weight `weight`, added to `terms`."""
    start = time.perf_counter()

    def parse(raw: dict[str, str]) -> tuple[ImageQueryForm, SearchSpec]:
        form = parse_params(raw, ImageQueryForm)
        _check_terms(form.terms, service)
        return form, search_spec(form, service.settings, service.state)

    (form, spec), job = await image_job(request, service, TERMS_FIELDS, parse)
    return await _search(request, service, start, form.terms, spec, (job, form.weight))


# Registered first: a multipart body goes here, anything else to the JSON route below.
router.add_api_route(
    "",
    search_terms_image,
    methods=["POST"],
    include_in_schema=False,  # documented as the JSON route's second content type
    route_class_override=MultipartRoute,
)


@router.post("", dependencies=[Depends(require_json)], openapi_extra=TERMS_MULTIPART_DOC)
async def search_terms(body: QuerySearchRequest, request: Request, service: ServiceDep) -> SearchResponse:
    """Search with a weighted sum of texts, items of the bundle and vectors (query arithmetic); as
    multipart, with an uploaded image (`file`, weight `weight`) and the other terms JSON-encoded."""
    start = time.perf_counter()
    _check_terms(body.terms, service)
    spec = search_spec(body, service.settings, service.state)
    return await _search(request, service, start, body.terms, spec)


def _check_terms(terms: Sequence[SearchTerm], service: Service) -> None:
    for i, term in enumerate(terms):
        if term.text is not None:
            _term_text(term.text, f"terms[{i}].text", service)
    for i, term in enumerate(terms):
        given = sum(x is not None for x in (term.text, term.item, term.vector))
        if given != 1:
            raise ApiError(422, "invalid_request", f"terms[{i}]: give exactly one of text, item or vector")


async def _search(
    request: Request,
    service: Service,
    start: float,
    terms: Sequence[SearchTerm],
    spec: SearchSpec,
    image: tuple[ImageJob, float] | None = None,
) -> SearchResponse:
    """Encode the texts (and the image), combine every term with its weight, search."""
    texts = [t.text.strip() for t in terms if t.text is not None]
    for _ in range(3):  # a reload between encoding and searching: encode again with the new model
        encoded = await service.texts.submit(TextJob(texts=texts)) if texts else None
        pic = await service.images.submit(image[0]) if image is not None else None
        with service.state.lease() as snap:
            if any(e is not None and e.bundle != snap.version for e in (encoded, pic)):
                continue
            rows = list(terms)
            if pic is not None and image is not None:  # the image last, so terms[i] keep their index
                rows.append(
                    SearchTerm(text=None, item=None, vector=pic.embeddings[0].tolist(), weight=image[1])
                )
            text_emb = encoded.embeddings if encoded is not None else None
            query = await anyio.to_thread.run_sync(_query_vector, snap, rows, text_emb)
            hits = await anyio.to_thread.run_sync(search_vector, snap, query, spec)
            mark_bundle(request, snap.version)
            took_ms = (time.perf_counter() - start) * 1000.0
            return SearchResponse(bundle=snap.version, took_ms=round(took_ms, 3), results=hits)
    raise ApiError(
        503, "not_ready", "the bundle changed while the query was encoded; retry", {"Retry-After": "1"}
    )


def _term_text(text: str, where: str, service: Service) -> str:
    if blank(text):
        raise ApiError(422, "empty_query", f"{where} is empty")
    limit = service.settings.max_query_chars
    if len(text) > limit:
        raise ApiError(
            422, "query_too_long", f"{where} is {len(text):,} characters, over the limit of {limit:,}"
        )
    return text.strip()


def _query_vector(snap: Snapshot, terms: Sequence[SearchTerm], text_emb: np.ndarray | None) -> np.ndarray:
    """Each term's unit vector (its text embedded, an item's stored vector, a given vector), combined."""
    bundle = snap.bundle
    dim = bundle.manifest.model.embed_dim
    rows: list[np.ndarray] = []
    n_text = 0
    for i, term in enumerate(terms):
        if term.text is not None:
            assert text_emb is not None
            rows.append(text_emb[n_text])
            n_text += 1
        elif term.item is not None:
            item = bundle.items.get(term.item)
            if item is None:
                raise ApiError(
                    422, "item_not_found", f"terms[{i}].item: no item {term.item} in bundle {snap.version}"
                )
            rows.append(bundle.stack.vectors("images" if item.kind == "image" else "texts", [item.id])[0])
        else:
            vec = np.asarray(term.vector, np.float64)
            if vec.shape != (dim,) or not np.isfinite(vec).all() or not np.any(vec):
                raise ApiError(
                    422, "invalid_request", f"terms[{i}].vector: must be {dim} finite numbers, not all zero"
                )
            rows.append(vec.astype(np.float32))
    query = combine(np.stack(rows), [t.weight for t in terms])
    if query is None:
        raise ApiError(422, "empty_query", "the terms cancel out: their weighted sum has no direction")
    return query
