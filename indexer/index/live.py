"""A live collection (docs/live.md): what the served version holds, by source key, and the step that turns
a batch of changed paths — or a full scan of the folder — into a delta version.

`LiveIndexer` keeps, for the watcher's lifetime, the open current version (its layers reused to verify
each new one), the loaded model, the embedding cache and an in-memory map of keys to ids, so a batch costs
time in proportion to its size. Ids follow the rules of a plain run (`runner._assign_ids`): an image
keeps its id while its path stays, a text while it is the same, new items get ids never used before.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from indexer.core.bundle.items import Item, Skipped
from indexer.core.bundle.layout import SKIPPED, WORK_DIR
from indexer.core.bundle.read import Bundle
from indexer.core.encoder import resolve_device
from indexer.data.corpus import read_texts_file, text_sha256
from indexer.data.sources import FolderChanges, Record, read_records
from indexer.index.cache import EmbeddingCache, FileStates, ImageFacts
from indexer.index.compact import Compactor, needs_rebuild
from indexer.index.embed import embed_images, embed_texts
from indexer.index.gc import prune
from indexer.index.ids import IdState, ids_path, save_state, update_state
from indexer.index.runner import (
    LazyEncoder,
    ReindexConfig,
    _fingerprint,
    _image_item,
    _image_jobs,
    _split,
    image_facts,
)
from indexer.index.scan import SourceImage, scan
from indexer.index.segments import SegmentContents, publish_version

log = logging.getLogger(__name__)


@dataclass
class LiveImage:
    """An indexed image as its row records it (what decides whether a file changed)."""

    id: int
    sha256: str
    text: str | None  # the first caption: the row's `text`
    mtime: float | None
    fields: dict[str, Any] = field(default_factory=dict)  # user fields (a sidecar .json)


@dataclass
class LiveState:
    """The served version, by key: images, texts, the captions each source record brings, skipped files."""

    images: dict[str, LiveImage]
    texts: dict[str, int]  # text -> id
    captions: dict[str, tuple[str, ...]]  # record key -> its captions (every record, usable or not)
    owners: Counter[str]  # text -> how many records (and the --texts file) bring it
    extra: tuple[str, ...]
    skipped: dict[str, Skipped]
    next_id: int
    folders: dict[str, set[str]] = field(default_factory=dict)  # folder -> image keys directly in it
    # keys whose id changed since the id record was last written (`LiveIndexer._record_ids`)
    changed_images: set[str] = field(default_factory=set)
    changed_texts: set[str] = field(default_factory=set)

    @classmethod
    def of(cls, bundle: Bundle, extra: Sequence[str]) -> LiveState:
        """From the version alone, which records only each image's first caption: exact once a full scan
        (`LiveIndexer.catch_up`) has run; until then texts are only ever added."""
        images: dict[str, LiveImage] = {}
        texts: dict[str, int] = {}
        captions: dict[str, tuple[str, ...]] = {}
        for it in bundle.items.all():
            if it.kind == "image" and it.path is not None:
                images[it.path] = LiveImage(it.id, it.sha256 or "", it.text, it.mtime, dict(it.fields))
                captions[it.path] = (it.text,) if it.text else ()
            elif it.text is not None:
                texts[it.text] = it.id
        owners = Counter(c for caps in captions.values() for c in caps) + Counter(set(extra))
        top = max([*(i.id for i in images.values()), *texts.values()], default=-1)
        next_id = max(int(bundle.manifest.stats.get("next_id", 0)), top + 1)
        state = cls(
            images, texts, captions, owners, tuple(extra), _read_skipped(bundle.root / SKIPPED), next_id
        )
        for key in images:
            state.folders.setdefault(os.path.dirname(key), set()).add(key)
        return state

    def id_state(self) -> IdState:
        """The ids this state gives out, as the indexer's id record keeps them."""
        images = {key: (img.id, img.sha256) for key, img in self.images.items()}
        return IdState(images=images, texts=dict(self.texts), next_id=self.next_id)

    def keys_under(self, prefixes: Iterable[str]) -> set[str]:
        """Known image keys below any of `prefixes` (folders that moved or vanished)."""
        out: set[str] = set()
        for prefix in prefixes:
            if prefix in self.images:
                continue
            for folder, keys in self.folders.items():
                if folder == prefix or folder.startswith(prefix + os.sep):
                    out |= keys
        return out

    def set_image(self, key: str, image: LiveImage | None) -> None:
        folder = os.path.dirname(key)
        self.changed_images.add(key)
        if image is None:
            self.images.pop(key, None)
            self.folders.get(folder, set()).discard(key)
        else:
            self.images[key] = image
            self.folders.setdefault(folder, set()).add(key)


