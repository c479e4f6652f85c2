"""Rebuilding a live collection's base (docs/live.md, "Compaction"): once the delta segments own more than
`threshold` ids, a new base is built in a background thread from the live items of the version at that
moment, with vectors from the embedding cache, while deltas keep being published on top of the old one.

The rebuild never reads the source: ids are assigned only by the watcher's main loop. The result is a
`NewBase` in a staging dir, which `segments.publish_version` puts under the segments written since.
"""

from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
from pathlib import Path

import faiss
import numpy as np

from indexer.core.bundle.items import Item, write_items
from indexer.core.bundle.layout import IMAGES_INDEX, ITEMS_DB, TEXTS_INDEX, WORK_DIR
from indexer.core.bundle.manifest import IndexSpec
from indexer.core.bundle.read import Bundle
from indexer.core.hashing import hash_file
from indexer.index.build import IndexConfig, build_index
from indexer.index.cache import EmbeddingCache
from indexer.index.publish import fsync_dir, fsync_file
from indexer.index.segments import NewBase

log = logging.getLogger(__name__)

MIN_REBUILD = 5_000  # owned ids in segments before the base is rebuilt ...
REBUILD_FRACTION = 0.01  # ... or this fraction of the base, whichever is larger


def owned_in_segments(bundle: Bundle) -> int:
    """Ids the version's segments own (each a row or a tombstone beside the base)."""
    return len(bundle.stack.owner)


def needs_rebuild(bundle: Bundle) -> bool:
    """The segments own more than max(MIN_REBUILD, REBUILD_FRACTION of the base) ids."""
    base = int(bundle.image_index.ntotal + bundle.text_index.ntotal)
    return owned_in_segments(bundle) > max(MIN_REBUILD, REBUILD_FRACTION * base)


def staging_root(bundles_dir: Path) -> Path:
    """Where rebuilt bases are written (indexer-private; same file system as the bundles, for hard links)."""
    return Path(bundles_dir) / WORK_DIR / "compact"


def build_base(bundles_dir: Path, bundle: Bundle, cache: EmbeddingCache, cfg: IndexConfig) -> NewBase:
    """Every item `bundle` serves as one new base, in a staging dir under `staging_root`."""
    items = bundle.items.all()
    dim = bundle.manifest.model.embed_dim
    staging = staging_root(bundles_dir) / secrets.token_hex(6)
    staging.mkdir(parents=True)
    try:
        specs = {}
        for kind, file in (("image", IMAGES_INDEX), ("text", TEXTS_INDEX)):
            index, spec = _index_of(cache, [it for it in items if it.kind == kind], kind, dim, cfg)
            faiss.write_index(index, str(staging / file))
            specs[kind] = spec.model_copy(update={"file": file})
        write_items(staging / ITEMS_DB, items)
        names = (IMAGES_INDEX, TEXTS_INDEX, ITEMS_DB)
        for name in names:
            fsync_file(staging / name)
        fsync_dir(staging)
        hashes = {name: hash_file(staging / name) for name in names}
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    segments = tuple(s.name for s in bundle.manifest.segments)
    return NewBase(staging, specs["image"], specs["text"], hashes, segments)


def _index_of(
    cache: EmbeddingCache, items: list[Item], kind: str, dim: int, cfg: IndexConfig
) -> tuple[faiss.Index, IndexSpec]:
    shas = [it.sha256 or "" for it in items]
    ids = np.asarray([it.id for it in items], np.int64)
    return build_index(lambda: cache.blocks(kind, shas), ids, dim, cfg)


class Compactor:
    """At most one base rebuild at a time, in a daemon thread; the main loop collects it when done."""

    def __init__(self, bundles_dir: Path, cache: EmbeddingCache, cfg: IndexConfig) -> None:
        self.bundles_dir, self.cache, self.cfg = bundles_dir, cache, cfg
        self._thread: threading.Thread | None = None
        self._result: NewBase | None = None
        self._failed_at: float | None = None
        self.retry_s = 300.0  # after a failed rebuild (e.g. a vector missing from the cache)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, bundle: Bundle) -> bool:
        """Begin rebuilding `bundle`'s base unless one is running or one failed recently."""
        if self.running or self._result is not None:
            return False
        if self._failed_at is not None and time.monotonic() - self._failed_at < self.retry_s:
            return False
        for layer in bundle.layers:  # kept open for the thread, whatever the main loop closes meanwhile
            layer.acquire()
        self._thread = threading.Thread(
            target=self._run, args=(bundle,), name="clipsearch-compact", daemon=True
        )
        self._thread.start()
        log.info(
            "rebuilding the base from %s (%d ids in segments)", bundle.version, owned_in_segments(bundle)
        )
        return True

    def _run(self, bundle: Bundle) -> None:
        cache = self.cache.reopen()  # SQLite connections belong to one thread
        start = time.perf_counter()
        try:
            self._result = build_base(self.bundles_dir, bundle, cache, self.cfg)
            log.info("base rebuilt in %.1fs", time.perf_counter() - start)
        except Exception:
            self._failed_at = time.monotonic()
            log.exception("rebuilding the base failed; deltas continue and it is retried later")
        finally:
            cache.close()
            bundle.close()

    def take(self) -> NewBase | None:
        """The finished rebuild, once (None while none is ready)."""
        if self.running:
            return None
        result, self._result = self._result, None
        return result

    def wait(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def discard(self, base: NewBase) -> None:
        shutil.rmtree(base.dir, ignore_errors=True)
