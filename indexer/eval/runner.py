"""`clipsearch eval`: embed an image–caption source with a saved model and score retrieval, and zero-shot
classification when the images have class labels."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from indexer.eval.zeroshot import (
    DEFAULT_PROMPTS,
    ZeroShotMetrics,
    class_embeddings,
    label_indices,
    prompt_templates,
    zero_shot_accuracy,
)


@dataclass(frozen=True)
class EvalConfig:
    """What `clipsearch eval` measures: a saved model on an image–caption source.

    `classes`: the candidate classes of zero-shot classification (None: the distinct labels of the data);
    `prompts`: a named prompt set or a file of templates (`indexer.eval.zeroshot.prompt_templates`)."""

    model_dir: Path
    data: SourceSpec
    batch_size: int = 256
    device: str = "auto"
    chunk: int = DEFAULT_CHUNK
    classes: tuple[str, ...] | None = None
    prompts: str = DEFAULT_PROMPTS


@dataclass(frozen=True)
class EvalReport:
    """Retrieval (when the data has captions) and zero-shot accuracy (when it has labels)."""

    retrieval: RetrievalMetrics | None
    zero_shot: ZeroShotMetrics | None

    def as_dict(self) -> dict[str, Any]:
        """`eval --json`: retrieval's keys (`n` 0 and null directions without captions), plus `zero_shot`
        when there were labels."""
        d: dict[str, Any] = (
            self.retrieval.as_dict()
            if self.retrieval is not None
            else {"n": 0, "text_to_image": None, "image_to_text": None}
        )
        if self.zero_shot is not None:
            d["zero_shot"] = self.zero_shot.as_dict()
        return d


def evaluate(cfg: EvalConfig) -> RetrievalMetrics:
    """Retrieval metrics alone (`evaluate_report` for everything)."""
    report = evaluate_report(cfg)
    if report.retrieval is None:
        raise DatasetError(f"{cfg.data.source}: fewer than 2 captioned images; retrieval needs them")
    return report.retrieval


def evaluate_report(cfg: EvalConfig) -> EvalReport:
    """Embed every decodable image of `cfg.data` once and score what its captions and labels allow.

    Images stream through in batches (decoded in worker processes), so only embeddings are kept.
    Unreadable images are logged and left out.
    """
    templates = prompt_templates(cfg.prompts)  # a bad --prompts fails before any work
    records = _usable(read_records(cfg.data), cfg.data.source, cfg.classes is not None)
    encoder = Encoder.from_dir(cfg.model_dir, device=cfg.device)
    image_emb, kept, bad = [np.zeros((0, encoder.info.embed_dim), np.float32)], [], []
    for batch in decoded_batches(records, encoder.preprocess, cfg.batch_size, default_workers()):
        if batch.pixels is not None:
            image_emb.append(encoder.encode_pixels(batch.pixels))
        kept += [d.pos for d in batch.ok]
        bad += [f"{records[d.pos].key}: {d.error[1] if d.error else ''}" for d in batch.failed]
    report_failures(bad, len(records), cfg.data.source, limit=1.0)
    images = np.concatenate(image_emb)
    captioned = [j for j, i in enumerate(kept) if records[i].captions]
    labelled = any(records[i].labels for i in kept)
    if len(captioned) < 2 and not labelled:
        raise DatasetError(
            f"{cfg.data.source}: {len(captioned)} decodable captioned image(s); need at least 2"
        )
    retrieval = None
    if len(captioned) >= 2:
        pairs = pairs_from_captions([records[kept[j]].captions for j in captioned])
        text_emb = _encode_texts(encoder, pairs.texts, cfg.batch_size)
        retrieval = retrieval_metrics(images[captioned], text_emb, pairs, chunk=cfg.chunk)
    zero_shot = None
    if labelled:
        classes, labels = label_indices(
            [records[i].labels for i in kept], cfg.classes, [records[i].key for i in kept]
        )
        class_emb = class_embeddings(lambda t: _encode_texts(encoder, t, cfg.batch_size), classes, templates)
        zero_shot = zero_shot_accuracy(images, class_emb, labels, cfg.prompts)
    return EvalReport(retrieval, zero_shot)


def _encode_texts(encoder: Encoder, texts: Sequence[str], batch_size: int) -> np.ndarray:
    return np.concatenate([encoder.encode_texts(texts[s:e]) for s, e in blocks(len(texts), batch_size)])


def _usable(records: list[Record], source: str, classes_given: bool) -> list[Record]:
    """Records with captions or labels; `--classes` without any label is a mistake worth one line."""
    kept = [r for r in records if r.captions or r.labels]
    if classes_given and not any(r.labels for r in kept):
        raise DatasetError(f"{source}: --classes given, but no image has a label (a label column)")
    if len(kept) < 2:
        raise DatasetError(f"{source}: {len(kept)} captioned image(s); retrieval needs at least 2")
    return kept
