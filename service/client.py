"""Python clients for the clipsearch HTTP API: `Client` (blocking) and `AsyncClient`, both on httpx.

    with Client("http://127.0.0.1:8000") as cs:
        for hit in cs.search_text("a red bicycle", k=5).results:
            print(hit.score, hit.path)

Errors come back as `ApiClientError` with the server's `status`, `code` and `message`. Importing this
module needs only httpx and pydantic (no torch).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Generic, TypeVar

import httpx
from pydantic import BaseModel

from service.schemas import (
    DuplicatesResponse,
    EmbedResponse,
    FacetsResponse,
    HealthResponse,
    InfoResponse,
    ItemResponse,
    ReadyResponse,
    ReloadResponse,
    SearchResponse,
    Target,
)

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
ImageInput = bytes | str | os.PathLike[str] | IO[bytes]


class ApiClientError(Exception):
    """An error answer of the service (or a response that is not the API's)."""

    def __init__(self, status: int, code: str, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


def _raise_for_error(response: httpx.Response) -> None:
    if response.is_success:
        return
    try:
        err = response.json()["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        code, message = "http_error", response.text[:200]
    retry = response.headers.get("retry-after")
    raise ApiClientError(response.status_code, code, message, float(retry) if retry else None)


@dataclass(frozen=True)
class _Call(Generic[T]):
    """One API call, described once and sent by either client."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    kwargs: dict[str, Any] = field(default_factory=dict)
    admin: bool = False


def _model(cls: type[M]) -> Callable[[httpx.Response], M]:
    return lambda r: cls.model_validate_json(r.content)


def _image_file(image: ImageInput, filename: str | None) -> tuple[str, bytes]:
    if isinstance(image, bytes):
        return filename or "image", image
    if isinstance(image, str | os.PathLike):
        path = Path(image)
        return filename or path.name, path.read_bytes()
    return filename or Path(str(getattr(image, "name", "image"))).name, image.read()


def _search_form(k: int, target: Target, min_score: float | None, offset: int) -> dict[str, str]:
    form = {"k": str(k), "target": target, "offset": str(offset)}
    if min_score is not None:
        form["min_score"] = repr(float(min_score))
    return form


@dataclass(frozen=True)
class Options:
    """The search options beside k/target/min_score/offset: a metadata `filter` and a `dedup` threshold."""

    filter: Mapping[str, Any] | None = None
    dedup: float | None = None

    def json(self) -> dict[str, Any]:
        return {k: v for k, v in (("filter", self.filter), ("dedup", self.dedup)) if v is not None}

    def form(self) -> dict[str, str]:
        out = {"filter": json.dumps(self.filter)} if self.filter is not None else {}
        return out | ({"dedup": repr(float(self.dedup))} if self.dedup is not None else {})


# A term of `search`: a text, an item id, a vector, or any of them with a weight as a (term, weight) pair.
Term = str | int | Sequence[float] | tuple[str | int | Sequence[float], float]


def _term(term: Term) -> dict[str, Any]:
    """`"beach"`, `123`, `[0.1, ...]`, or `("people", -0.5)` / `(123, 0.7)` -> the API's term object."""
    weight = 1.0
    what: Any = term
    if isinstance(term, tuple) and len(term) == 2 and not isinstance(term[0], float):
        what, weight = term[0], float(term[1])  # (term, weight); a vector is a list or an array
    if isinstance(what, str):
        return {"text": what, "weight": weight}
    if isinstance(what, int):
        return {"item": what, "weight": weight}
    return {"vector": [float(x) for x in what], "weight": weight}


class _Calls:
    """The API, endpoint by endpoint (docs/api.md)."""

    @staticmethod
    def healthz() -> _Call[HealthResponse]:
        return _Call("GET", "/healthz", _model(HealthResponse))

    @staticmethod
    def readyz() -> _Call[ReadyResponse]:
        return _Call("GET", "/readyz", _model(ReadyResponse))

    @staticmethod
    def info() -> _Call[InfoResponse]:
        return _Call("GET", "/v1/info", _model(InfoResponse))

    @staticmethod
    def metrics() -> _Call[str]:
        return _Call("GET", "/metrics", lambda r: r.text)

    @staticmethod
    def search_text(
        query: str, k: int, target: Target, min_score: float | None, offset: int, opts: Options
    ) -> _Call[SearchResponse]:
        body = {"query": query, "k": k, "target": target, "min_score": min_score, "offset": offset}
        return _Call("POST", "/v1/search/text", _model(SearchResponse), {"json": {**body, **opts.json()}})

    @staticmethod
    def search(
        terms: Sequence[Term],
        k: int,
        target: Target,
        min_score: float | None,
        offset: int,
        opts: Options,
        image: tuple[ImageInput, float] | None = None,
    ) -> _Call[SearchResponse]:
        if image is not None:  # the multipart variant: the image is one more term, of weight image[1]
            files = {"file": _image_file(image[0], None)}
            data = _search_form(k, target, min_score, offset) | opts.form()
            data |= {"terms": json.dumps([_term(t) for t in terms]), "weight": repr(float(image[1]))}
            return _Call("POST", "/v1/search", _model(SearchResponse), {"files": files, "data": data})
        body = {"terms": [_term(t) for t in terms], "k": k, "target": target, "offset": offset}
        body |= {"min_score": min_score, **opts.json()}
        return _Call("POST", "/v1/search", _model(SearchResponse), {"json": body})

    @staticmethod
    def search_image(
        image: ImageInput,
        k: int,
        target: Target,
        min_score: float | None,
        offset: int,
        filename: str | None,
        opts: Options,
    ) -> _Call[SearchResponse]:
        files = {"file": _image_file(image, filename)}
        data = _search_form(k, target, min_score, offset) | opts.form()
        return _Call("POST", "/v1/search/image", _model(SearchResponse), {"files": files, "data": data})

    @staticmethod
    def facets(
        field: str, target: Target, filter: Mapping[str, Any] | None, limit: int
    ) -> _Call[FacetsResponse]:
        params: dict[str, str | int] = {"field": field, "target": target, "limit": limit}
        if filter is not None:
            params["filter"] = json.dumps(filter)
        return _Call("GET", "/v1/facets", _model(FacetsResponse), {"params": params})

    @staticmethod
    def embed_texts(texts: Sequence[str]) -> _Call[EmbedResponse]:
        return _Call("POST", "/v1/embed/text", _model(EmbedResponse), {"json": {"texts": list(texts)}})

    @staticmethod
    def embed_image(image: ImageInput, filename: str | None) -> _Call[EmbedResponse]:
        files = {"file": _image_file(image, filename)}
        return _Call("POST", "/v1/embed/image", _model(EmbedResponse), {"files": files})

    @staticmethod
    def item(item_id: int) -> _Call[ItemResponse]:
        return _Call("GET", f"/v1/items/{int(item_id)}", _model(ItemResponse))

    @staticmethod
    def duplicates(item_id: int, threshold: float) -> _Call[DuplicatesResponse]:
        params = {"threshold": threshold}
        return _Call(
            "GET", f"/v1/items/{int(item_id)}/duplicates", _model(DuplicatesResponse), {"params": params}
        )

    @staticmethod
    def item_image(item_id: int) -> _Call[bytes]:
        return _Call("GET", f"/v1/items/{int(item_id)}/image", lambda r: r.content)

    @staticmethod
    def reload() -> _Call[ReloadResponse]:
        return _Call("POST", "/v1/admin/reload", _model(ReloadResponse), admin=True)


class _Base:
    def __init__(self, api_key: str | None, admin_key: str | None) -> None:
        self.api_key = api_key
        self.admin_key = admin_key

    def _headers(self, call: _Call[Any]) -> dict[str, str]:
        key = self.admin_key if call.admin else self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}


class Client(_Base):
    """Blocking client. `api_key` is sent on query routes, `admin_key` on admin routes."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        timeout: float = 30.0,
        http: httpx.Client | None = None,
    ) -> None:
        super().__init__(api_key, admin_key)
        self.http = http or httpx.Client(base_url=base_url, timeout=timeout)

    def _do(self, call: _Call[T]) -> T:
        response = self.http.request(call.method, call.path, headers=self._headers(call), **call.kwargs)
        _raise_for_error(response)
        return call.parse(response)

    def healthz(self) -> HealthResponse:
        return self._do(_Calls.healthz())

    def readyz(self) -> ReadyResponse:
        return self._do(_Calls.readyz())

    def info(self) -> InfoResponse:
        return self._do(_Calls.info())

    def metrics(self) -> str:
        return self._do(_Calls.metrics())

    def search_text(
        self,
        query: str,
        k: int = 10,
        target: Target = "images",
        min_score: float | None = None,
        offset: int = 0,
        *,
        filter: Mapping[str, Any] | None = None,
        dedup: float | None = None,
    ) -> SearchResponse:
        return self._do(_Calls.search_text(query, k, target, min_score, offset, Options(filter, dedup)))

    def search(
        self,
        terms: Sequence[Term],
        k: int = 10,
        target: Target = "images",
        min_score: float | None = None,
        offset: int = 0,
        *,
        filter: Mapping[str, Any] | None = None,
        dedup: float | None = None,
        image: ImageInput | None = None,
        image_weight: float = 1.0,
    ) -> SearchResponse:
        """Query arithmetic: `search(["beach", ("people", -0.5), (123, 0.7)])` (texts, item ids, vectors);
        with `image`, an uploaded image is one more term, of weight `image_weight` (sent as multipart)."""
        opts = Options(filter, dedup)
        upload = (image, image_weight) if image is not None else None
        return self._do(_Calls.search(terms, k, target, min_score, offset, opts, upload))

    def search_image(
        self,
        image: ImageInput,
        k: int = 10,
        target: Target = "images",
        min_score: float | None = None,
        offset: int = 0,
        filename: str | None = None,
        *,
        filter: Mapping[str, Any] | None = None,
        dedup: float | None = None,
    ) -> SearchResponse:
        opts = Options(filter, dedup)
        return self._do(_Calls.search_image(image, k, target, min_score, offset, filename, opts))

    def facets(
        self, field: str, target: Target = "images", filter: Mapping[str, Any] | None = None, limit: int = 50
    ) -> FacetsResponse:
        return self._do(_Calls.facets(field, target, filter, limit))

    def embed_texts(self, texts: Sequence[str]) -> EmbedResponse:
        return self._do(_Calls.embed_texts(texts))

    def embed_image(self, image: ImageInput, filename: str | None = None) -> EmbedResponse:
        return self._do(_Calls.embed_image(image, filename))

    def item(self, item_id: int) -> ItemResponse:
        return self._do(_Calls.item(item_id))

    def item_image(self, item_id: int) -> bytes:
        return self._do(_Calls.item_image(item_id))

    def duplicates(self, item_id: int, threshold: float = 0.95) -> DuplicatesResponse:
        return self._do(_Calls.duplicates(item_id, threshold))

    def reload(self) -> ReloadResponse:
        return self._do(_Calls.reload())

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient(_Base):
    """The same API for asyncio code."""

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        admin_key: str | None = None,
        timeout: float = 30.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        super().__init__(api_key, admin_key)
        self.http = http or httpx.AsyncClient(base_url=base_url, timeout=timeout)

    async def _do(self, call: _Call[T]) -> T:
        response = await self.http.request(call.method, call.path, headers=self._headers(call), **call.kwargs)
        _raise_for_error(response)
        return call.parse(response)

    async def healthz(self) -> HealthResponse:
        return await self._do(_Calls.healthz())

    async def readyz(self) -> ReadyResponse:
        return await self._do(_Calls.readyz())

    async def info(self) -> InfoResponse:
        return await self._do(_Calls.info())

    async def metrics(self) -> str:
        return await self._do(_Calls.metrics())

    async def search_text(
        self,
        query: str,
        k: int = 10,
        target: Target = "images",
        min_score: float | None = None,
        offset: int = 0,
        *,
        filter: Mapping[str, Any] | None = None,
        dedup: float | None = None,
    ) -> SearchResponse:
        return await self._do(_Calls.search_text(query, k, target, min_score, offset, Options(filter, dedup)))

    async def search(
        self,
        terms: Sequence[Term],
        k: int = 10,
        target: Target = "images",
        min_score: float | None = None,
        offset: int = 0,
        *,
        filter: Mapping[str, Any] | None = None,
        dedup: float | None = None,
        image: ImageInput | None = None,
        image_weight: float = 1.0,
    ) -> SearchResponse:
        """Query arithmetic: `search(["beach", ("people", -0.5), (123, 0.7)])` (texts, item ids, vectors);
        with `image`, an uploaded image is one more term, of weight `image_weight` (sent as multipart)."""
        opts = Options(filter, dedup)
        upload = (image, image_weight) if image is not None else None
        return await self._do(_Calls.search(terms, k, target, min_score, offset, opts, upload))

    async def search_image(
        self,
        image: ImageInput,
        k: int = 10,
        target: Target = "images",
        min_score: float | None = None,
        offset: int = 0,
        filename: str | None = None,
        *,
        filter: Mapping[str, Any] | None = None,
        dedup: float | None = None,
    ) -> SearchResponse:
        opts = Options(filter, dedup)
        return await self._do(_Calls.search_image(image, k, target, min_score, offset, filename, opts))

    async def facets(
        self, field: str, target: Target = "images", filter: Mapping[str, Any] | None = None, limit: int = 50
    ) -> FacetsResponse:
        return await self._do(_Calls.facets(field, target, filter, limit))

    async def embed_texts(self, texts: Sequence[str]) -> EmbedResponse:
        return await self._do(_Calls.embed_texts(texts))

    async def embed_image(self, image: ImageInput, filename: str | None = None) -> EmbedResponse:
        return await self._do(_Calls.embed_image(image, filename))

    async def item(self, item_id: int) -> ItemResponse:
        return await self._do(_Calls.item(item_id))

    async def item_image(self, item_id: int) -> bytes:
        return await self._do(_Calls.item_image(item_id))

    async def duplicates(self, item_id: int, threshold: float = 0.95) -> DuplicatesResponse:
        return await self._do(_Calls.duplicates(item_id, threshold))

    async def reload(self) -> ReloadResponse:
        return await self._do(_Calls.reload())

    async def aclose(self) -> None:
        await self.http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
