"""Retrieval metrics (R@1/5/10, median rank) in both directions, computed in blocks, and `clipsearch eval`.

Captions are deduplicated into unique texts. A text's positives are all images it captions, an image's
positives are all its texts, and a query counts as found at rank r when its best-scoring positive is
the r-th target. Scores are computed block by block (queries x targets), so no N x N matrix is ever
held in memory: only one rank per query is kept.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.data import Record, SourceSpec, read_records

log = logging.getLogger(__name__)

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


def _blocks(n: int, chunk: int) -> Iterator[tuple[int, int]]:
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
    for start, end in _blocks(len(query_idx), chunk * 8):
        scores = np.einsum("ij,ij->i", queries[query_idx[start:end]], targets[target_idx[start:end]])
        np.maximum.at(best, query_idx[start:end], scores.astype(np.float32))
    ranks = np.ones(len(queries), dtype=np.int64)
    bounds = np.searchsorted(query_idx, np.arange(len(queries) + 1))
    for q0, q1 in _blocks(len(queries), chunk):
        pq, pt = query_idx[bounds[q0] : bounds[q1]], target_idx[bounds[q0] : bounds[q1]]
        for t0, t1 in _blocks(len(targets), chunk):
            scores = queries[q0:q1] @ targets[t0:t1].T  # [query_chunk, target_chunk]
            inside = (pt >= t0) & (pt < t1)
            scores[pq[inside] - q0, pt[inside] - t0] = -np.inf  # positives never count against a query
            ranks[q0:q1] += (scores > best[q0:q1, None]).sum(axis=1)
    return ranks


def rank_summary(ranks: np.ndarray) -> dict[str, float]:
    """R@1/5/10 as fractions in [0, 1] and the median rank (1 = perfect)."""
    out = {f"R@{k}": float(np.mean(ranks <= k)) for k in KS}
    out["median_rank"] = float(np.median(ranks))
    return out


def retrieval_metrics(
    image_emb: np.ndarray, text_emb: np.ndarray, pairs: Pairs, chunk: int = DEFAULT_CHUNK
) -> dict[str, Any]:
    """`{"n", "text_to_image": {...}, "image_to_text": {...}}` for unit vectors of images and unique texts.

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
    return {"n": pairs.n_pairs, "text_to_image": rank_summary(t2i), "image_to_text": rank_summary(i2t)}


def val_score(metrics: dict[str, Any]) -> float:
    """The one number that picks the best checkpoint: mean recall (R@1, R@5, R@10, both directions)."""
    return float(np.mean([metrics[d][f"R@{k}"] for d in ("text_to_image", "image_to_text") for k in KS]))


@dataclass(frozen=True)
class EvalConfig:
    """What `clipsearch eval` measures: a saved model on an image–caption source."""

    model_dir: Path
    data: SourceSpec
    batch_size: int = 256
    device: str = "auto"
    chunk: int = DEFAULT_CHUNK


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    """Embed every decodable image and unique caption of `cfg.data` with the model and score retrieval.

    Images stream through in batches (decoded by `workers` processes), so only embeddings are kept.
    """
    from indexer.model import Encoder
    from indexer.train_data import DatasetError, check_bad, default_workers, iter_decoded

    encoder = Encoder.from_dir(cfg.model_dir, device=cfg.device)
    records = _captioned(read_records(cfg.data), cfg.data.source)
    blocks, kept, bad = [np.zeros((0, encoder.info.embed_dim), np.float32)], [], []
    for batch in iter_decoded(records, encoder.preprocess, cfg.batch_size, workers=default_workers()):
        if batch.kept:
            blocks.append(encoder.encode_pixels(batch.pixels))
        kept += batch.kept
        bad += batch.bad
    check_bad(len(bad), len(records), bad, cfg.data.source, limit=1.0)  # eval what decodes; log the rest
    if len(kept) < 2:
        raise DatasetError(f"{cfg.data.source}: {len(kept)} decodable captioned image(s); need at least 2")
    pairs = pairs_from_captions([records[i].captions for i in kept])
    text_emb = np.concatenate(
        [encoder.encode_texts(pairs.texts[s:e]) for s, e in _blocks(len(pairs.texts), cfg.batch_size)]
    )
    return retrieval_metrics(np.concatenate(blocks), text_emb, pairs, chunk=cfg.chunk)


def _captioned(records: list[Record], source: str) -> list[Record]:
    from indexer.train_data import DatasetError

    kept = [r for r in records if r.captions]
    if len(kept) < 2:
        raise DatasetError(f"{source}: {len(kept)} captioned image(s); retrieval needs at least 2")
    return kept