def _read_skipped(path: Path) -> dict[str, Skipped]:
    out: dict[str, Skipped] = {}
    try:
        for line in path.read_text().splitlines():
            if line.strip():
                row = Skipped(**json.loads(line))
                out[row.path] = row
    except (OSError, ValueError, TypeError):
        pass  # only informational: the next scan lists what fails again
    return out


@dataclass(frozen=True)
class LiveResult:
    """What one publish changed; `summary()` is the watcher's `--json` line."""

    bundle: str
    added: int
    updated: int
    removed: int
    images: int
    texts: int
    skipped: int
    seconds: float
    kind: str = "delta"  # delta | base (a rebuilt base) | full (a plain run's full build)

    def summary(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Delta:
    owned: set[int] = field(default_factory=set)
    image_rows: list[Item] = field(default_factory=list)
    text_rows: list[Item] = field(default_factory=list)
    added: int = 0
    updated: int = 0
    removed: int = 0


class LiveIndexer:
    """The watcher's indexer: one open version, the model, the cache; `apply` publishes a batch's delta."""

    def __init__(
        self,
        cfg: ReindexConfig,
        bundle: Bundle,
        on_publish: Callable[[LiveResult], None] | None = None,
    ) -> None:
        self.cfg, self.bundle, self.on_publish = cfg, bundle, on_publish
        self.bundles_dir = cfg.bundles_dir
        self.work = cfg.bundles_dir / WORK_DIR
        self.states = FileStates(cfg.bundles_dir)
        fingerprint = _fingerprint(cfg.model_dir, self.states, False)
        variant = cfg.embed.numerics(resolve_device(cfg.device).type)
        self.cache = EmbeddingCache(
            cfg.bundles_dir, fingerprint, bundle.manifest.model.embed_dim, variant=variant
        )
        self.encoder = LazyEncoder(cfg.model_dir, cfg.device, cfg.embed, fingerprint)
        self.state = LiveState.of(bundle, self._extra())
        self.compactor = Compactor(cfg.bundles_dir, self.cache, cfg.index)
        self._ids_whole = True  # the next id record is written whole (it may not match this state yet)
        self._record_ids()  # now, so that the first delta costs only its change

    def close(self) -> None:
        self.compactor.wait(timeout=0)
        self.bundle.close()
        self.cache.close()
        self.states.close()

    def _extra(self) -> tuple[str, ...]:
        texts = self.cfg.texts_file
        if texts is None or not texts.is_file():
            return ()
        return tuple(dict.fromkeys(read_texts_file(texts, self.cfg.source.caption_column)))

    # --- the two ways in -------------------------------------------------------------------------

    def _source_present(self) -> bool:
        return Path(self.cfg.source.source).is_dir()

    def catch_up(self) -> LiveResult | None:
        """A full scan of the source diffed against the served version (start, folder back, a restart).

        While the folder is missing nothing changes (it may be an unplugged drive): None, no version.
        """
        if not self._source_present():
            return None
        records = read_records(self.cfg.source)
        if not self._source_present():  # it went away while it was listed: the listing proves nothing
            return None
        keys = {r.key for r in records} | set(self.state.images) | set(self.state.captions)
        return self._step(keys, records, complete=True, extra=self._extra())

    def apply(self, changes: FolderChanges, texts_changed: bool = False) -> LiveResult | None:
        """A watcher's batch: the records it touches, and every known one below a folder that moved.

        Skipped (None) while the folder itself is missing: the scan when it is back decides.
        """
        if not self._source_present():
            return None
        keys = changes.keys | self.state.keys_under(changes.prefixes)
        extra = self._extra() if texts_changed else None
        return self._step(keys, list(changes.records), complete=False, extra=extra)

    # --- one step -------------------------------------------------------------------------------

    def _step(
        self, keys: set[str], records: list[Record], complete: bool, extra: tuple[str, ...] | None
    ) -> LiveResult | None:
        start = time.perf_counter()
        records = sorted((r for r in records if r.key in keys), key=lambda r: r.key)
        present = {r.key for r in records}
        known = None if complete else self.states.load_keys(present)
        scanned = scan(records, self.states, full=False, known=known)
        self.states.forget(keys - present)
        jobs = _image_jobs(scanned.images, self.cache)
        failures: dict[str, tuple[str, str]] = {}
        if jobs:
            report = embed_images(self.encoder.get(), jobs, self.cache, self.cfg.embed, self.work)
            failures = dict(report.failures)
        usable, failed = _split(scanned, failures, self.cache)
        delta = _Delta()
        self._diff_images(delta, sorted(keys), {img.key: img for img in usable})
        self._diff_texts(delta, records, keys, complete, extra)
        skipped_before = dict(self.state.skipped)
        for key in keys:
            self.state.skipped.pop(key, None)
        self.state.skipped.update((s.path, s) for s in failed)
        if not delta.owned and self.state.skipped == skipped_before:
            return None
        return self._publish(delta, start)

    def _diff_images(self, delta: _Delta, keys: list[str], usable: dict[str, SourceImage]) -> None:
        sizes = image_facts(self.cache, usable.values())
        for key in keys:
            old, new = self.state.images.get(key), usable.get(key)
            if new is None:
                if old is not None:
                    delta.owned.add(old.id)
                    delta.removed += 1
                    self.state.set_image(key, None)
                continue
            item_id = old.id if old is not None else self._new_id()
            row = _image_item(item_id, new, sizes.get(new.sha256, ImageFacts()))
            same = (old.sha256, old.text, old.mtime, old.fields) if old is not None else None
            if same == (row.sha256, row.text, row.mtime, dict(row.fields)):
                continue
            delta.owned.add(item_id)
            delta.image_rows.append(row)
            delta.added += old is None
            delta.updated += old is not None and old.sha256 != new.sha256
            self.state.set_image(key, LiveImage(item_id, new.sha256, row.text, row.mtime, dict(row.fields)))

    def _diff_texts(
        self,
        delta: _Delta,
        records: list[Record],
        keys: set[str],
        complete: bool,
        extra: tuple[str, ...] | None,
    ) -> None:
        """Texts no record brings any more are removed, new ones added (embedded if the cache lacks them)."""
        state = self.state
        now = {r.key: r.captions for r in records}
        if complete:
            order = [c for r in records for c in r.captions]
            state.captions = dict(now)
            state.extra = extra if extra is not None else state.extra
            state.owners = Counter(c for caps in now.values() for c in set(caps)) + Counter(set(state.extra))
            touched = set(state.texts) | set(order) | set(state.extra)
            order += list(state.extra)
        else:
            order = []
            for key in sorted(keys):
                old, new = state.captions.pop(key, ()), now.get(key, ())
                state.owners.subtract(set(old))
                state.owners.update(set(new))
                if key in now:
                    state.captions[key] = new
                order += [*old, *new]
            if extra is not None:
                state.owners.subtract(set(state.extra))
                state.owners.update(set(extra))
                order += [*state.extra, *extra]
                state.extra = extra
            touched = set(order)
        for text in sorted(t for t in touched if t in state.texts and state.owners[t] <= 0):
            delta.owned.add(state.texts.pop(text))
            state.changed_texts.add(text)
        for text in dict.fromkeys(order):
            if text not in state.texts and state.owners[text] > 0:
                state.texts[text] = item_id = self._new_id()
                state.changed_texts.add(text)
                delta.owned.add(item_id)
                delta.text_rows.append(Item(id=item_id, kind="text", text=text, sha256=text_sha256(text)))
        for text in touched:  # drop zero counts (only these can have reached zero; `+owners` costs O(N))
            if state.owners[text] <= 0:
                del state.owners[text]
        missing = {r.sha256: r.text for r in delta.text_rows if r.sha256}
        missing = {s: t for s, t in missing.items() if s not in self.cache.known("text", list(missing))}
        if missing:
            embed_texts(
                self.encoder.get(), [(s, t or "") for s, t in missing.items()], self.cache, self.cfg.embed
            )

    def _new_id(self) -> int:
        item_id, self.state.next_id = self.state.next_id, self.state.next_id + 1
        return item_id

    # --- publishing -----------------------------------------------------------------------------

    def _vectors(self, rows: list[Item], kind: str) -> np.ndarray:
        shas = [r.sha256 or "" for r in rows]
        blocks = list(self.cache.blocks(kind, shas)) if shas else []
        dim = self.bundle.manifest.model.embed_dim
        return np.concatenate(blocks) if blocks else np.zeros((0, dim), np.float32)

    def _stats(self, delta: _Delta) -> dict[str, Any]:
        images = len(self.state.images)
        return {
            "added": delta.added,
            "updated": delta.updated,
            "removed": delta.removed,
            "unchanged": images - delta.added - delta.updated,
            "skipped": len(self.state.skipped),
            "next_id": self.state.next_id,
        }

    def _publish(self, delta: _Delta, start: float) -> LiveResult:
        rows = [*delta.image_rows, *delta.text_rows]
        vectors = np.concatenate(
            [self._vectors(delta.image_rows, "image"), self._vectors(delta.text_rows, "text")]
        )
        contents = SegmentContents(frozenset(delta.owned), rows, vectors)
        skipped = sorted(self.state.skipped.values(), key=lambda s: s.path)
        self._record_ids()
        try:
            new = publish_version(
                self.bundles_dir, self.bundle, delta=contents, skipped=skipped, stats=self._stats(delta)
            )
        except BaseException:
            self.state = LiveState.of(self.bundle, self.state.extra)  # back to what CURRENT holds
            self._ids_whole = True
            raise
        result = self._swap(new, start, delta, "delta")
        if needs_rebuild(self.bundle):
            self.compactor.start(self.bundle)
        return result

    def _record_ids(self) -> None:
        """The id record goes first, as for a full run: a later run must never hand these ids to others.

        Written whole after opening or a failed publish, then only what changed (a delta at 1M items
        would otherwise rewrite a million rows: seconds of every publish, docs/live.md).
        """
        state = self.state
        if self._ids_whole or not ids_path(self.bundles_dir).exists():
            save_state(self.bundles_dir, state.id_state())
        else:
            images = {
                k: (i.id, i.sha256) if (i := state.images.get(k)) else None for k in state.changed_images
            }
            texts = {t: state.texts.get(t) for t in state.changed_texts}
            update_state(self.bundles_dir, images, texts, state.next_id)
        state.changed_images.clear()
        state.changed_texts.clear()
        self._ids_whole = False

    def _swap(self, new: Bundle, start: float, delta: _Delta | None, kind: str) -> LiveResult:
        old, self.bundle = self.bundle, new
        old.close()
        if self.cfg.keep > 0:
            prune(self.bundles_dir, self.cfg.keep)
        d = delta or _Delta()
        result = LiveResult(
            bundle=new.version,
            added=d.added,
            updated=d.updated,
            removed=d.removed,
            images=new.count("images"),
            texts=new.count("texts"),
            skipped=len(self.state.skipped),
            seconds=round(time.perf_counter() - start, 3),
            kind=kind,
        )
        log.info("published %s (%s): %s", new.version, kind, result.summary())
        if self.on_publish is not None:
            self.on_publish(result)
        return result

    def collect_rebuild(self) -> LiveResult | None:
        """Publish a finished base rebuild under the segments written since it began."""
        base = self.compactor.take()
        if base is None:
            return None
        start = time.perf_counter()
        skipped = sorted(self.state.skipped.values(), key=lambda s: s.path)
        self._record_ids()
        try:
            new = publish_version(self.bundles_dir, self.bundle, base=base, skipped=skipped)
        finally:
            self.compactor.discard(base)
        return self._swap(new, start, None, "base")
