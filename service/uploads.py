"""Request bodies: the size limit (enforced while reading, with or without Content-Length), the
multipart image upload, and decoding it off the event loop with the shared decoder."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import anyio
from fastapi import Request
from PIL import Image
from starlette.datastructures import FormData, UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from indexer.core.images import DecodeOptions, ImageError, load_image
from service.errors import ApiError, error_response

# ImageError codes -> HTTP status: a format outside the allow-list is 415, a bomb is 413.
_IMAGE_STATUS = {"unsupported_format": 415, "too_many_pixels": 413}
_MAX_FORM_FIELDS = 16


def body_too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"the request body is over the limit of {limit:,} bytes")


class BodyLimitMiddleware:
    """Refuse bodies over `max_bytes`: at once from Content-Length, else as soon as the stream passes it."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            err = body_too_large(self.max_bytes)
            await error_response(413, err.code, err.message, {"Connection": "close"})(scope, receive, send)
            return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise body_too_large(self.max_bytes)  # handled by the app's ApiError handler
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except ApiError as e:  # raised outside any handler's reach (e.g. by another middleware)
            if started or e.status_code != 413:
                raise
            await error_response(413, e.code, e.message)(scope, receive, send)


def _require_multipart(request: Request) -> None:
    ctype = request.headers.get("content-type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise ApiError(
            415,
            "unsupported_media_type",
            f"send the image as multipart/form-data (got {ctype or 'no content type'})",
        )


async def read_form(request: Request) -> FormData:
    """The multipart form, parsed under the body limit; one `file` part required."""
    _require_multipart(request)
    try:
        form = await request.form(max_files=2, max_fields=_MAX_FORM_FIELDS)
    except ApiError:
        raise
    except Exception as e:  # malformed multipart, too many parts
        detail = getattr(e, "detail", None) or str(e) or type(e).__name__
        raise ApiError(400, "malformed_form", f"cannot parse the multipart body: {detail}") from e
    files = [v for v in form.getlist("file") if isinstance(v, UploadFile)]
    if not files:
        await form.close()
        raise ApiError(422, "missing_file", "send the image as a multipart file field named 'file'")
    if len(files) > 1 or sum(isinstance(v, UploadFile) for _, v in form.multi_items()) > 1:
        await form.close()
        raise ApiError(422, "too_many_files", "send exactly one file, in the field 'file'")
    return form


def form_value(form: FormData, name: str) -> str | None:
    values = form.getlist(name)
    if len(values) > 1:
        raise ApiError(422, "invalid_request", f"{name} was given {len(values)} times")
    if not values:
        return None
    value = values[0]
    if not isinstance(value, str):
        raise ApiError(422, "invalid_request", f"{name} must be a form field, not a file")
    return value


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image
    decode_s: float
    prepared: Any = None


async def decode_upload(
    upload: UploadFile, options: DecodeOptions, prepare: Callable[[Image.Image], Any] | None = None
) -> DecodedImage:
    """Decode the uploaded file with the shared decoder, then `prepare` it, in a worker thread."""

    def work() -> DecodedImage:
        start = time.perf_counter()
        upload.file.seek(0)
        try:
            image = load_image(upload.file, options)
        except ImageError as e:
            raise ApiError(_IMAGE_STATUS.get(e.code, 400), e.code, e.message) from e
        decode_s = time.perf_counter() - start
        return DecodedImage(image, decode_s, prepare(image) if prepare is not None else None)

    return await anyio.to_thread.run_sync(work)
