"""The reader stage: list the source, stat every image, hash only what changed, and diff against the
previous bundle so ids stay stable and the run knows what is new.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import tarfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from indexer.core.bundle.items import Item, Skipped
from indexer.core.bundle.layout import CURRENT
from indexer.core.bundle.manifest import BundleError, BundleManifest, load_manifest
from indexer.core.bundle.read import list_versions, live_items, open_bundle_dir, read_current
from indexer.data.sources import Record
from indexer.index.cache import FileState, FileStates
from indexer.index.ids import IdState, IdStateError, high_water, ids_path, load_ids
from indexer.index.stages import reached

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SourceImage:
    """One image of the source with its content hash."""

    record: Record
    state: FileState
    mtime: float  # seconds, for `Item.mtime`

    @property
    def key(self) -> str:
        return self.record.key

    @property
    def sha256(self) -> str:
        return self.state.sha256


@dataclass
class Previous:
    """What the previous run left: the ids to keep stable (and count changes against), and the bundle to
    reuse the model files of."""

    version: str | None = None
    manifest: BundleManifest | None = None
    root: Path | None = None
    images: dict[str, tuple[int, str]] = field(default_factory=dict)  # key -> (id, sha256)
    texts: dict[str, int] = field(default_factory=dict)  # text -> id
    next_id: int = 0


def read_previous(bundles_dir: Path, reset_ids: bool = False) -> Previous:
    """The previous run's ids and bundle; never a silent restart of the ids from 0.

    Ids come from the indexer's record (`.work/ids.sqlite`), else from the bundle CURRENT names, else
    from the newest bundle that verifies; new ids start past every id any bundle here used. When none
    of these exists but bundles or CURRENT do, `IdStateError`; `reset_ids` numbers items from 0 on purpose.
    """
    bundles_dir = Path(bundles_dir)
    base = _base_bundle(bundles_dir)
    prev = (
        Previous()
        if base is None
        else Previous(version=base[0], manifest=base[1], root=bundles_dir / base[0])
    )
    if reset_ids:
        log.warning("--reset-ids: item ids start again from 0; ids clients cached may now name other items")
        return prev
    state = load_ids(bundles_dir)
    if state is None and base is not None:
        state = IdState.from_items(base[2], int(base[1].stats.get("next_id", 0)))
    if state is None and ((bundles_dir / CURRENT).exists() or list_versions(bundles_dir)):
        raise IdStateError(
            f"cannot tell which item ids {bundles_dir} already gave out: no bundle there can be read and "
            f"{ids_path(bundles_dir)} is missing; restore a bundle, or rerun with --reset-ids to number "
            "items from 0 (ids clients cached would then name other items)"
        )
    if state is not None:
        prev.images, prev.texts = state.images, state.texts
        prev.next_id = max(state.next_id, high_water(bundles_dir))
    return prev


def _base_bundle(bundles_dir: Path) -> tuple[str, BundleManifest, list[Item]] | None:
    """(version, manifest, items) of the bundle CURRENT names, else of the newest bundle that verifies."""
    refused = None
    try:
        version = read_current(bundles_dir)
        return version, *_read_bundle(bundles_dir / version)
    except (BundleError, sqlite3.DatabaseError, OSError) as e:
        if not (bundles_dir / CURRENT).exists() and not list_versions(bundles_dir):
            return None  # a first run
        refused = str(e)
    for version in reversed(list_versions(bundles_dir)):
        try:
            open_bundle_dir(bundles_dir / version).close()  # checksums, counts, dimensions
            manifest, items = _read_bundle(bundles_dir / version)
        except (BundleError, sqlite3.DatabaseError, OSError):
            continue
        log.warning(
            "cannot use CURRENT (%s); continuing from %s, the newest bundle that verifies", refused, version
        )
        return version, manifest, items
    log.warning("cannot use CURRENT (%s) and no bundle verifies", refused)
    return None


def _read_bundle(root: Path) -> tuple[BundleManifest, list[Item]]:
    manifest = load_manifest(root)
    return manifest, live_items(root, manifest)  # base and delta segments folded


def _signature(record: Record) -> tuple[int, int, float]:
    """(size, mtime_ns, mtime) of the file, or of the shard for a tar member."""
    st = os.stat(record.path if record.path is not None else record.shard)  # type: ignore[arg-type]
    return st.st_size, st.st_mtime_ns, st.st_mtime


@dataclass
class ScanResult:
    images: list[SourceImage]
    failed: list[Skipped]
    hashed: int  # files that had to be read because their signature changed


def scan(
    records: Sequence[Record], states: FileStates, full: bool, known: Mapping[str, FileState] | None = None
) -> ScanResult:
    """Stat every record; hash those whose (size, mtime) differ from the last run (all of them if `full`).

    `known`: the caller's rows of `states` for these records (a watcher's batch), instead of all of them.
    """
    known = {} if full else (known if known is not None else states.load())
    images: list[SourceImage] = []
    failed: list[Skipped] = []
    todo: list[tuple[Record, int, int, float]] = []
    for rec in records:
        try:
            size, mtime_ns, mtime = _signature(rec)
        except OSError as e:
            failed.append(_failure(rec.key, e))
            continue
        old = known.get(rec.key)
        if old is not None and (old.size, old.mtime_ns) == (size, mtime_ns):
            images.append(SourceImage(rec, old, mtime))
        else:
            todo.append((rec, size, mtime_ns, mtime))
    unchanged = len(images)
    hashed = _hash_all(todo, images, failed)
    states.put((img.key, img.state) for img in images[unchanged:])  # the rest are stored as they are
    order = {r.key: i for i, r in enumerate(records)}
    images.sort(key=lambda img: order[img.key])
    return ScanResult(images=images, failed=failed, hashed=hashed)


def _failure(key: str, e: OSError) -> Skipped:
    code = "not_found" if isinstance(e, FileNotFoundError) else "unreadable"
    return Skipped(key, code, f"{e.strerror or e}")


def _hash_all(
    todo: Iterable[tuple[Record, int, int, float]], out: list[SourceImage], failed: list[Skipped]
) -> int:
    by_shard: dict[Path, list[tuple[Record, int, int, float]]] = {}
    n = 0
    for item in todo:
        rec = item[0]
        if rec.path is None:
            by_shard.setdefault(rec.shard, []).append(item)  # type: ignore[arg-type]
            continue
        try:
            data = rec.path.read_bytes()
        except OSError as e:
            failed.append(_failure(rec.key, e))
            continue
        out.append(_hashed(item, data))
        n += 1
        reached("scan-hashed")
    for shard, items in by_shard.items():
        n += _hash_shard(shard, items, out, failed)
    return n


def _hashed(item: tuple[Record, int, int, float], data: bytes) -> SourceImage:
    rec, size, mtime_ns, mtime = item
    state = FileState(size, mtime_ns, hashlib.sha256(data).hexdigest(), len(data))
    return SourceImage(rec, state, mtime)


def _hash_shard(
    shard: Path,
    items: list[tuple[Record, int, int, float]],
    out: list[SourceImage],
    failed: list[Skipped],
) -> int:
    """Hash the wanted members of one tar in a single sequential pass."""
    wanted = {item[0].member: item for item in items}
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                item = wanted.pop(member.name, None)
                f = tar.extractfile(member) if item is not None else None
                if item is not None and f is not None:
                    out.append(_hashed(item, f.read()))
    except (tarfile.TarError, OSError) as e:
        log.warning("cannot read shard %s: %s", shard, e)
    for item in wanted.values():
        failed.append(Skipped(item[0].key, "unreadable", f"cannot read it from {shard}"))
    return len(items) - len(wanted)
