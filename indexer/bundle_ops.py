"""Housekeeping on a bundles dir: describe, verify and prune bundles (`clipsearch bundles ...`)."""

from __future__ import annotations

import logging
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

from indexer.bundle import (
    CURRENT,
    ITEMS_DB,
    BundleError,
    BundleManifest,
    clean_temp,
    leased_versions,
    list_versions,
    load_manifest,
    open_bundle_dir,
)
from indexer.cache import EmbeddingCache, cache_files, remove_work_file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundleInfo:
    version: str
    current: bool
    leased: bool
    manifest: BundleManifest | None
    size_bytes: int
    problem: str | None = None  # set when the manifest cannot be read

    def as_dict(self) -> dict[str, object]:
        m = self.manifest
        return {
            "version": self.version,
            "current": self.current,
            "leased": self.leased,
            "created_at": m.created_at if m else None,
            "images": m.images.count if m else None,
            "texts": m.texts.count if m else None,
            "model": m.model.name if m else None,
            "fingerprint": m.model.fingerprint if m else None,
            "index": m.images.factory if m else None,
            "recall_at_10": m.images.recall_at_10 if m else None,
            "size_bytes": self.size_bytes,
            "problem": self.problem,
        }


def current_version(bundles_dir: Path) -> str | None:
    try:
        return (Path(bundles_dir) / CURRENT).read_text().strip() or None
    except FileNotFoundError:
        return None


def _dir_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def describe(bundles_dir: Path) -> list[BundleInfo]:
    """Every published bundle, oldest first, without reading checksums (fast)."""
    current, leased = current_version(bundles_dir), leased_versions(bundles_dir)
    out = []
    for v in list_versions(bundles_dir):
        root = Path(bundles_dir) / v
        try:
            manifest, problem = load_manifest(root), None
        except BundleError as e:
            manifest, problem = None, str(e)
        out.append(BundleInfo(v, v == current, v in leased, manifest, _dir_size(root), problem))
    return out


def verify(bundles_dir: Path, versions: list[str] | None = None) -> dict[str, str | None]:
    """Open each bundle as the service would (checksums, counts, dimensions, fingerprint).

    Returns version -> None when it verifies, else the reason.
    """
    result: dict[str, str | None] = {}
    for v in versions or list_versions(bundles_dir):
        try:
            open_bundle_dir(Path(bundles_dir) / v).close()
            result[v] = None
        except BundleError as e:
            result[v] = str(e)
    return result


def prunable(bundles_dir: Path, keep: int) -> list[str]:
    """Bundles beyond the newest `keep`, except the current one and any a server holds a lease on."""
    protected = leased_versions(bundles_dir) | {current_version(bundles_dir) or ""}
    versions = list_versions(bundles_dir)
    old = versions[: max(0, len(versions) - keep)]
    return [v for v in old if v not in protected]


def prune(bundles_dir: Path, keep: int, dry_run: bool = False) -> list[str]:
    """Delete the `prunable` bundles (and temp leftovers); returns the names removed."""
    names = prunable(bundles_dir, keep)
    if not dry_run:
        clean_temp(bundles_dir)
        for v in names:
            shutil.rmtree(Path(bundles_dir) / v, ignore_errors=True)
            log.info("removed bundle %s", v)
    return names


def prune_cache(bundles_dir: Path, dry_run: bool = False) -> int:
    """Drop embedding caches of models no kept bundle uses, and vectors no kept bundle holds.

    Returns the number of cache files removed. (Vectors of a killed run not yet published go too.)
    """
    keep: dict[str, dict[str, set[str]]] = {}
    for info in describe(bundles_dir):
        if info.manifest is None:
            continue
        want = keep.setdefault(info.manifest.model.fingerprint, {"image": set(), "text": set()})
        conn = sqlite3.connect(f"file:{Path(bundles_dir) / info.version / ITEMS_DB}?mode=ro", uri=True)
        try:
            for kind, sha in conn.execute("SELECT kind, sha256 FROM items"):
                want[kind].add(sha)
        finally:
            conn.close()
    removed = 0
    for path in cache_files(bundles_dir):
        match = next((fp for fp in keep if fp.startswith(path.stem.split("-")[0])), None)
        if match is None:
            removed += 1
            if not dry_run:
                remove_work_file(path)
        elif not dry_run:
            dim = _cache_dim(path)
            if dim:
                variant = path.stem.split("-", 1)[1] if "-" in path.stem else ""
                cache = EmbeddingCache(bundles_dir, match, dim, variant=variant)
                cache.prune(keep[match])
                cache.close()
    return removed


def _cache_dim(path: Path) -> int | None:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT value FROM meta WHERE key = 'dim'").fetchone()
        finally:
            conn.close()
        return int(row[0]) if row else None
    except (sqlite3.DatabaseError, ValueError):
        return None
