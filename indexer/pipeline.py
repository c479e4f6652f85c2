"""The mapper and writer stages of batch embedding: decode + resize in parallel workers (a torch
DataLoader), run the model on the main thread while the workers prepare the next batches, and commit
each batch's vectors to the embedding cache so a killed run resumes where it stopped.
"""

from __future__ import annotations

import logging
import os
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from indexer.cache import EmbeddingCache
from indexer.data import Record
from indexer.images import DEFAULT_MAX_PIXELS, DecodeOptions, ImageError, load_image
from indexer.model import Encoder

log = logging.getLogger(__name__)

PAUSE_ENV = "CLIPSEARCH_TEST_PAUSE_AT"  # test hook: stop (sleep) at a named stage so a test can kill -9


def default_workers() -> int:
    """One decoding worker per core beside the one running the model (at least one, at most 8)."""
    return max(1, min(8, (os.cpu_count() or 2) - 1))


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


def checkpoint(stage: str, work_dir: Path) -> None:
    """Pause forever at `stage` when the test hook asks for it, after leaving a marker file."""
    if os.environ.get(PAUSE_ENV) == stage:
        (work_dir / f"paused-{stage}").touch()
        while True:
            time.sleep(60)


_TARS: dict[Path, tarfile.TarFile] = {}  # per worker process: shards stay open across members


def _image_source(rec: Record) -> Path | bytes:
    if rec.path is not None:
        return rec.path
    assert rec.shard is not None and rec.member is not None
    tar = _TARS.get(rec.shard) or _TARS.setdefault(rec.shard, tarfile.open(rec.shard))  # noqa: SIM115
    f = tar.extractfile(rec.member)
    if f is None:
        raise OSError(f"{rec.member} is not a file in {rec.shard}")
    return f.read()


@dataclass
class Decoded:
    """One decoded job: pixels ready for the model, or why it failed."""

    pos: int
    pixels: torch.Tensor | None = None
    size: tuple[int, int] | None = None
    error: tuple[str, str] | None = None


class DecodeDataset(Dataset[Decoded]):
    """Job i -> the image decoded by the shared decoder and resized by the model's own preprocess."""

    def __init__(self, records: Sequence[Record], preprocess: Callable[[Any], torch.Tensor], max_pixels: int):
        self.records, self.preprocess = records, preprocess
        self.options = DecodeOptions(max_pixels=max_pixels)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, pos: int) -> Decoded:
        try:
            img = load_image(_image_source(self.records[pos]), self.options)
            return Decoded(pos, self.preprocess(img), img.size)
        except ImageError as e:
            return Decoded(pos, error=(e.code, e.message))
        except OSError as e:
            return Decoded(pos, error=("unreadable", str(e)))
        except Exception as e:  # a decoder bug on hostile bytes must skip one file, not stop the run
            return Decoded(pos, error=("corrupt", f"{type(e).__name__}: {e}"))


@dataclass
class DecodedBatch:
    ok: list[Decoded]
    failed: list[Decoded]
    pixels: torch.Tensor | None  # (len(ok), 3, H, W)


def collate(items: list[Decoded]) -> DecodedBatch:
    ok = [d for d in items if d.pixels is not None]
    failed = [d for d in items if d.pixels is None]
    pixels = torch.stack([d.pixels for d in ok]) if ok else None  # type: ignore[misc]
    return DecodedBatch(ok, failed, pixels)


def decoded_batches(records: Sequence[Record], preprocess: Any, cfg: EmbedConfig) -> Iterator[DecodedBatch]:
    """Batches decoded by `cfg.workers` processes, prefetched while the caller runs the model."""
    loader = DataLoader(
        DecodeDataset(records, preprocess, cfg.max_pixels),
        batch_size=cfg.batch_size,
        num_workers=cfg.workers,
        collate_fn=collate,
        prefetch_factor=4 if cfg.workers else None,
    )
    yield from loader


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
    bar = tqdm(total=len(jobs), unit="img", desc="embedding images", file=sys.stderr, smoothing=0.1)
    records = [j.record for j in jobs]
    for n, batch in enumerate(decoded_batches(records, encoder.preprocess, cfg), start=1):
        if batch.pixels is not None:
            vecs = encoder.encode_pixels(batch.pixels)
            rows = [(jobs[d.pos].sha256, v, *d.size) for d, v in zip(batch.ok, vecs, strict=True)]  # type: ignore[misc]
            cache.put("image", rows)
            report.embedded += len(rows)
        for d in batch.failed:
            report.failures[jobs[d.pos].sha256] = d.error  # type: ignore[assignment]
        bar.update(len(batch.ok) + len(batch.failed))
        if n == 1:
            checkpoint("embedded-batch-1", work_dir)
    bar.close()
    report.seconds = time.perf_counter() - start
    return report


def embed_texts(
    encoder: Encoder, texts: Sequence[tuple[str, str]], cache: EmbeddingCache, cfg: EmbedConfig
) -> int:
    """Embed (sha256, text) pairs in batches, committing each; returns how many were embedded."""
    bar = tqdm(total=len(texts), unit="text", desc="embedding texts", file=sys.stderr, disable=not texts)
    for i in range(0, len(texts), cfg.text_batch_size):
        part = texts[i : i + cfg.text_batch_size]
        vecs = encoder.encode_texts([t for _, t in part])
        cache.put("text", [(sha, v, None, None) for (sha, _), v in zip(part, vecs, strict=True)])
        bar.update(len(part))
    bar.close()
    return len(texts)


def empty(dim: int) -> np.ndarray:
    return np.zeros((0, dim), dtype=np.float32)
