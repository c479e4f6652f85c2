"""The mapper and writer stages of batch embedding: decoded batches (the shared loader, in parallel
workers) go through the model on the main process while the workers prepare the next ones, and each
batch's vectors are committed to the embedding cache, so a killed run resumes where it stopped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import torch

from indexer.core.bars import progress_bar
from indexer.core.encoder import Encoder
from indexer.core.images import DEFAULT_MAX_PIXELS, PhotoFacts
from indexer.data.decode import DecodedBatch, decoded_batches
from indexer.data.sources import Record
from indexer.data.workers import default_workers
from indexer.index.cache import EmbeddingCache
from indexer.index.stages import reached

B = TypeVar("B")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedConfig:
    batch_size: int = 64
    workers: int = field(default_factory=default_workers)  # 0 decodes on the main thread (no overlap)
    max_pixels: int = DEFAULT_MAX_PIXELS
    text_batch_size: int = 256
    cpu_int8: bool = False  # opt-in CPU fast path: dynamic int8 quantisation of the Linear layers

    def numerics(self, device: str) -> str:
        """How vectors are computed; part of the cache identity so different numerics never mix."""
        return "int8" if self.cpu_int8 and device == "cpu" else ""


def apply_fast_path(encoder: Encoder, cfg: EmbedConfig) -> Encoder:
    """Quantise the image tower's Linear layers to int8 (dynamic, per-tensor) when asked and on CPU.

    Only the image tower: it is where indexing spends its time, and open_clip's text tower reads
    `Linear.weight.dtype`, which quantised layers do not have.

    Measured in benchmarks/index.py: faster on CPUs with VNNI, recall@10 vs fp32 reported there; off by
    default because the vectors are not bit-identical to the fp32 ones the service computes.
    """
    if cfg.numerics(encoder.device.type) != "int8":
        return encoder
    import warnings

    from torch.ao.quantization import quantize_dynamic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder.model.visual = quantize_dynamic(encoder.model.visual, {torch.nn.Linear}, dtype=torch.qint8)
    return encoder


@dataclass
class ImageJob:
    sha256: str
    record: Record


@dataclass
class EmbedReport:
    embedded: int = 0
    failures: dict[str, tuple[str, str]] = field(default_factory=dict)  # sha256 -> (code, message)
    seconds: float = 0.0


def embed_images(
    encoder: Encoder, jobs: Sequence[ImageJob], cache: EmbeddingCache, cfg: EmbedConfig, work_dir: Path
) -> EmbedReport:
    """Embed each job's image and commit the vectors batch by batch (reader → mapper → writer)."""
    report = EmbedReport()
    start = time.perf_counter()
    records = [j.record for j in jobs]

    def commit(batch: DecodedBatch) -> int:
        if batch.pixels is not None:
            vecs = encoder.encode_pixels(batch.pixels)
            rows = [(jobs[d.pos].sha256, v, *d.size) for d, v in zip(batch.ok, vecs, strict=True)]  # type: ignore[misc]
            cache.put("image", rows, [d.facts or PhotoFacts() for d in batch.ok])
            report.embedded += len(rows)
        for d in batch.failed:
            report.failures[jobs[d.pos].sha256] = d.error  # type: ignore[assignment]
        return len(batch.ok) + len(batch.failed)

    batches = decoded_batches(records, encoder.preprocess, cfg.batch_size, cfg.workers, cfg.max_pixels)
    commit_batches(batches, commit, len(jobs), "embedding images", work_dir)
    report.seconds = time.perf_counter() - start
    return report


def commit_batches(
    batches: Iterable[B], commit: Callable[[B], int], total: int, desc: str, work_dir: Path
) -> None:
    """Commit each batch of images as it comes (`commit` returns how many images it settled), with a
    progress bar and the crash tests' named moments; the local and the Ray embedders share it."""
    with progress_bar(total=total, unit="img", desc=desc, smoothing=0.1) as bar:
        # the bar is closed (its line ended) before any error reaches the command line
        for n, batch in enumerate(batches, start=1):
            bar.update(commit(batch))
            if n == 1:
                reached("embedded-batch-1", work_dir)
            reached("embedded-batch", work_dir)


def embed_texts(
    encoder: Encoder, texts: Sequence[tuple[str, str]], cache: EmbeddingCache, cfg: EmbedConfig
) -> int:
    """Embed (sha256, text) pairs in batches, committing each; returns how many were embedded."""
    bar = progress_bar(total=len(texts), unit="text", desc="embedding texts", disable=not texts)
    with bar:
        for i in range(0, len(texts), cfg.text_batch_size):
            part = texts[i : i + cfg.text_batch_size]
            vecs = encoder.encode_texts([t for _, t in part])
            cache.put("text", [(sha, v, None, None) for (sha, _), v in zip(part, vecs, strict=True)])
            bar.update(len(part))
    return len(texts)
