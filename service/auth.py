"""Bearer-key checks: the admin key for /v1/admin/*, the optional API key for query routes.

`Authorization: Bearer KEY` is the one way to send a key, the same for the page, the Python client and
the admin routes. Keys are compared in constant time. No admin key configured disables the admin routes.
"""

from __future__ import annotations

import hmac

from fastapi import Request

from service.errors import ApiError

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _presented_key(request: Request) -> str | None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None


def _unauthorized(which: str, request: Request) -> ApiError:
    hint = " (X-API-Key is not accepted)" if "x-api-key" in request.headers else ""
    return ApiError(401, "unauthorized", f"send Authorization: Bearer <{which} key>{hint}", _CHALLENGE)


def _matches(presented: str, expected: str) -> bool:
    return hmac.compare_digest(presented.encode(), expected.encode())


def require_admin(request: Request) -> None:
    """Dependency of admin routes: 403 when disabled, 401 without a key, 403 with a wrong one."""
    expected = request.app.state.settings.admin_key
    if not expected:
        raise ApiError(
            403, "admin_disabled", "admin routes are disabled: set CLIPSEARCH_ADMIN_KEY to enable them"
        )
    presented = _presented_key(request)
    if presented is None:
        raise _unauthorized("admin", request)
    if not _matches(presented, expected):
        raise ApiError(403, "forbidden", "the admin key is not valid")


def require_api_key(request: Request) -> None:
    """Dependency of query routes: open when no API key is configured; the admin key is accepted too."""
    settings = request.app.state.settings
    if not settings.api_key:
        return
    presented = _presented_key(request)
    if presented is None:
        raise _unauthorized("api", request)
    valid = _matches(presented, settings.api_key)
    if settings.admin_key:
        valid = _matches(presented, settings.admin_key) or valid
    if not valid:
        raise ApiError(403, "forbidden", "the API key is not valid")
