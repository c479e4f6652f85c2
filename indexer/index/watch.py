"""`clipsearch index --watch`: follow a folder with watchfiles and publish each settled batch of changes as
a delta version (docs/live.md, "Live collections").

`follow` turns file events into batches (a batch ends after `settle_s` without a new event, or
`max_batch_s` after it began), polls on network file systems, and waits out a folder that disappears;
`watch` holds the bundles dir's lock for its whole life, brings the bundle up to date, and hands every
batch to a `LiveIndexer`.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import watchfiles

from indexer.core.bundle.manifest import BundleError
from indexer.core.bundle.read import Bundle, open_bundle_dir, read_current
from indexer.core.encoder import resolve_device
from indexer.core.errors import ClipsearchError
from indexer.data.sources import folder_changes
from indexer.index.cache import FileStates
from indexer.index.compact import staging_root
from indexer.index.live import LiveIndexer, LiveResult
from indexer.index.lock import exclusive_lock
from indexer.index.publish import clean_temp
from indexer.index.runner import IndexingError, ReindexConfig, _check_inputs, _fingerprint, reindex_locked

log = logging.getLogger(__name__)

# File systems whose changes made elsewhere raise no local events (/proc/self/mountinfo type names).
NETWORK_FS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "afs",
        "ceph",
        "glusterfs",
        "lustre",
        "gpfs",
        "vboxsf",
        "virtiofs",
        "davfs",
        "ncpfs",
        "beegfs",
        "fuse",
        "fuseblk",
    }
)
GONE_CHECK_S = 1.0  # how often a folder that disappeared is looked for


@dataclass(frozen=True)
class WatchConfig:
    settle_s: float = 0.5  # a batch ends after this long without a new event ...
    max_batch_s: float = 30.0  # ... or this long after its first event
    poll: bool | None = None  # None: poll on network and FUSE file systems, else file-system events
    poll_delay_ms: int = 300  # polling interval (WATCHFILES_POLL_DELAY_MS overrides it)
    catch_up: bool = True  # scan the folder first; off only for a base that is not the folder's (benchmarks)


@dataclass(frozen=True)
class Batch:
    paths: frozenset[str]


@dataclass(frozen=True)
class Rescan:
    """Everything must be looked at again: the watch has (re)started, at first or after the folder was
    gone. Sent once the watch is live, so a change made during the rescan is a batch after it."""


def filesystem_type(path: Path) -> str | None:
    """The type of the file system `path` is on, from /proc/self/mountinfo (None where that is unknown)."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    target, best, kind = os.path.realpath(path), "", None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount = fields[4].replace("\\040", " ")
        inside = target == mount or target.startswith(mount.rstrip("/") + "/")
        if inside and len(mount) >= len(best):
            best, kind = mount, right.split()[0]
    return kind


def should_poll(path: Path, poll: bool | None) -> bool:
    if poll is not None:
        return poll
    kind = filesystem_type(path) or ""
    return kind in NETWORK_FS or kind.startswith("fuse.")


def _identity(root: Path) -> tuple[int, int] | None:
    try:
        st = os.stat(root)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if os.path.isdir(root) else None


def _wait_for(root: Path, stop: threading.Event) -> bool:
    """Block until `root` is a folder again; False if stopped first."""
    log.warning("%s is gone; nothing is removed from the index, watching for it to come back", root)
    while not stop.is_set():
        if _identity(root) is not None:
            log.info("%s is back; scanning it", root)
            return True
        stop.wait(GONE_CHECK_S)
    return False


def follow(root: Path, cfg: WatchConfig, stop: threading.Event) -> Iterator[Batch | Rescan | None]:
    """`Rescan` whenever the watch (re)starts, then settled batches of changed paths below `root`, and
    None on idle ticks (a few times a second) so the caller can do its housekeeping."""
    root = root.resolve()
    poll = should_poll(root, cfg.poll)
    tick_ms = max(20, int(min(cfg.settle_s, 0.25) * 1000))
    while not stop.is_set():
        ident = _identity(root)
        if ident is None:
            if not _wait_for(root, stop):
                return
            continue
        pending: set[str] = set()
        first = last = 0.0
        started = False
        inner = threading.Event()
        try:
            events = watchfiles.watch(
                root,
                watch_filter=None,
                debounce=tick_ms,
                step=min(50, tick_ms),
                stop_event=inner,
                rust_timeout=tick_ms,
                yield_on_timeout=True,
                force_polling=poll,
                poll_delay_ms=cfg.poll_delay_ms,
                ignore_permission_denied=True,
            )
            for changes in events:
                now = time.monotonic()
                if stop.is_set() or _identity(root) != ident:
                    inner.set()
                    break
                if not started:  # the watch is live from here: rescan, and nothing made meanwhile is lost
                    started = True
                    log.info("watching %s (%s)", root, "polling" if poll else "file-system events")
                    yield Rescan()
                if changes:
                    pending |= {path for _, path in changes}
                    first, last = first or now, now
                if pending and (now - last >= cfg.settle_s or now - first >= cfg.max_batch_s):
                    yield Batch(frozenset(pending))
                    pending, first, last = set(), 0.0, 0.0
                elif not pending:
                    yield None
        except OSError as e:  # e.g. the inotify watch limit: polling needs no kernel watches
            if poll:
                raise
            log.warning("file-system events unavailable for %s (%s); polling instead", root, e)
            poll = True
        if pending and not stop.is_set():
            yield Batch(frozenset(pending))  # what changed before the folder went


