"""`GET /v1/items/{id}`, `/image` and `/duplicates`: by id from the bundle's records, never by a path."""

from __future__ import annotations

import dataclasses
import mimetypes
import os
from pathlib import Path

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse

from indexer.core.bundle.duplicates import group_of
from indexer.core.bundle.items import Item
from service.auth import require_api_key
from service.deps import ServiceDep, mark_bundle
from service.errors import ApiError
from service.schemas import DuplicateMember, DuplicatesResponse, ItemResponse
from service.search import image_url, metadata
from service.state import Snapshot

router = APIRouter(prefix="/v1/items", tags=["items"], dependencies=[Depends(require_api_key)])

_MAX_ID = 2**63 - 1
_MTIME_SLACK_S = 1e-6  # the recorded mtime is the float os.stat gave the indexer; equal unless changed


def _item(snap: Snapshot, item_id: int) -> Item:
    item = snap.bundle.items.get(item_id) if 0 <= item_id <= _MAX_ID else None
    if item is None:
        raise ApiError(404, "item_not_found", f"no item {item_id} in bundle {snap.version}")
    return item


@router.get("/{item_id}")
def get_item(item_id: int, request: Request, service: ServiceDep) -> ItemResponse:
    """The metadata of one image or text."""
    with service.state.lease() as snap:
        mark_bundle(request, snap.version)
        item = _item(snap, item_id)
        url = image_url(item.id) if item.kind == "image" else None
        row = {k: v for k, v in dataclasses.asdict(item).items() if k != "fields"}
        return ItemResponse(bundle=snap.version, image_url=url, **{**row, **metadata(item)})


def _safe_file(snap: Snapshot, item: Item) -> tuple[Path, os.stat_result]:
    """The item's file, resolved, and its stat; refused when it (or a symlink on the way) leads outside
    the collection, or when its size or mtime differ from what the indexer recorded (the file was
    replaced or edited since: what is there now is not what was indexed)."""
    if item.kind != "image" or not item.path:
        raise ApiError(404, "not_an_image", f"item {item.id} is a {item.kind}, it has no image")
    root = snap.collection_root
    resolved = Path(item.path).resolve()
    if root is None or not resolved.is_relative_to(root):
        raise ApiError(403, "outside_collection", f"the file of item {item.id} lies outside the collection")
    if not resolved.is_file():
        raise ApiError(404, "image_missing", f"the file of item {item.id} is no longer on disk")
    st = resolved.stat()
    moved = item.mtime is not None and abs(st.st_mtime - item.mtime) > _MTIME_SLACK_S
    if (item.size is not None and st.st_size != item.size) or moved:
        raise ApiError(
            409,
            "changed_on_disk",
            f"the file of item {item.id} changed after it was indexed (size or modification time); "
            "re-index to serve it",
        )
    return resolved, st


@router.get("/{item_id}/image", response_class=FileResponse)
async def get_item_image(item_id: int, request: Request, service: ServiceDep) -> FileResponse:
    """The stored image file of an image item."""
    with service.state.lease() as snap:
        mark_bundle(request, snap.version)
        item = await anyio.to_thread.run_sync(_item, snap, item_id)
        path, st = await anyio.to_thread.run_sync(_safe_file, snap, item)
    media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    headers = {"Cache-Control": "private, max-age=300"}
    return FileResponse(path, media_type=media_type, headers=headers, stat_result=st)


@router.get("/{item_id}/duplicates")
def get_item_duplicates(
    item_id: int,
    request: Request,
    service: ServiceDep,
    threshold: float = Query(0.95, gt=0.0, le=1.0, description="Cosine similarity of near-duplicates."),
) -> DuplicatesResponse:
    """The near-duplicate group of one image (itself alone when nothing is that close)."""
    with service.state.lease() as snap:
        mark_bundle(request, snap.version)
        item = _item(snap, item_id)
        if item.kind != "image":
            raise ApiError(404, "not_an_image", f"item {item.id} is a {item.kind}, it has no image")
        group = group_of(snap.bundle, item.id, threshold)
        members = [DuplicateMember(id=m.id, path=m.path, score=m.score) for m in group]
        return DuplicatesResponse(bundle=snap.version, id=item.id, threshold=threshold, group=members)
