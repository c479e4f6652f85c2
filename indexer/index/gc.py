"""Pruning a bundles dir: old bundles, leftovers of interrupted runs, and cached vectors no kept bundle
uses (`clipsearch bundles gc`, and `index --keep` after each publish)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

from indexer.core.bundle.inventory import current_version, describe
from indexer.core.bundle.leases import leased_versions
from indexer.core.bundle.read import list_versions, live_items
from indexer.index.cache import EmbeddingCache, cache_dim, cache_files, remove_work_file
from indexer.index.publish import clean_temp

log = logging.getLogger(__name__)


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


def _kept_contents(bundles_dir: Path) -> dict[str, dict[str, set[str]]]:
    """model fingerprint -> kind -> the content sha256s some kept bundle holds."""
    keep: dict[str, dict[str, set[str]]] = {}
    for info in describe(bundles_dir):
        if info.manifest is None:
            continue
        want = keep.setdefault(info.manifest.model.fingerprint, {"image": set(), "text": set()})
        for item in live_items(Path(bundles_dir) / info.version, info.manifest):  # base and segments
            if item.sha256:
                want[item.kind].add(item.sha256)
    return keep


def prune_cache(bundles_dir: Path, dry_run: bool = False) -> int:
    """Drop embedding caches of models no kept bundle uses, and vectors no kept bundle holds.

    Returns the number of cache files removed. (Vectors of a killed run not yet published go too.)
    """
    keep = _kept_contents(bundles_dir)
    removed = 0
    for path in cache_files(bundles_dir):
        match = next((fp for fp in keep if fp.startswith(path.stem.split("-")[0])), None)
        if match is None:
            removed += 1
            if not dry_run:
                remove_work_file(path)
        elif not dry_run:
            dim = cache_dim(path)
            if dim:
                variant = path.stem.split("-", 1)[1] if "-" in path.stem else ""
                cache = EmbeddingCache(bundles_dir, match, dim, variant=variant)
                cache.prune(keep[match])
                cache.close()
    return removed
