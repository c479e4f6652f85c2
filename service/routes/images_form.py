"""Turning a multipart image upload into a queued `ImageJob` (shared by search and embed)."""

from __future__ import annotations

import json
from collections.abc import Callable, Collection
from dataclasses import replace
from typing import Any, TypeVar

from fastapi import Request
from pydantic import ValidationError
from starlette.datastructures import UploadFile

from indexer.core.errors import first_error
from service.deps import Service, search_spec
from service.errors import ApiError, not_ready
from service.schemas import ImageQueryForm, SearchParams
from service.search import ImageJob, JobResult, SearchSpec
from service.uploads import decode_upload, form_value, read_form

# The form fields of an image search are `SearchParams`' fields, with their bounds from the same schema;
# an image to embed is the `file` alone.
_PARAMS = tuple(SearchParams.model_fields)
P = TypeVar("P", bound=SearchParams)
T = TypeVar("T")
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
# The multipart variant of `POST /v1/search`: the image is one term, `terms` (JSON-encoded) the others.
TERMS_FIELDS = (*_PARAMS, "terms", "weight")
TERMS_MULTIPART_DOC = _multipart(
    {
        **_FILE,
        "terms": {
            "type": "string",
            "description": 'More terms, a JSON-encoded list as in the JSON body (e.g. [{"text": "people", '
            '"weight": -0.5}]); optional.',
        },
        "weight": ImageQueryForm.model_json_schema()["properties"]["weight"],
        **SearchParams.model_json_schema()["properties"],
        **_FILTER_FIELD,
    }
)


_BLANK_IS_NONE = ("min_score", "filter", "terms")
# Form fields that carry JSON, and the JSON type each must be.
_JSON_FIELDS: dict[str, tuple[type, str]] = {
    "filter": (dict, "a JSON object of field: {operator: value}"),
    "terms": (list, 'a JSON list of terms such as [{"text": "beach", "weight": -0.5}]'),
}


def parse_params(raw: dict[str, str], model: type[P]) -> P:
    """The form fields as `model`; JSON-encoded fields decoded first (bad JSON: a 422 naming the field)."""
    # An empty optional field is left out, as an HTML form sends a blank input.
    values: dict[str, object] = {k: v for k, v in raw.items() if v != "" or k not in _BLANK_IS_NONE}
    for name, (kind, what) in _JSON_FIELDS.items():
        if name not in values:
            continue
        code = "invalid_filter" if name == "filter" else "invalid_request"
        try:
            values[name] = json.loads(str(values[name]))
        except ValueError as e:
            raise ApiError(422, code, f"{name}: not valid JSON ({e})") from e
        if not isinstance(values[name], kind):
            raise ApiError(422, code, f"{name}: must be {what}")
    try:
        return model.model_validate(values)
    except ValidationError as e:
        where, msg = first_error(e.errors())
        raise ApiError(422, "invalid_request", f"{where or 'form'}: {msg}") from e


async def image_job(
    request: Request, service: Service, fields: Collection[str], parse: Callable[[dict[str, str]], T]
) -> tuple[T, ImageJob]:
    """Read the multipart form (a `file` and the form `fields`), `parse` the fields (before any decoding,
    so bad options are refused cheaply), then decode and preprocess the image in a thread."""
    snap = service.state.current
    if snap is None:
        raise not_ready(service.state.last_error or "no bundle loaded", service.settings.retry_after_s)
    encoder = snap.encoder
    form = await read_form(request)
    try:
        extra = [k for k in form if k != "file" and k not in fields]
        if extra:
            raise ApiError(422, "invalid_request", f"unknown form field(s): {', '.join(sorted(extra))}")
        parsed = parse({k: v for k in fields if (v := form_value(form, k)) is not None})
        upload = form.getlist("file")[0]
        assert isinstance(upload, UploadFile)
        # Preprocessing here runs in parallel across requests; the batch only stacks and encodes.
        decoded = await decode_upload(
            upload, service.decode_options, lambda img: encoder.preprocess_images([img])[0]
        )
    finally:
        await form.close()
    service.metrics.stage.labels("decode", "image").observe(decoded.decode_s)
    return parsed, ImageJob(image=decoded.image, pixels=decoded.prepared, encoder_id=id(encoder))


async def run_image(request: Request, service: Service, search: bool) -> JobResult:
    """Read, decode and preprocess (in a thread) and queue the uploaded image."""

    def spec(raw: dict[str, str]) -> SearchSpec | None:
        return (
            search_spec(parse_params(raw, SearchParams), service.settings, service.state) if search else None
        )

    where, job = await image_job(request, service, _PARAMS if search else (), spec)
    return await service.images.submit(replace(job, search=where))
