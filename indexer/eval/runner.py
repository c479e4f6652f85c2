"""`clipsearch eval`: embed an image–caption source with a saved model and score retrieval."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from indexer.core.encoder import Encoder
from indexer.data.decode import DatasetError, decoded_batches, report_failures
from indexer.data.sources import Record, SourceSpec, read_records
from indexer.data.workers import default_workers
from indexer.eval.metrics import (
    DEFAULT_CHUNK,
    RetrievalMetrics,
    blocks,
    pairs_from_captions,
    retrieval_metrics,
)


@dataclass(frozen=True)
class EvalConfig:
    """What `clipsearch eval` measures: a saved model on an image–caption source."""

    model_dir: Path
    data: SourceSpec
    batch_size: int = 256
    device: str = "auto"
    chunk: int = DEFAULT_CHUNK


def evaluate(cfg: EvalConfig) -> RetrievalMetrics:
    """Embed every decodable image and unique caption of `cfg.data` with the model and score retrieval.

    Images stream through in batches (decoded in worker processes), so only embeddings are kept.
    Unreadable images are logged and left out.
    """
    encoder = Encoder.from_dir(cfg.model_dir, device=cfg.device)
    records = _captioned(read_records(cfg.data), cfg.data.source)
    image_emb, kept, bad = [np.zeros((0, encoder.info.embed_dim), np.float32)], [], []
    for batch in decoded_batches(records, encoder.preprocess, cfg.batch_size, default_workers()):
        if batch.pixels is not None:
            image_emb.append(encoder.encode_pixels(batch.pixels))
        kept += [d.pos for d in batch.ok]
        bad += [f"{records[d.pos].key}: {d.error[1] if d.error else ''}" for d in batch.failed]
    report_failures(bad, len(records), cfg.data.source, limit=1.0)
    if len(kept) < 2:
        raise DatasetError(f"{cfg.data.source}: {len(kept)} decodable captioned image(s); need at least 2")
    pairs = pairs_from_captions([records[i].captions for i in kept])
    text_emb = np.concatenate(
        [encoder.encode_texts(pairs.texts[s:e]) for s, e in blocks(len(pairs.texts), cfg.batch_size)]
    )
    return retrieval_metrics(np.concatenate(image_emb), text_emb, pairs, chunk=cfg.chunk)


def _captioned(records: list[Record], source: str) -> list[Record]:
    kept = [r for r in records if r.captions]
    if len(kept) < 2:
        raise DatasetError(f"{source}: {len(kept)} captioned image(s); retrieval needs at least 2")
    return kept
