"""Near-duplicate images of a bundle version: groups of items whose vectors are at least `threshold`
cosine-similar, linked transitively (connected components), found with FAISS range search.

The whole collection (`duplicate_groups`, `clipsearch duplicates`): every live image vector is added to
a temporary index (exact up to `EXACT_MAX`, else an IVF-Flat one probing a few lists: near-duplicates
fall into the same or a neighbouring list), then range-searched in blocks, never as an N×N matrix. One
item's group (`GET /v1/items/{id}/duplicates`): k-NN searches of the served bundle from that item,
widened while every neighbour found is still above the threshold.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import numpy as np

from indexer.core.bundle.read import Bundle

EXACT_MAX = 50_000  # vectors up to which the whole-collection search is exact
NPROBE = 4  # lists an IVF range search visits per query
BLOCK = 8192  # vectors per block of queries
GROUP_MAX = 1000  # members one item's group is followed to
NEIGHBOURS = 64  # first k of an item's neighbour search (doubled while all pass)


@dataclass(frozen=True)
class Member:
    """One image of a group: its id, path, and cosine similarity to the group's first (lowest) id."""

    id: int
    path: str | None
    score: float


def _live_ids(bundle: Bundle) -> np.ndarray:
    """Every image id the version serves, ascending."""
    stack = bundle.stack
    parts = []
    for layer, dead in zip(stack.layers, stack.dead, strict=True):
        ids = layer.table("images").ids
        parts.append(ids[~np.isin(ids, dead["images"])] if len(dead["images"]) else ids)
    return np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)


def _blocks(bundle: Bundle, ids: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, len(ids), BLOCK):
        part = ids[start : start + BLOCK]
        yield part, bundle.stack.vectors("images", part.tolist())


def _scratch_index(bundle: Bundle, ids: np.ndarray, dim: int) -> faiss.Index:
    """All of `ids`' vectors in an inner-product index keyed by position in `ids`."""
    n = len(ids)
    if n <= EXACT_MAX:
        index: faiss.Index = faiss.IndexFlatIP(dim)
    else:
        nlist = max(1, min(int(4 * math.sqrt(n)), n // 39))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(0)
        sample = np.sort(rng.choice(n, size=min(n, nlist * 39), replace=False))  # FAISS's minimum per list
        index.cp.niter = 10  # coarse lists only need to keep neighbours together, not be optimal
        index.train(bundle.stack.vectors("images", ids[sample].tolist()))
        index.nprobe = min(NPROBE, nlist)
    for _, vecs in _blocks(bundle, ids):
        index.add(vecs)
    return index


def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = int(parent[root])
    while parent[i] != root:  # path compression
        parent[i], i = root, int(parent[i])
    return root


def duplicate_groups(bundle: Bundle, threshold: float = 0.95) -> list[list[Member]]:
    """Every group of two or more images at least `threshold` similar, largest first."""
    ids = _live_ids(bundle)
    if len(ids) < 2:
        return []
    index = _scratch_index(bundle, ids, bundle.manifest.model.embed_dim)
    parent = np.arange(len(ids), dtype=np.int64)
    start = 0
    for part, vecs in _blocks(bundle, ids):
        # FAISS keeps inner products strictly above the radius
        lims, _, found = index.range_search(vecs, float(np.nextafter(np.float32(threshold), -np.inf)))
        rows = start + np.repeat(np.arange(len(part)), np.diff(lims).astype(np.int64))
        for a, b in zip(rows[rows != found].tolist(), found[rows != found].tolist(), strict=True):
            ra, rb = _find(parent, a), _find(parent, b)
            if ra != rb:
                parent[max(ra, rb)] = min(ra, rb)
        start += len(part)
    roots = np.array([_find(parent, i) for i in range(len(ids))])
    groups: dict[int, list[int]] = {}
    for pos, root in enumerate(roots.tolist()):
        groups.setdefault(root, []).append(pos)
    out = [_members(bundle, ids[pos]) for pos in groups.values() if len(pos) > 1]
    return sorted(out, key=lambda g: (-len(g), g[0].id))


def _members(bundle: Bundle, ids: np.ndarray) -> list[Member]:
    """The group of `ids` (ascending), scored against its first."""
    vecs = bundle.stack.vectors("images", ids.tolist())
    scores = vecs @ vecs[0]
    items = bundle.items.get_many(ids.tolist())
    return [
        Member(int(i), items[int(i)].path if int(i) in items else None, round(float(s), 6))
        for i, s in zip(ids, scores, strict=True)
    ]


def group_of(bundle: Bundle, item_id: int, threshold: float = 0.95) -> list[Member]:
    """The group `item_id` belongs to (the same connected component `duplicate_groups` finds, followed to
    `GROUP_MAX` members); just the item itself when nothing is that close."""
    seen = {item_id}
    todo = [item_id]
    while todo and len(seen) < GROUP_MAX:
        current = todo.pop()
        for other in _neighbours(bundle, current, threshold):
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return _members(bundle, np.asarray(sorted(seen), np.int64))


def _neighbours(bundle: Bundle, item_id: int, threshold: float) -> list[int]:
    """Ids at least `threshold` similar to `item_id`'s vector."""
    query = bundle.stack.vectors("images", [item_id])
    k = min(NEIGHBOURS, bundle.count("images"))
    while True:
        scores, ids = bundle.search("images", query, k)
        keep = (ids[0] >= 0) & (scores[0] >= threshold)
        if not keep.all() or k >= min(GROUP_MAX, bundle.count("images")):
            return [int(i) for i in ids[0][keep]]
        k = min(k * 2, GROUP_MAX, bundle.count("images"))
