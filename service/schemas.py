"""Request and response bodies of the HTTP API (docs/api.md), with their bounds written once, here."""

from __future__ import annotations

import unicodedata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Target = Literal["images", "texts"]

# Characters that carry no text: controls (NUL included), format characters (zero-width space, BOM) and
# lone surrogates. A query made only of these and whitespace is empty.
_INVISIBLE = frozenset({"Cc", "Cf", "Cs"})


def blank(text: str) -> bool:
    """True when `text` holds nothing to search with: only whitespace and invisible characters."""
    return all(c.isspace() or unicodedata.category(c) in _INVISIBLE for c in text)


class SearchParams(BaseModel):
    """Options every search takes. `k` and `offset` are also bounded by the server's settings."""

    model_config = ConfigDict(extra="forbid")

    k: int = Field(10, ge=1, description="How many results (at most the server's max_k).")
    target: Target = Field("images", description="Search the images or the texts of the bundle.")
    min_score: float | None = Field(None, ge=-1.0, le=1.0, description="Drop results scoring below this.")
    offset: int = Field(0, ge=0, description="Skip this many of the best results (paging).")
    dedup: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Collapse results whose cosine similarity to a better result already returned is at "
        "least this (e.g. 0.95: a burst of near-identical photos shows once).",
    )
    filter: dict[str, Any] | None = Field(
        None,
        description="Keep only items whose metadata matches (docs/api.md, Filters), e.g. "
        '{"path": {"prefix": "/photos/2024/"}, "taken_at": {"gte": "2024-06-01"}}; on the multipart '
        "image search, the same object JSON-encoded.",
    )


class TextSearchRequest(SearchParams):
    """`POST /v1/search/text`: text→image (`target` images) or text→text (`target` texts).

    Strict: JSON numbers must be integers where integers are asked for (`"k": true` or `"k": "3"` is
    refused). The multipart form of an image search sends strings, so `SearchParams` itself stays lax.
    """

    model_config = ConfigDict(extra="forbid", strict=True)

    query: str = Field(description="The text to search with.", examples=["a red square"])


class SearchTerm(BaseModel):
    """One term of a combined query: exactly one of `text`, `item` (an id of the bundle) or `vector`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    text: str | None = Field(None, description="A text, embedded by the bundle's model.")
    item: int | None = Field(
        None, ge=0, description="An item of the bundle (image or text): its stored vector."
    )
    vector: list[float] | None = Field(
        None, description="A vector of the model's dimension (e.g. from /v1/embed)."
    )
    weight: float = Field(
        1.0, ge=-100.0, le=100.0, description="Its weight in the sum; negative pushes results away from it."
    )


class QuerySearchRequest(SearchParams):
    """`POST /v1/search`: the weighted sum of the terms' unit vectors, normalised, searched."""

    model_config = ConfigDict(extra="forbid", strict=True)

    terms: list[SearchTerm] = Field(min_length=1, max_length=16, description="The terms to combine.")


class ImageQueryForm(SearchParams):
    """The multipart `POST /v1/search`: the uploaded image is one more term (weight `weight`) of the sum.

    `terms` and `filter` arrive JSON-encoded; the other fields are form strings (so this stays lax)."""

    terms: list[SearchTerm] = Field(
        default_factory=list, max_length=15, description="More terms to combine with the image."
    )
    weight: float = Field(1.0, ge=-100.0, le=100.0, description="The image term's weight in the sum.")


class EmbedTextRequest(BaseModel):
    """`POST /v1/embed/text`."""

    model_config = ConfigDict(extra="forbid", strict=True)

    texts: list[str] = Field(min_length=1, description="Texts to embed (at most max_embed_texts).")


class ErrorDetail(BaseModel):
    code: str = Field(description="Stable machine-readable code (docs/api.md lists them all).")
    message: str = Field(description="What was wrong, in one line.")


class ErrorResponse(BaseModel):
    """Every 4xx and 5xx answer: `{"error": {"code", "message"}}`."""

    error: ErrorDetail


# Documented on every route (the app's `responses`), so the OpenAPI schema describes the errors too.
ERROR_RESPONSES: dict[int | str, dict[str, object]] = {
    "4XX": {"model": ErrorResponse, "description": "Refused: the code says why (docs/api.md, errors)."},
    503: {
        "model": ErrorResponse,
        "description": "not_ready, overloaded, shutting_down or too_many_connections; see Retry-After.",
        "headers": {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}},
    },
}


