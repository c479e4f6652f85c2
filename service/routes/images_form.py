"""Turning a multipart image upload into a queued `ImageJob` (shared by search and embed)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from indexer.core.errors import first_error
from service.deps import Service, search_spec
from service.errors import ApiError, not_ready
from service.schemas import SearchParams
from service.search import ImageJob, JobResult, SearchSpec
from service.uploads import decode_upload, form_value, read_form

# The form fields of an image search are `SearchParams`' fields, with their bounds from the same schema;
# an image to embed is the `file` alone.
_PARAMS = tuple(SearchParams.model_fields)
_FILE = {"file": {"type": "string", "format": "binary", "description": "The image."}}


def _multipart(properties: dict[str, Any]) -> dict[str, Any]:
    schema = {"type": "object", "required": ["file"], "additionalProperties": False, "properties": properties}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


_FILTER_FIELD = {
    "filter": {
        "type": "string",
        "description": "The search's filter object, JSON-encoded (docs/api.md, Filters).",
    }
}
MULTIPART_DOC = _multipart({**_FILE, **SearchParams.model_json_schema()["properties"], **_FILTER_FIELD})
EMBED_MULTIPART_DOC = _multipart(_FILE)


def parse_params(raw: dict[str, str]) -> SearchParams:
    values: dict[str, object] = {k: v for k, v in raw.items() if v != "" or k not in ("min_score", "filter")}
    if "filter" in values:
        try:
            values["filter"] = json.loads(str(values["filter"]))
        except ValueError as e:
            raise ApiError(422, "invalid_filter", f"filter: not valid JSON ({e})") from e
        if not isinstance(values["filter"], dict):
            raise ApiError(422, "invalid_filter", "filter: must be a JSON object of field: {operator: value}")
    try:
        return SearchParams.model_validate(values)
    except ValidationError as e:
        where, msg = first_error(e.errors())
        raise ApiError(422, "invalid_request", f"{where or 'form'}: {msg}") from e


async def run_image(request: Request, service: Service, search: bool) -> JobResult:
    """Read, decode and preprocess (in a thread) and queue the uploaded image."""
    snap = service.state.current
    if snap is None:
        raise not_ready(service.state.last_error or "no bundle loaded", service.settings.retry_after_s)
    encoder = snap.encoder
    form = await read_form(request)
    try:
        extra = [k for k in form if k != "file" and not (search and k in _PARAMS)]
        if extra:
            raise ApiError(422, "invalid_request", f"unknown form field(s): {', '.join(sorted(extra))}")
        spec: SearchSpec | None = None
        if search:
            raw = {k: v for k in _PARAMS if (v := form_value(form, k)) is not None}
            spec = search_spec(parse_params(raw), service.settings, service.state)
        upload = form.getlist("file")[0]
        assert isinstance(upload, UploadFile)
        # Preprocessing here runs in parallel across requests; the batch only stacks and encodes.
        decoded = await decode_upload(
            upload, service.decode_options, lambda img: encoder.preprocess_images([img])[0]
        )
    finally:
        await form.close()
    service.metrics.stage.labels("decode", "image").observe(decoded.decode_s)
    job = ImageJob(image=decoded.image, pixels=decoded.prepared, encoder_id=id(encoder), search=spec)
    return await service.images.submit(job)
