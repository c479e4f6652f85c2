"""Retrieval metrics (R@1/5/10, median rank) in both directions, computed in blocks: pure NumPy.

Captions are deduplicated into unique texts. A text's positives are all images it captions, an image's
positives are all its texts, and a query counts as found at rank r when its best-scoring positive is
the r-th target. Scores are computed block by block (queries x targets), so no N x N matrix is ever
held in memory: only one rank per query is kept.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

KS = (1, 5, 10)
# Scores of one block are (query_chunk, target_chunk) float32: 2048 x 2048 x 4 bytes = 16 MiB.
DEFAULT_CHUNK = 2048


@dataclass(frozen=True)
class Pairs:
    """Which images go with which unique texts.

    `text_images[t]` holds the indices of the images that text `t` captions (never empty).
    """

    texts: tuple[str, ...]
    text_images: tuple[tuple[int, ...], ...]

    @property
    def n_pairs(self) -> int:
        return sum(len(images) for images in self.text_images)

    def as_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(text index, image index) of every pair, as two int64 arrays sorted by text index."""
        t = np.repeat(np.arange(len(self.texts)), [len(i) for i in self.text_images])
        i = np.fromiter((i for images in self.text_images for i in images), dtype=np.int64, count=len(t))
        return t.astype(np.int64), i


def pairs_from_captions(captions: Sequence[Sequence[str]]) -> Pairs:
    """Deduplicate the captions of images 0..n-1 (one sequence per image) into unique texts."""
    index: dict[str, list[int]] = {}
    for image, caps in enumerate(captions):
        for cap in dict.fromkeys(caps):
            index.setdefault(cap, []).append(image)
    return Pairs(texts=tuple(index), text_images=tuple(tuple(v) for v in index.values()))


def blocks(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)


def best_positive_ranks(
    queries: np.ndarray, targets: np.ndarray, query_idx: np.ndarray, target_idx: np.ndarray, chunk: int
) -> np.ndarray:
    """1-based rank of each query's best-scoring positive among all targets.

    Args:
        queries: (n_queries, dim) float32.
        targets: (n_targets, dim) float32.
        query_idx, target_idx: the positive pairs, sorted by `query_idx`; every query has at least one.
        chunk: block size for both queries and targets.

    Rank = 1 + the number of non-positive targets that score strictly higher than the best positive.
    """
    order = np.argsort(query_idx, kind="stable")
    query_idx, target_idx = query_idx[order], target_idx[order]
    best = np.full(len(queries), -np.inf, dtype=np.float32)
    for start, end in blocks(len(query_idx), chunk * 8):
        scores = np.einsum("ij,ij->i", queries[query_idx[start:end]], targets[target_idx[start:end]])
        np.maximum.at(best, query_idx[start:end], scores.astype(np.float32))
    ranks = np.ones(len(queries), dtype=np.int64)
    bounds = np.searchsorted(query_idx, np.arange(len(queries) + 1))
    for q0, q1 in blocks(len(queries), chunk):
        pq, pt = query_idx[bounds[q0] : bounds[q1]], target_idx[bounds[q0] : bounds[q1]]
        for t0, t1 in blocks(len(targets), chunk):
            scores = queries[q0:q1] @ targets[t0:t1].T  # [query_chunk, target_chunk]
            inside = (pt >= t0) & (pt < t1)
            scores[pq[inside] - q0, pt[inside] - t0] = -np.inf  # positives never count against a query
            ranks[q0:q1] += (scores > best[q0:q1, None]).sum(axis=1)
    return ranks


@dataclass(frozen=True)
class RankSummary:
    """Recall at 1, 5 and 10 as fractions in [0, 1], and the median rank (1 = perfect), of one direction."""

    r_at_1: float
    r_at_5: float
    r_at_10: float
    median_rank: float

    @classmethod
    def of(cls, ranks: np.ndarray) -> RankSummary:
        """From 1-based ranks, one per query."""
        r1, r5, r10 = (float(np.mean(ranks <= k)) for k in KS)
        return cls(r1, r5, r10, float(np.median(ranks)))

    def recall(self, k: int) -> float:
        return {1: self.r_at_1, 5: self.r_at_5, 10: self.r_at_10}[k]

    def as_dict(self) -> dict[str, float]:
        """The JSON shape `clipsearch eval --json` prints: `R@1`, `R@5`, `R@10`, `median_rank`."""
        return {**{f"R@{k}": self.recall(k) for k in KS}, "median_rank": self.median_rank}

    @classmethod
    def from_dict(cls, d: Mapping[str, float]) -> RankSummary:
        return cls(d["R@1"], d["R@5"], d["R@10"], d["median_rank"])


@dataclass(frozen=True)
class RetrievalMetrics:
    """Both directions of retrieval over `n` image–caption pairs."""

    n: int
    text_to_image: RankSummary
    image_to_text: RankSummary

    def score(self) -> float:
        """The one number that picks the best checkpoint: mean recall (R@1, R@5, R@10, both directions)."""
        both = (self.text_to_image, self.image_to_text)
        return float(np.mean([d.recall(k) for d in both for k in KS]))

    def as_dict(self) -> dict[str, Any]:
        """`{"n", "text_to_image": {...}, "image_to_text": {...}}`, the shape of `eval --json`."""
        return {
            "n": self.n,
            "text_to_image": self.text_to_image.as_dict(),
            "image_to_text": self.image_to_text.as_dict(),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RetrievalMetrics:
        return cls(
            int(d["n"]), RankSummary.from_dict(d["text_to_image"]), RankSummary.from_dict(d["image_to_text"])
        )


def retrieval_metrics(
    image_emb: np.ndarray, text_emb: np.ndarray, pairs: Pairs, chunk: int = DEFAULT_CHUNK
) -> RetrievalMetrics:
    """Retrieval metrics for unit vectors of images and of unique texts.

    Args:
        image_emb: (n_images, dim) L2-normalised; images without any caption are ignored.
        text_emb: (len(pairs.texts), dim) L2-normalised, in the order of `pairs.texts`.
        pairs: from `pairs_from_captions`.
        chunk: block size; the result does not depend on it.
    """
    if len(text_emb) != len(pairs.texts):
        raise ValueError(f"{len(text_emb)} text embeddings for {len(pairs.texts)} texts")
    t_idx, i_idx = pairs.as_arrays()
    image_emb = np.ascontiguousarray(image_emb, dtype=np.float32)
    text_emb = np.ascontiguousarray(text_emb, dtype=np.float32)
    t2i = best_positive_ranks(text_emb, image_emb, t_idx, i_idx, chunk)
    captioned = np.unique(i_idx)
    # Re-number captioned images 0..m-1 so images without captions are neither queries nor targets.
    remap = np.full(len(image_emb), -1, dtype=np.int64)
    remap[captioned] = np.arange(len(captioned))
    i2t = best_positive_ranks(image_emb[captioned], text_emb, remap[i_idx], t_idx, chunk)
    return RetrievalMetrics(pairs.n_pairs, RankSummary.of(t2i), RankSummary.of(i2t))
