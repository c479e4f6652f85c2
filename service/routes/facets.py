"""`GET /v1/facets`: value counts of one metadata field over the items a filter keeps (page refiners)."""

from __future__ import annotations

import json

from fastapi import APIRouter, Depends, Query, Request

from indexer.core.bundle.filters import FilterError, parse_filter
from indexer.core.bundle.items import BUILTIN_FIELDS
from service.auth import require_api_key
from service.deps import ServiceDep, mark_bundle
from service.errors import ApiError
from service.schemas import FacetsResponse, FacetValue, Target

router = APIRouter(prefix="/v1", tags=["facets"], dependencies=[Depends(require_api_key)])

MAX_FACET_VALUES = 1000


@router.get("/facets")
def facets(
    request: Request,
    service: ServiceDep,
    field: str = Query(description="A built-in field (camera, folder, width, ...) or a user field."),
    target: Target = Query("images"),
    filter: str | None = Query(None, description="A filter object, JSON-encoded: counts over what it keeps."),
    limit: int = Query(
        50, ge=1, le=MAX_FACET_VALUES, description="At most this many values, most common first."
    ),
) -> FacetsResponse:
    """How many items have each value of `field`, most common first (ties by value)."""
    with service.state.lease() as snap:
        mark_bundle(request, snap.version)
        bundle = snap.bundle
        names = bundle.stack.field_names()
        if field not in BUILTIN_FIELDS and field not in names:
            known = ", ".join(sorted(names)[:20]) or "none"
            raise ApiError(
                422,
                "invalid_filter",
                f"field: unknown field {field!r}; built-in: {', '.join(BUILTIN_FIELDS)}; "
                f"user fields: {known}",
            )
        try:
            where = parse_filter(json.loads(filter), names) if filter else None
        except ValueError as e:
            if isinstance(e, FilterError):
                raise ApiError(422, "invalid_filter", str(e)) from e
            raise ApiError(422, "invalid_filter", f"filter: not valid JSON ({e})") from e
        counts = bundle.facets(target, field, where)
        ordered = sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))
        return FacetsResponse(
            bundle=snap.version,
            field=field,
            target=target,
            matching=bundle.matching(target, where),
            values=[FacetValue(value=v, count=n) for v, n in ordered[:limit]],
            truncated=len(ordered) > limit,
        )