def _open_current(bundles_dir: Path) -> Bundle | None:
    """CURRENT, verified (checksums read once; the watcher reuses it from then on), or None."""
    try:
        return open_bundle_dir(bundles_dir / read_current(bundles_dir), mmap=True)
    except BundleError as e:
        if (bundles_dir / "CURRENT").exists():
            log.warning("the current bundle cannot be used (%s); building a new one", e)
        return None


def _same_model(cfg: ReindexConfig, bundle: Bundle) -> bool:
    states = FileStates(cfg.bundles_dir)
    try:
        fingerprint = _fingerprint(cfg.model_dir, states, False)
    finally:
        states.close()
    variant = cfg.embed.numerics(resolve_device(cfg.device).type) or "default"
    return (
        bundle.manifest.model.fingerprint == fingerprint and bundle.manifest.stats.get("numerics") == variant
    )


def first_pass(
    cfg: ReindexConfig, wcfg: WatchConfig, on_publish: Callable[[LiveResult], None] | None
) -> LiveIndexer:
    """Bring the bundle up to date with the folder: a delta if a usable version exists, else a full build."""
    bundle = None if cfg.full else _open_current(cfg.bundles_dir)
    if bundle is not None and not _same_model(cfg, bundle):
        log.info("the current bundle was embedded with another model: a full build")
        bundle.close()
        bundle = None
    if bundle is None:
        result = reindex_locked(cfg)
        if on_publish is not None:
            on_publish(
                LiveResult(
                    result.bundle,
                    result.added,
                    result.updated,
                    result.removed,
                    result.images,
                    result.texts,
                    result.skipped,
                    result.seconds,
                    kind="full",
                )
            )
        bundle = _open_current(cfg.bundles_dir)
        if bundle is None:
            raise IndexingError("the bundle just published cannot be opened")
    return LiveIndexer(cfg, bundle, on_publish)


def watch(
    cfg: ReindexConfig,
    wcfg: WatchConfig | None = None,
    stop: threading.Event | None = None,
    on_publish: Callable[[LiveResult], None] | None = None,
) -> None:
    """Index `cfg.source` (a folder) and keep following it until `stop` is set (or the process ends)."""
    wcfg = wcfg or WatchConfig()
    stop = stop or threading.Event()
    root = Path(cfg.source.source)
    if not root.is_dir():
        raise IndexingError(f"--watch follows a folder; --images {cfg.source.source} is not one")
    _check_inputs(cfg)
    cfg.bundles_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(cfg.bundles_dir, "index --watch"):
        clean_temp(cfg.bundles_dir)
        shutil.rmtree(staging_root(cfg.bundles_dir), ignore_errors=True)
        live = first_pass(cfg, wcfg, on_publish)
        live.encoder.get()  # loaded now, not when the first file arrives
        texts = str(cfg.texts_file.resolve()) if cfg.texts_file is not None else None
        retry = _Retry()
        rescans = 0
        try:
            for event in follow(root, wcfg, stop):
                with retry.guard():
                    if isinstance(event, Rescan):
                        rescans += 1
                        if wcfg.catch_up or rescans > 1:
                            live.catch_up()
                    elif isinstance(event, Batch):
                        paths = set(event.paths)
                        texts_changed = texts is not None and texts in paths
                        changed = paths - {texts} if texts else paths
                        live.apply(folder_changes(root, changed, cfg.source.exclude), texts_changed)
                    elif retry.due():
                        retry.at = None
                        live.catch_up()  # after a failed step: look at everything again
                        retry.delay = 5.0
                    live.collect_rebuild()
        finally:
            live.close()


class _Retry:
    """A step that fails (a file system error, a disk full while publishing) is logged, not fatal: the
    watcher keeps running and rescans the folder after a back-off (5 s, doubling to 5 min)."""

    def __init__(self) -> None:
        self.delay = 5.0
        self.at: float | None = None

    def due(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at

    @contextmanager
    def guard(self) -> Iterator[None]:
        try:
            yield
        except (ClipsearchError, OSError) as e:
            log.warning("a step failed (%s); rescanning in %.0f s", e, self.delay)
            self.at, self.delay = time.monotonic() + self.delay, min(300.0, self.delay * 2)
