"""Delta versions (docs/live.md, "Delta versions"): a new segment — the rows and vectors of the ids it
owns — published on top of the current version, whose files are hard-linked and whose checksums are
carried forward; segments merged into one past `MAX_SEGMENTS`; a rebuilt base put under the segments
written since it began (`NewBase`).

Every version goes through `publish.commit` (temp dir, verify as the service would, rename, CURRENT);
verification reuses the open previous version's layers, so publishing a delta costs the delta.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from indexer.core.bundle.items import Item, Skipped, write_items
from indexer.core.bundle.layers import Layer, LayerStack
from indexer.core.bundle.layout import (
    IMAGES_INDEX,
    ITEMS_DB,
    MODEL_DIR,
    SEGMENTS_DIR,
    SKIPPED,
    TEXTS_INDEX,
)
from indexer.core.bundle.manifest import BundleManifest, FileEntry, IndexSpec, SegmentSpec
from indexer.core.bundle.read import Bundle, open_bundle_dir, segment_files
from indexer.core.hashing import HashedFile, hash_file
from indexer.index.publish import commit, fsync_dir, fsync_file, write_manifest, write_skipped

log = logging.getLogger(__name__)

MAX_SEGMENTS = 8  # a version holding more has them merged into one (search and reload stay cheap)


@dataclass(frozen=True)
class SegmentContents:
    """A delta: every id it owns, and the current row and vector of each owned id that still exists.

    `vectors` is (len(rows), dim) float32, L2-normalised, row i the vector of `rows[i]`.
    """

    owned: frozenset[int]
    rows: Sequence[Item] = ()
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))

    def __post_init__(self) -> None:
        if not {r.id for r in self.rows} <= self.owned:
            raise ValueError("a segment holds rows only for ids it owns")
        if len(self.rows) != len(self.vectors):
            raise ValueError("one vector per row")

    def index(self, kind: str, dim: int) -> faiss.Index:
        """An exact inner-product index of this delta's vectors of `kind`, FAISS ids = item ids."""
        pick = [i for i, r in enumerate(self.rows) if r.kind == kind]
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        if pick:
            ids = np.asarray([self.rows[i].id for i in pick], np.int64)
            index.add_with_ids(np.ascontiguousarray(self.vectors[pick], np.float32), ids)
        return index

    def layer(self, dim: int, name: str = "new") -> Layer:
        """This delta as an in-memory layer (to count what a version with it serves)."""
        rows = {r.id: r for r in self.rows}
        return Layer(
            name, name, self.index("image", dim), self.index("text", dim), rows=rows, owned=self.owned
        )


@dataclass(frozen=True)
class NewBase:
    """A base rebuilt from version `source`'s live items (`indexer.index.compact`), in a staging dir."""

    dir: Path  # holds IMAGES_INDEX, TEXTS_INDEX and ITEMS_DB
    images: IndexSpec  # count = vectors in its image index
    texts: IndexSpec
    hashes: dict[str, HashedFile]  # by file name
    source_segments: tuple[str, ...]  # the segments it folded in; later ones are kept on top of it


def merged(layers: Sequence[Layer], last: SegmentContents | None, dim: int) -> SegmentContents:
    """Segments (oldest first, then `last`) folded into one delta that owns what they all own."""
    rows: dict[int, Item | None] = {}
    vectors: dict[int, np.ndarray] = {}
    for layer in layers:
        for i in layer.owned:
            row = layer.rows.get(i)
            rows[i] = row
            if row is not None:
                index = layer.index("images" if row.kind == "image" else "texts")
                vectors[i] = np.asarray(index.reconstruct(i), np.float32)
    if last is not None:
        for i in last.owned:
            rows[i] = None
        for row, vec in zip(last.rows, last.vectors, strict=True):
            rows[row.id], vectors[row.id] = row, vec
    live = sorted((r for r in rows.values() if r is not None), key=lambda r: r.id)
    vecs = np.stack([vectors[r.id] for r in live]) if live else np.zeros((0, dim), np.float32)
    return SegmentContents(frozenset(rows), live, vecs.astype(np.float32))


def _link(src: Path, dst: Path) -> None:
    """Share an immutable file with a new version: a hard link, or a copy where links do not work."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _write_segment(
    tmp: Path, seq: int, delta: SegmentContents, dim: int
) -> tuple[SegmentSpec, dict[str, HashedFile]]:
    """Write the delta's three files under `segments/`, named by sequence and by their sha256s."""
    staging = tmp / SEGMENTS_DIR / ".new"
    staging.mkdir(parents=True)
    faiss.write_index(delta.index("image", dim), str(staging / IMAGES_INDEX))
    faiss.write_index(delta.index("text", dim), str(staging / TEXTS_INDEX))
    write_items(staging / ITEMS_DB, sorted(delta.rows, key=lambda r: r.id), replaced=sorted(delta.owned))
    names = (IMAGES_INDEX, TEXTS_INDEX, ITEMS_DB)
    for n in names:
        fsync_file(staging / n)
    hashes = {n: hash_file(staging / n) for n in names}
    digest = hashlib.sha256("".join(hashes[n].sha256 for n in names).encode()).hexdigest()[:12]
    name = f"{seq:06d}-{digest}"
    os.rename(staging, tmp / SEGMENTS_DIR / name)
    fsync_dir(tmp / SEGMENTS_DIR)
    images = sum(1 for r in delta.rows if r.kind == "image")
    spec = SegmentSpec(name=name, images=images, texts=len(delta.rows) - images, replaced=len(delta.owned))
    return spec, dict(zip(segment_files(name), (hashes[n] for n in names), strict=True))


