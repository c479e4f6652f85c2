"""Opening a bundle: read CURRENT, check every file against the manifest, load the FAISS indexes.

This is what the service serves from and what `clipsearch bundles verify` runs; the rules are in
docs/architecture.md ("Bundle format").
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import faiss
import numpy as np

from indexer.core.bundle.exact import search_flat
from indexer.core.bundle.filters import Filter, parse_filter
from indexer.core.bundle.items import FieldValue, Item, ItemStore
from indexer.core.bundle.layers import Layer, LayeredItems, LayerStack, Target
from indexer.core.bundle.layout import CURRENT, IMAGES_INDEX, ITEMS_DB, MODEL_DIR, SEGMENTS_DIR, TEXTS_INDEX
from indexer.core.bundle.manifest import BundleError, BundleManifest, IndexSpec, load_manifest
from indexer.core.bundle.selectors import Subset, search_subset
from indexer.core.hashing import HashedFile, file_sha256
from indexer.core.modeldir import WEIGHTS_NAME


@dataclass
class Bundle:
    """An opened, verified bundle version (its base and delta segments): what the service serves from."""

    root: Path
    manifest: BundleManifest
    stack: LayerStack
    items: LayeredItems
    _closed: bool = field(default=False, init=False, repr=False)

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def model_dir(self) -> Path:
        return self.root / MODEL_DIR

    @property
    def layers(self) -> list[Layer]:
        return self.stack.layers

    @property
    def image_index(self) -> faiss.Index:
        """The base's image index (a version with segments also serves theirs: use `search`)."""
        return self.layers[0].image_index

    @property
    def text_index(self) -> faiss.Index:
        return self.layers[0].text_index

    def count(self, target: Target) -> int:
        return self.stack.count(target)

    def search(
        self, target: Target, queries: np.ndarray, k: int, where: Filter | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The `k` nearest items of `target` to each query: (scores, ids), both (n_queries, k), best first.

        `queries` is (n, dim) float32, L2-normalised; scores are cosine similarities. Where fewer than `k`
        items exist (that `where` keeps) the row is padded with id -1. Every search of a bundle goes
        through here: each layer through `_search_index` (over the filter's ids, inside FAISS), merged by
        `LayerStack.search`.
        """
        selection = self.select(target, where) if where is not None and not where.empty else None
        if k == 0 or self.count(target) == 0:
            n = len(queries)
            return np.zeros((n, k), np.float32), np.full((n, k), -1, np.int64)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        return self.stack.search(target, queries, k, _search_index, selection)

    def select(self, target: Target, where: Filter) -> list[Subset]:
        """Each layer's ids of `target` that `where` keeps (remembered per filter for this version)."""
        return self.stack.select(target, where)

    def matching(self, target: Target, where: Filter | None) -> int:
        """How many items of `target` `where` keeps."""
        if where is None or where.empty:
            return self.count(target)
        return sum(len(s) for s in self.select(target, where))

    def parse_filter(self, raw: object) -> Filter | None:
        """The checked filter of a JSON object, against this version's user fields (`FilterError`)."""
        flt = parse_filter(raw, self.stack.field_names())
        return None if flt.empty else flt

    def facets(self, target: Target, name: str, where: Filter | None = None) -> dict[FieldValue, int]:
        """Value -> count of field `name` over the items of `target` (that `where` keeps)."""
        return self.stack.facets(target, name, where or Filter())

    def image_folder(self) -> str | None:
        """The folder every image of the version lies under (computed once per layer)."""
        return self.stack.folder()

    def close(self) -> None:
        """Let go of the layers (each is closed when no open version holds it any more); idempotent."""
        if not self._closed:
            self._closed = True
            for layer in self.layers:
                layer.release()


def _search_index(
    index: faiss.Index, queries: np.ndarray, k: int, subset: Subset | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One FAISS index's `k` nearest to each of `queries` ((n, dim) float32, contiguous), among
    `subset`'s ids only when given. A flat index is scanned once for the whole batch (`exact`)."""
    if subset is not None:
        return search_subset(index, queries, k, subset)
    if (found := search_flat(index, queries, k)) is not None:
        return found
    scores, ids = index.search(queries, k)
    return scores, ids


def read_current(bundles_dir: Path) -> str:
    """The active bundle's name from `CURRENT`."""
    current = Path(bundles_dir) / CURRENT
    try:
        name = current.read_text().strip()
    except FileNotFoundError as e:
        raise BundleError(f"no bundle published yet: {current} does not exist") from e
    if not name:
        raise BundleError(f"{current} is empty")
    if "/" in name or name.startswith("."):
        raise BundleError(f"{current} does not name a bundle: {name!r}")
    return name


def verify_files(
    root: Path,
    manifest: BundleManifest,
    checksums: bool = True,
    known: Mapping[str, HashedFile] | None = None,
    trusted: Collection[str] = (),
) -> None:
    """Every file the manifest lists exists with its size (and sha256); the model fingerprint agrees.

    `known` (the indexer's verify-on-publish only): sha256s this process computed for files it has just
    written or linked, by manifest path; such a file is not read again while `still_holds` is true.
    `trusted`: manifest paths whose content this process already holds, verified, in memory (a reused
    layer, the loaded model): their sizes are checked, their bytes are not read.
    """
    known = known or {}
    for rel, entry in manifest.files.items():
        path = root / rel
        if not path.is_file():
            raise BundleError(f"{root.name}: {rel} is missing")
        if path.stat().st_size != entry.size:
            raise BundleError(
                f"{root.name}: {rel} is {path.stat().st_size} bytes, manifest says {entry.size}"
            )
        if checksums and rel not in trusted and _sha256_now(path, known.get(rel)) != entry.sha256:
            raise BundleError(f"{root.name}: {rel} does not match its sha256 in the manifest")
    weights = f"{MODEL_DIR}/{WEIGHTS_NAME}"
    if weights not in manifest.files or manifest.files[weights].sha256 != manifest.model.fingerprint:
        raise BundleError(f"{root.name}: model weights do not match the manifest's model fingerprint")


def _sha256_now(path: Path, hashed: HashedFile | None) -> str:
    """`hashed`'s sha256 while it still describes `path`, else `path` read and hashed now."""
    return hashed.sha256 if hashed is not None and hashed.still_holds(path) else file_sha256(path)


def segment_files(name: str) -> tuple[str, str, str]:
    """Manifest paths of a segment's image index, text index and items."""
    return tuple(f"{SEGMENTS_DIR}/{name}/{f}" for f in (IMAGES_INDEX, TEXTS_INDEX, ITEMS_DB))  # type: ignore[return-value]


def _layer_files(manifest: BundleManifest) -> list[tuple[str, tuple[str, ...]]]:
    """(name, manifest paths) of each layer, base first."""
    base: tuple[str, tuple[str, ...]] = ("base", (manifest.images.file, manifest.texts.file, ITEMS_DB))
    return [base, *((seg.name, segment_files(seg.name)) for seg in manifest.segments)]


def _layer_key(root: Path, manifest: BundleManifest, rels: tuple[str, ...], base: bool) -> str:
    unlisted = [r for r in rels if r not in manifest.files]
    if unlisted:  # a file the manifest has no checksum for is never read
        raise BundleError(f"{root.name}: {unlisted[0]} is not listed in the manifest's files")
    shas = [manifest.files[r].sha256 for r in rels]
    if base:  # search-time params are applied to the index objects, so they are part of what is shared
        shas.append(json.dumps([manifest.images.params, manifest.texts.params], sort_keys=True))
    return ":".join(shas)


def _read_index(root: Path, rel: str, mmap: bool) -> faiss.Index:
    try:
        if mmap:
            # The codes stay in the file, mapped read-only (Flat, IVF lists, PQ/SQ codes, HNSW's vectors;
            # an HNSW graph is still read): processes that map one file share its pages in the page cache.
            return faiss.read_index(str(root / rel), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY)
        return faiss.read_index(str(root / rel))
    except RuntimeError as e:
        raise BundleError(f"{root.name}: cannot read a FAISS index: {e}") from e


def _check_dim(root: Path, index: faiss.Index, dim: int, what: str) -> None:
    if index.d != dim:
        raise BundleError(f"{root.name}: {what} index has dimension {index.d}, the model embeds to {dim}")


def _apply_search_params(index: faiss.Index, spec: IndexSpec) -> None:
    if spec.params:
        ps = faiss.ParameterSpace()
        ps.set_index_parameters(index, ",".join(f"{k}={v}" for k, v in spec.params.items()))  # type: ignore[arg-type]


def _check_rows(root: Path, name: str, items: ItemStore, layer: Layer) -> None:
    """A layer's items file has one row of each kind per vector of that kind's index."""
    for kind, target in (("image", "images"), ("text", "texts")):
        n, ntotal = items.count(kind), int(layer.index(target).ntotal)  # type: ignore[arg-type]
        if n != ntotal:
            where = "items.sqlite" if name == "base" else f"segment {name}"
            raise BundleError(f"{root.name}: {where} has {n} {kind} rows, the index has {ntotal}")


def _open_layer(
    root: Path, manifest: BundleManifest, name: str, rels: tuple[str, ...], key: str, mmap: bool
) -> Layer:
    dim = manifest.model.embed_dim
    image_index = _read_index(root, rels[0], mmap and name == "base")
    text_index = _read_index(root, rels[1], mmap and name == "base")
    _check_dim(root, image_index, dim, "image")
    _check_dim(root, text_index, dim, "text")
    items = ItemStore(root / rels[2])
    try:
        if name == "base":
            _apply_search_params(image_index, manifest.images)
            _apply_search_params(text_index, manifest.texts)
            layer = Layer(key, name, image_index, text_index, store=items)
            _check_rows(root, name, items, layer)
            return layer
        rows = {it.id: it for it in items.all()}
        layer = Layer(key, name, image_index, text_index, rows=rows, owned=frozenset(items.replaced()))
        _check_rows(root, name, items, layer)
        items.close()
        _check_segment(root, manifest, layer)
        return layer
    except sqlite3.DatabaseError as e:
        items.close()
        raise BundleError(f"{root.name}: {rels[2]} is unreadable: {e}") from e
    except BaseException:
        items.close()
        raise


def _check_segment(root: Path, manifest: BundleManifest, layer: Layer) -> None:
    spec = next(s for s in manifest.segments if s.name == layer.name)
    got = (int(layer.image_index.ntotal), int(layer.text_index.ntotal), len(layer.owned))
    if got != (spec.images, spec.texts, spec.replaced):
        raise BundleError(
            f"{root.name}: segment {layer.name} holds {got[0]} images, {got[1]} texts and owns {got[2]} ids; "
            f"the manifest says {spec.images}, {spec.texts} and {spec.replaced}"
        )
    if not set(layer.rows) <= layer.owned:
        raise BundleError(f"{root.name}: segment {layer.name} has rows for ids it does not own")


def _check_counts(root: Path, manifest: BundleManifest, stack: LayerStack) -> None:
    for target, spec in (("images", manifest.images), ("texts", manifest.texts)):
        n = stack.count(target)  # type: ignore[arg-type]
        if n != spec.count:
            what = "image" if target == "images" else "text"
            layered = " (base and segments)" if manifest.segments else ""
            raise BundleError(
                f"{root.name}: {what} index holds {n} vectors{layered}, manifest says {spec.count}"
            )


def open_bundle_dir(
    root: Path,
    checksums: bool = True,
    known: Mapping[str, HashedFile] | None = None,
    reuse: Bundle | None = None,
    mmap: bool = False,
) -> Bundle:
    """Open and verify one bundle version (checksums, dimensions, counts, model fingerprint).

    `reuse`: an open version (the one being served) whose layers, and model weights, are taken over
    where their files' sha256s are the same instead of being read and hashed again; only what is new is
    read and verified. `known` is for the indexer's own verify-on-publish (see `verify_files`).
    `mmap` maps the base's indexes instead of reading them into memory: the indexer's verification, and
    servers with `mmap_indexes` (replicas on one host then share one copy in the page cache).
    """
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"bundle {root} does not exist")
    manifest = load_manifest(root)
    held = {layer.key: layer for layer in reuse.layers} if reuse is not None else {}
    plan = [
        (name, rels, _layer_key(root, manifest, rels, name == "base"))
        for name, rels in _layer_files(manifest)
    ]
    trusted = {rel for name, rels, key in plan if key in held for rel in rels}
    weights = f"{MODEL_DIR}/{WEIGHTS_NAME}"
    if reuse is not None and reuse.manifest.files.get(weights) == manifest.files.get(weights):
        trusted.add(weights)
    verify_files(root, manifest, checksums=checksums, known=known, trusted=trusted)
    layers: list[Layer] = []
    try:
        for name, rels, key in plan:
            layer = held.get(key) or _open_layer(root, manifest, name, rels, key, mmap)
            layer.acquire()
            layers.append(layer)
        stack = LayerStack(layers)
        _check_counts(root, manifest, stack)
    except BaseException:
        for layer in layers:
            layer.release()
        raise
    return Bundle(root=root, manifest=manifest, stack=stack, items=LayeredItems(stack))


def live_items(root: Path, manifest: BundleManifest) -> list[Item]:
    """Every item the version serves, by id: its base's rows folded with its segments', newest owner
    first; its FAISS indexes are not opened and nothing is verified (the indexer's and gc's reader)."""
    rows: dict[int, Item | None] = {}
    for seg in manifest.segments:
        store = ItemStore(root / segment_files(seg.name)[2])
        try:
            rows.update(dict.fromkeys(store.replaced()))
            rows.update((it.id, it) for it in store.all())
        finally:
            store.close()
    base = ItemStore(root / ITEMS_DB)
    try:
        items = [it for it in base.all() if it.id not in rows]
    finally:
        base.close()
    items += [it for it in rows.values() if it is not None]
    return sorted(items, key=lambda it: it.id)


def open_bundle(bundles_dir: Path, version: str | None = None, checksums: bool = True) -> Bundle:
    """Open the bundle `CURRENT` names (or `version`), verified."""
    bundles_dir = Path(bundles_dir)
    name = version or read_current(bundles_dir)
    return open_bundle_dir(bundles_dir / name, checksums=checksums)


def list_versions(bundles_dir: Path) -> list[str]:
    """Published bundle names, oldest first (names sort by creation time)."""
    bundles_dir = Path(bundles_dir)
    if not bundles_dir.is_dir():
        return []
    return sorted(p.name for p in bundles_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
