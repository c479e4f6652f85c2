"""Build a small real bundle for the browser tests: the colour set embedded by a tiny random model."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np

from indexer.bundle import BundleContents, IndexSpec, Item, ModelRef, publish
from indexer.data import SourceSpec, read_records
from indexer.images import load_image
from indexer.model import Encoder


def _flat(emb: np.ndarray, ids: np.ndarray) -> faiss.Index:
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(emb.shape[1]))
    index.add_with_ids(emb, ids)
    return index


def build_bundle(source: Path, model_dir: Path, bundles_dir: Path) -> Path:
    """Embed every image and caption of `source` and publish one bundle under `bundles_dir`.

    Image ids come first, then text ids: one id space, as the bundle format requires.
    """
    records = read_records(SourceSpec(source=str(source)))
    encoder = Encoder.from_dir(model_dir, device="cpu")
    pictures = [load_image(r.read_bytes()) for r in records]
    image_emb = encoder.encode_images(pictures)
    texts = [c for r in records for c in r.captions]
    text_emb = encoder.encode_texts(texts)
    n = len(records)
    items = [
        Item(
            id=i,
            kind="image",
            path=str(r.path),
            text=r.captions[0] if r.captions else None,
            width=p.width,
            height=p.height,
        )
        for i, (r, p) in enumerate(zip(records, pictures, strict=True))
    ]
    items += [Item(id=n + j, kind="text", text=t) for j, t in enumerate(texts)]
    info = encoder.info
    contents = BundleContents(
        model_dir=model_dir,
        model=ModelRef(
            name=info.name,
            fingerprint=info.fingerprint,
            embed_dim=info.embed_dim,
            image_size=info.image_size,
            context_length=info.context_length,
        ),
        image_index=_flat(image_emb, np.arange(n, dtype=np.int64)),
        text_index=_flat(text_emb, np.arange(n, n + len(texts), dtype=np.int64)),
        images=IndexSpec(file="images.faiss", count=n),
        texts=IndexSpec(file="texts.faiss", count=len(texts)),
        items=items,
    )
    return publish(bundles_dir, contents)