def _entry(hashed: HashedFile) -> FileEntry:
    return FileEntry(sha256=hashed.sha256, size=hashed.stamp.size)


def _next_seq(prev: BundleManifest) -> int:
    return max((int(s.name.split("-")[0]) for s in prev.segments), default=0) + 1


def publish_version(
    bundles_dir: Path,
    prev: Bundle,
    *,
    delta: SegmentContents | None = None,
    base: NewBase | None = None,
    skipped: Sequence[Skipped] = (),
    stats: dict[str, Any] | None = None,
) -> Bundle:
    """Publish `prev` plus `delta` (or `prev`'s newer segments over a rebuilt `base`) as a new version.

    `prev` is the open current version; its layers are reused to verify the new one, and the returned
    version (open, its layers shared with `prev`) is what the next call gets as `prev`.
    """
    pm = prev.manifest
    dim = pm.model.embed_dim
    kept = [s for s in pm.segments if base is None or s.name not in base.source_segments]
    kept_layers = [layer for layer in prev.layers[1:] if any(layer.name == s.name for s in kept)]
    if delta is not None and len(kept) + 1 > MAX_SEGMENTS:
        delta, kept, kept_layers = merged(kept_layers, delta, dim), [], []
    base_layer = _base_layer(base, prev)
    stack = LayerStack([base_layer, *kept_layers, *([delta.layer(dim)] if delta is not None else [])])

    def write(tmp: Path, version: str) -> dict[str, HashedFile]:
        files: dict[str, FileEntry] = {}
        known: dict[str, HashedFile] = {}
        carried = [r for r in pm.files if r.startswith(f"{MODEL_DIR}/")]
        carried += [r for s in kept for r in segment_files(s.name)]
        if base is None:
            carried += [pm.images.file, pm.texts.file, ITEMS_DB]
        else:
            for name, hashed in base.hashes.items():
                _link(base.dir / name, tmp / name)
                files[name], known[name] = _entry(hashed), hashed
        for rel in carried:
            _link(prev.root / rel, tmp / rel)
            files[rel] = pm.files[rel]
        specs = list(kept)
        if delta is not None:
            spec, hashes = _write_segment(tmp, _next_seq(pm), delta, dim)
            specs.append(spec)
            known |= hashes
            files |= {rel: _entry(h) for rel, h in hashes.items()}
        write_skipped(tmp / SKIPPED, skipped)
        fsync_file(tmp / SKIPPED)
        known[SKIPPED] = hash_file(tmp / SKIPPED)
        files[SKIPPED] = _entry(known[SKIPPED])
        images = base.images if base is not None else pm.images
        texts = base.texts if base is not None else pm.texts
        manifest = BundleManifest(
            schema_version=2 if specs else 1,
            version=version,
            created_at=datetime.now(UTC).isoformat(timespec="seconds"),
            model=pm.model,
            images=images.model_copy(update={"count": stack.count("images")}),
            texts=texts.model_copy(update={"count": stack.count("texts")}),
            files=dict(sorted(files.items())),
            stats={**pm.stats, **(stats or {})},
            segments=specs,
        )
        write_manifest(tmp, manifest)
        return known

    def verify(tmp: Path, known: dict[str, HashedFile]) -> Bundle:
        return open_bundle_dir(tmp, known=known, reuse=prev, mmap=True)

    try:
        final, opened = commit(bundles_dir, write, verify)
    finally:
        if base is not None:
            base_layer.release()
    return replace(opened, root=final)


def _base_layer(base: NewBase | None, prev: Bundle) -> Layer:
    """The layer the new version's base will be: `prev`'s, or the rebuilt one (mapped, not read)."""
    if base is None:
        return prev.layers[0]
    from indexer.core.bundle.items import ItemStore

    layer = Layer(
        "staging",
        "base",
        faiss.read_index(str(base.dir / IMAGES_INDEX), faiss.IO_FLAG_MMAP_IFC),
        faiss.read_index(str(base.dir / TEXTS_INDEX), faiss.IO_FLAG_MMAP_IFC),
        store=ItemStore(base.dir / ITEMS_DB),
    )
    layer.acquire()
    return layer