class ItemMetadata(BaseModel):
    """What the indexer recorded about an image (docs/indexing.md, "Metadata"); null when unknown."""

    folder: str | None = None
    size: int | None = Field(default=None, description="Bytes of the image file.")
    mtime: float | None = Field(default=None, description="Modification time, seconds since the epoch.")
    width: int | None = None
    height: int | None = None
    taken_at: float | None = Field(default=None, description="EXIF capture time, seconds since the epoch.")
    camera: str | None = Field(default=None, description="EXIF camera make and model.")
    fields: dict[str, Any] = Field(
        default_factory=dict, description="User fields (CSV/JSONL columns, sidecar)."
    )


class SearchHit(ItemMetadata):
    """One result. Images carry `caption` (their first caption, if any), `image_url` and their metadata;
    texts `text`."""

    id: int
    score: float = Field(description="Cosine similarity to the query, in [-1, 1].")
    kind: Literal["image", "text"]
    caption: str | None = None
    text: str | None = None
    path: str | None = None
    image_url: str | None = None


class SearchResponse(BaseModel):
    bundle: str = Field(description="Version of the bundle that answered.")
    took_ms: float
    results: list[SearchHit]


class EmbedResponse(BaseModel):
    bundle: str
    took_ms: float
    model: str
    dim: int
    embeddings: list[list[float]] = Field(description="(n, dim) L2-normalised vectors, one per input.")


class ItemResponse(ItemMetadata):
    """`GET /v1/items/{id}`: one row of the bundle's items."""

    bundle: str
    id: int
    kind: Literal["image", "text"]
    path: str | None = None
    text: str | None = None
    sha256: str | None = None
    image_url: str | None = None


class DuplicateMember(BaseModel):
    id: int
    path: str | None = None
    score: float = Field(description="Cosine similarity to the group's first (lowest) id.")


class DuplicatesResponse(BaseModel):
    """`GET /v1/items/{id}/duplicates`: the item's near-duplicate group, lowest id first."""

    bundle: str
    id: int
    threshold: float
    group: list[DuplicateMember]


class FacetValue(BaseModel):
    value: Any
    count: int


class FacetsResponse(BaseModel):
    """`GET /v1/facets`: how many items have each value of one field, most common first."""

    bundle: str
    field: str
    target: Target
    matching: int = Field(description="Items of the target the filter keeps (all of them without one).")
    values: list[FacetValue]
    truncated: bool = Field(description="More distinct values exist than `limit` returned.")


class ModelInfoResponse(BaseModel):
    model_config = ConfigDict(protected_namespaces=())

    name: str
    embed_dim: int
    image_size: int
    context_length: int
    fingerprint: str


class IndexInfo(BaseModel):
    count: int
    factory: str
    metric: str
    recall_at_10: float | None = None
    recall_warning: str | None = Field(
        None, description="Set when the index was published below its recall target (--accept-low-recall)."
    )


class FallbackInfo(BaseModel):
    """Set while the server serves an older bundle because the one CURRENT names was refused at start-up."""

    current: str | None = Field(description="What CURRENT names (null when CURRENT itself is unusable).")
    reason: str = Field(description="Why that bundle was refused.")


class InfoResponse(BaseModel):
    """`GET /v1/info`."""

    bundle: str
    created_at: str
    model: ModelInfoResponse
    images: IndexInfo
    texts: IndexInfo
    device: str
    max_k: int
    max_query_chars: int
    max_body_bytes: int
    loaded_at: float
    user_fields: list[str] = Field(
        default_factory=list,
        description="The bundle's user field names (CSV/JSONL columns, sidecar keys), sorted: what a filter "
        "or `/v1/facets` may name besides the built-in fields.",
    )
    user_field_types: dict[str, list[str]] = Field(
        default_factory=dict,
        description="Each user field's value types, sorted (`int`, `float`, `str`; a CSV column of numbers "
        "and words has both): which filter operators make sense for it (ranges for numbers, `prefix`/`glob` "
        "for strings).",
    )
    fallback: FallbackInfo | None = None


class HealthResponse(BaseModel):
    status: Literal["ok", "ready"]
    bundle: str | None = None


class ReadyResponse(HealthResponse):
    """`GET /readyz`: `fallback` is set while the bundle served is not the one CURRENT names."""

    fallback: FallbackInfo | None = None


class ReloadResponse(BaseModel):
    """`POST /v1/admin/reload`: `changed` is true when a new bundle is now served."""

    bundle: str | None
    changed: bool
    error: str | None = None
