"""The base of every error a user can cause, and the one way a pydantic validation error becomes a line."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


class ClipsearchError(Exception):
    """Something the user can fix: bad input, a missing file, an inconsistent artifact."""


def error_location(error: Mapping[str, Any], skip: Sequence[str] = ()) -> str:
    """`a.b.0` for one pydantic error's `loc`, leaving out leading parts named in `skip` (e.g. `body`)."""
    loc = [str(p) for p in error.get("loc", ())]
    if loc and loc[0] in skip:
        loc = loc[1:]
    return ".".join(loc)


def first_error(errors: Sequence[Mapping[str, Any]], skip: Sequence[str] = ()) -> tuple[str, str]:
    """(where, message) of the first of pydantic's `ValidationError.errors()`; where is '' at the root."""
    if not errors:
        return "", "is invalid"
    return error_location(errors[0], skip), str(errors[0].get("msg", "is invalid"))
