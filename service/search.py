"""Batch work of the service: encode a batch of queries in one forward pass, search FAISS once per target.

These functions run in the model thread (see `service.batcher`); each takes one snapshot for the whole
batch, so every result of the batch names the same bundle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from indexer.core.bundle.filters import Filter
from indexer.core.bundle.items import Item
from service.metrics import Metrics
from service.schemas import SearchHit, Target
from service.state import ServiceState, Snapshot


@dataclass(frozen=True)
class SearchSpec:
    """What to do with a query's embedding: the `k` best of `target` after `offset`, above `min_score`,
    among the items `where` keeps."""

    target: Target
    k: int
    offset: int = 0
    min_score: float | None = None
    where: Filter | None = None
    dedup: float | None = None  # collapse results at least this similar to a better one returned

    @property
    def group(self) -> tuple[Target, str]:
        """Queries with the same group are searched in one FAISS call."""
        return self.target, self.where.key if self.where is not None else ""

    @property
    def fetch(self) -> int:
        return self.k + self.offset


@dataclass(frozen=True)
class TextJob:
    texts: Sequence[str]
    search: SearchSpec | None = None


@dataclass(frozen=True)
class ImageJob:
    """A decoded image; `pixels` is its preprocessed tensor when made by the encoder `encoder_id`."""

    image: Image.Image
    pixels: torch.Tensor | None = None
    encoder_id: int = 0
    search: SearchSpec | None = None


@dataclass(frozen=True)
class JobResult:
    bundle: str
    model: str
    embeddings: np.ndarray  # (n, dim) float32, L2-normalised
    hits: list[SearchHit] | None = None


def image_url(item_id: int) -> str:
    return f"/v1/items/{item_id}/image"


def metadata(item: Item) -> dict[str, Any]:
    """An item's metadata as `ItemMetadata`'s fields (lists of a user field as JSON lists)."""
    user = {k: list(v) if isinstance(v, tuple) else v for k, v in item.fields.items()}
    facts = {
        k: getattr(item, k) for k in ("folder", "size", "mtime", "width", "height", "taken_at", "camera")
    }
    return {**facts, "fields": user}


def to_hit(item: Item, score: float) -> SearchHit:
    if item.kind == "image":
        return SearchHit(
            id=item.id,
            score=score,
            kind="image",
            caption=item.text,
            path=item.path,
            image_url=image_url(item.id),
            **metadata(item),
        )
    return SearchHit(id=item.id, score=score, kind="text", text=item.text, path=item.path)


def _search(
    snap: Snapshot, emb: np.ndarray, specs: Sequence[SearchSpec | None]
) -> list[list[SearchHit] | None]:
    """Search each target once for all the queries that asked for it; -1 ids (k beyond the index) dropped."""
    found: list[list[tuple[int, float]] | None] = [None] * len(specs)
    groups = {s.group: s for s in specs if s is not None}
    for group, first in groups.items():
        rows = [i for i, s in enumerate(specs) if s is not None and s.group == group]
        target, where = first.target, first.where
        fetch = min(
            max(s.fetch for s in specs if s is not None and s.group == group),
            snap.bundle.matching(target, where),
        )
        scores, ids = snap.bundle.search(target, emb[rows], fetch, where)
        for row, i in enumerate(rows):
            spec = specs[i]
            assert spec is not None
            if spec.dedup is not None:
                found[i] = _deduplicated(snap, emb[rows[row]], spec)
                continue
            pairs = _pairs(ids[row, : spec.fetch], scores[row, : spec.fetch], spec)
            found[i] = pairs[spec.offset : spec.offset + spec.k]
    wanted = {item_id for pairs in found if pairs for item_id, _ in pairs}
    items = snap.bundle.items.get_many(sorted(wanted))
    return [
        None if pairs is None else [to_hit(items[x], s) for x, s in pairs if x in items] for pairs in found
    ]


def _pairs(ids: np.ndarray, scores: np.ndarray, spec: SearchSpec) -> list[tuple[int, float]]:
    """(id, score) of one row, without padding and below `min_score`."""
    pairs = [(int(x), float(s)) for x, s in zip(ids, scores, strict=True)]
    return [p for p in pairs if p[0] >= 0 and (spec.min_score is None or p[1] >= spec.min_score)]


DEDUP_FETCH = 4  # a deduplicated search first fetches this many times k + offset, then 4x more as needed


def _deduplicated(snap: Snapshot, query: np.ndarray, spec: SearchSpec) -> list[tuple[int, float]]:
    """The page of one query's results after collapsing near-duplicates (clip-retrieval's `deduplicate`):
    in score order, a result is kept unless its vector's cosine similarity to a kept one reaches
    `spec.dedup`. Fetches more until the page is full or the (filtered) collection is exhausted."""
    bundle, threshold = snap.bundle, float(spec.dedup or 1.0)
    available = bundle.matching(spec.target, spec.where)
    fetch = min(available, spec.fetch * DEDUP_FETCH)
    while True:
        scores, ids = bundle.search(spec.target, query[None, :], fetch, spec.where)
        pairs = _pairs(ids[0], scores[0], spec)
        kept = collapse(pairs, bundle.stack.vectors(spec.target, [i for i, _ in pairs]), threshold)
        exhausted = fetch >= available or len(pairs) < fetch  # all fetched, or min_score cut the rest
        if len(kept) >= spec.fetch or exhausted:
            return kept[spec.offset : spec.offset + spec.k]
        fetch = min(available, fetch * DEDUP_FETCH)


def collapse(
    pairs: Sequence[tuple[int, float]], vectors: np.ndarray, threshold: float
) -> list[tuple[int, float]]:
    """`pairs` (best first) without those whose vector (row i of `vectors`, unit length) is at least
    `threshold` similar to an earlier kept one."""
    kept: list[int] = []
    for row in range(len(pairs)):
        if not kept or float(np.max(vectors[kept] @ vectors[row])) < threshold:
            kept.append(row)
    return [pairs[r] for r in kept]


def combine(vectors: np.ndarray, weights: Sequence[float]) -> np.ndarray | None:
    """The query of a weighted sum of terms: each row of `vectors` ((n, d)) made unit length, weighted,
    summed and normalised; None when the terms cancel out (the sum has no direction)."""
    units = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    total = (np.asarray(weights, np.float64)[:, None] * units.astype(np.float64)).sum(axis=0)
    norm = float(np.linalg.norm(total))
    return (total / norm).astype(np.float32) if norm > 1e-6 else None


def search_vector(snap: Snapshot, query: np.ndarray, spec: SearchSpec) -> list[SearchHit]:
    """One ready query vector ((d,) float32, unit length) searched as `spec` asks."""
    hits = _search(snap, query[None, :], [spec])[0]
    return hits or []


class BatchRunner:
    """The batch functions the text and image batchers call, bound to the service state and metrics."""

    def __init__(self, state: ServiceState, metrics: Metrics) -> None:
        self.state = state
        self.metrics = metrics

    def run_texts(self, jobs: Sequence[TextJob]) -> list[JobResult]:
        with self.state.lease() as snap:
            texts = [t for job in jobs for t in job.texts]
            with self.metrics.time_stage("encode", "text"):
                emb = snap.encoder.encode_texts(texts, trim=True)
            return self._finish(snap, emb, [len(j.texts) for j in jobs], [j.search for j in jobs], "text")

    def run_images(self, jobs: Sequence[ImageJob]) -> list[JobResult]:
        with self.state.lease() as snap:
            encoder = snap.encoder
            pixels = [
                job.pixels if job.pixels is not None and job.encoder_id == id(encoder) else None
                for job in jobs
            ]
            # A reload may have brought a model with other preprocessing since the request decoded.
            stale = [i for i, p in enumerate(pixels) if p is None]
            if stale:
                redo = encoder.preprocess_images([jobs[i].image for i in stale])
                for n, i in enumerate(stale):
                    pixels[i] = redo[n]
            with self.metrics.time_stage("encode", "image"):
                emb = encoder.encode_pixels(torch.stack([p for p in pixels if p is not None]))
            return self._finish(snap, emb, [1] * len(jobs), [j.search for j in jobs], "image")

    def _finish(
        self,
        snap: Snapshot,
        emb: np.ndarray,
        counts: Sequence[int],
        specs: Sequence[SearchSpec | None],
        kind: str,
    ) -> list[JobResult]:
        # Only single-query jobs search; embedding jobs (several texts) have no spec.
        starts = np.cumsum([0, *counts])
        firsts = emb[starts[:-1]] if len(counts) else emb
        with self.metrics.time_stage("search", kind):
            hits = _search(snap, firsts, specs)
        name = snap.bundle.manifest.model.name
        return [
            JobResult(snap.version, name, emb[starts[i] : starts[i + 1]], hits[i]) for i in range(len(counts))
        ]
