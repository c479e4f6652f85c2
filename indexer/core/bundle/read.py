"""Opening a bundle: read CURRENT, check every file against the manifest, load the FAISS indexes.

This is what the service serves from and what `clipsearch bundles verify` runs; the rules are in
docs/architecture.md ("Bundle format").
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import faiss
import numpy as np

from indexer.core.bundle.items import ItemStore
from indexer.core.bundle.layout import CURRENT, ITEMS_DB, MODEL_DIR
from indexer.core.bundle.manifest import BundleError, BundleManifest, IndexSpec, load_manifest
from indexer.core.hashing import HashedFile, file_sha256
from indexer.core.modeldir import WEIGHTS_NAME

Target = Literal["images", "texts"]


@dataclass
class Bundle:
    """An opened, verified bundle: what the service serves from."""

    root: Path
    manifest: BundleManifest
    image_index: faiss.Index
    text_index: faiss.Index
    items: ItemStore

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def model_dir(self) -> Path:
        return self.root / MODEL_DIR

    def count(self, target: Target) -> int:
        return int(self.image_index.ntotal if target == "images" else self.text_index.ntotal)

    def search(self, target: Target, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The `k` nearest items of `target` to each query: (scores, ids), both (n_queries, k), best first.

        `queries` is (n, dim) float32, L2-normalised; scores are cosine similarities. Where fewer than `k`
        items exist the row is padded with id -1. Every search of a bundle goes through here.
        """
        index = self.image_index if target == "images" else self.text_index
        if k == 0 or index.ntotal == 0:
            n = len(queries)
            return np.zeros((n, k), np.float32), np.full((n, k), -1, np.int64)
        scores, ids = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return scores, ids

    def close(self) -> None:
        self.items.close()


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
) -> None:
    """Every file the manifest lists exists with its size (and sha256); the model fingerprint agrees.

    `known` (the indexer's verify-on-publish only): sha256s this process computed for files it has just
    written or linked, by manifest path; such a file is not read again while `still_holds` is true.
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
        if checksums and _sha256_now(path, known.get(rel)) != entry.sha256:
            raise BundleError(f"{root.name}: {rel} does not match its sha256 in the manifest")
    weights = f"{MODEL_DIR}/{WEIGHTS_NAME}"
    if weights not in manifest.files or manifest.files[weights].sha256 != manifest.model.fingerprint:
        raise BundleError(f"{root.name}: model weights do not match the manifest's model fingerprint")


def _sha256_now(path: Path, hashed: HashedFile | None) -> str:
    """`hashed`'s sha256 while it still describes `path`, else `path` read and hashed now."""
    return hashed.sha256 if hashed is not None and hashed.still_holds(path) else file_sha256(path)


def _check_index(root: Path, index: faiss.Index, spec: IndexSpec, dim: int, what: str) -> None:
    if index.d != dim:
        raise BundleError(f"{root.name}: {what} index has dimension {index.d}, the model embeds to {dim}")
    if index.ntotal != spec.count:
        raise BundleError(
            f"{root.name}: {what} index holds {index.ntotal} vectors, manifest says {spec.count}"
        )


def _apply_search_params(index: faiss.Index, spec: IndexSpec) -> None:
    if spec.params:
        ps = faiss.ParameterSpace()
        ps.set_index_parameters(index, ",".join(f"{k}={v}" for k, v in spec.params.items()))  # type: ignore[arg-type]


def _open_items(root: Path, manifest: BundleManifest) -> ItemStore:
    items = ItemStore(root / ITEMS_DB)
    try:
        for kind, spec in (("image", manifest.images), ("text", manifest.texts)):
            n = items.count(kind)  # type: ignore[arg-type]
            if n != spec.count:
                raise BundleError(
                    f"{root.name}: items.sqlite has {n} {kind} rows, the index has {spec.count}"
                )
    except sqlite3.DatabaseError as e:
        items.close()
        raise BundleError(f"{root.name}: items.sqlite is unreadable: {e}") from e
    except BundleError:
        items.close()
        raise
    return items


def open_bundle_dir(
    root: Path, checksums: bool = True, known: Mapping[str, HashedFile] | None = None
) -> Bundle:
    """Open and verify one bundle directory (checksums, dimensions, counts, model fingerprint).

    `known` is for the indexer's own verify-on-publish only (see `verify_files`); readers leave it unset.
    """
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"bundle {root} does not exist")
    manifest = load_manifest(root)
    verify_files(root, manifest, checksums=checksums, known=known)
    try:
        image_index = faiss.read_index(str(root / manifest.images.file))
        text_index = faiss.read_index(str(root / manifest.texts.file))
    except RuntimeError as e:
        raise BundleError(f"{root.name}: cannot read a FAISS index: {e}") from e
    dim = manifest.model.embed_dim
    _check_index(root, image_index, manifest.images, dim, "image")
    _check_index(root, text_index, manifest.texts, dim, "text")
    _apply_search_params(image_index, manifest.images)
    _apply_search_params(text_index, manifest.texts)
    items = _open_items(root, manifest)
    return Bundle(root=root, manifest=manifest, image_index=image_index, text_index=text_index, items=items)


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
