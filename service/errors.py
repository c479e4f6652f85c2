"""The one error shape of the API, `{"error": {"code", "message"}}`, and the handlers that produce it."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from indexer.core.errors import error_location

log = logging.getLogger(__name__)

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "unavailable",
}


class ApiError(HTTPException):
    """An error answered as JSON with a stable machine-readable `code`.

    A subclass of Starlette's HTTPException so FastAPI re-raises it untouched even from body parsing.
    """

    def __init__(
        self, status_code: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(status_code=status_code, detail=message, headers=dict(headers or {}))
        self.code = code
        self.message = message


def not_ready(reason: str, retry_after_s: int = 1) -> ApiError:
    return ApiError(503, "not_ready", reason, {"Retry-After": str(retry_after_s)})


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def error_response(
    status: int, code: str, message: str, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(error_body(code, message), status_code=status, headers=dict(headers or {}))


def _describe(err: Mapping[str, Any]) -> tuple[str, str]:
    """(code, one-line message) for the first pydantic/FastAPI validation error."""
    # The first part of `loc` says where in the request (body, query...), not which field.
    where = error_location(err, skip=("body", "query", "path", "header", "cookie")) or "body"
    if err.get("type") == "json_invalid":
        detail = err.get("ctx", {}).get("error", "")
        return "malformed_json", f"the request body is not valid JSON: {detail}".rstrip(": ")
    if err.get("type") == "missing":
        return "missing_field", f"{where} is required"
    return "invalid_request", f"{where}: {err.get('msg', 'is invalid')}"


async def _validation_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    code, message = _describe(errors[0]) if errors else ("invalid_request", "invalid request")
    return error_response(422, code, message)


async def _http_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if isinstance(exc, ApiError):
        return error_response(exc.status_code, exc.code, exc.message, exc.headers)
    code = _STATUS_CODES.get(exc.status_code, "error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return error_response(exc.status_code, code, message, exc.headers)


async def _unhandled(request: Request, exc: Exception) -> JSONResponse:
    # Only our own bugs get here; the client still gets the one JSON error shape.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal server error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(HTTPException, _http_handler)
    app.add_exception_handler(Exception, _unhandled)
