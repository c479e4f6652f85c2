"""The bundle + encoder the service answers from, swapped atomically on reload.

A request takes one `Snapshot` through `ServiceState.lease()` and uses only it, so it never mixes two
bundles; a snapshot replaced by a reload is closed only when the last request holding it lets go.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from indexer.core.bundle.leases import write_lease
from indexer.core.bundle.read import Bundle, list_versions, open_bundle_dir, read_current
from indexer.core.encoder import Encoder
from indexer.core.errors import ClipsearchError
from service.errors import not_ready
from service.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    """One verified bundle and the encoder that embeds queries for it."""

    bundle: Bundle
    encoder: Encoder
    collection_root: Path | None
    loaded_at: float = field(default_factory=time.time)
    _refs: int = 0
    _retired: bool = False

    @property
    def version(self) -> str:
        return self.bundle.version


@dataclass(frozen=True)
class Fallback:
    """Serving an older bundle because the one CURRENT names (`current`, None when CURRENT itself is
    unusable) was refused at start-up for `reason`."""

    current: str | None
    reason: str


@dataclass(frozen=True)
class ReloadResult:
    """What a reload attempt did: `changed` when a new bundle is now served, `error` when it failed."""

    version: str | None
    changed: bool
    error: str | None = None


def collection_root(bundle: Bundle) -> Path | None:
    """The folder every image of the bundle lies under (manifest stats, else the images' common folder).

    `/v1/items/{id}/image` refuses any file that resolves outside it (a symlink leading elsewhere).
    """
    declared = bundle.manifest.stats.get("collection_root")
    if isinstance(declared, str) and declared:
        return Path(declared).resolve()
    folder = bundle.image_folder()  # computed once per layer, so a delta reload costs only the delta
    return Path(folder).resolve() if folder is not None else None


class ServiceState:
    """Holds the current snapshot; loads, verifies and swaps in new bundles."""

    def __init__(
        self,
        settings: ServiceSettings,
        on_swap: Callable[[Snapshot], None] | None = None,
        on_refuse: Callable[[str], None] | None = None,
    ) -> None:
        self.settings = settings
        self.bundles_dir = Path(settings.bundles)
        self.last_error: str | None = "starting: no bundle loaded yet"
        self.fallback: Fallback | None = None  # set while serving an older bundle than CURRENT names
        self._on_swap = on_swap
        self._on_refuse = on_refuse
        self._current: Snapshot | None = None
        self._lock = threading.Lock()  # guards _current and reference counts
        self._load_lock = threading.Lock()  # one load at a time
        self._failed: dict[str, float] = {}  # version -> when it last failed to load
        self._last_logged: tuple[str | None, str] | None = None

    @property
    def current(self) -> Snapshot | None:
        return self._current

    @contextmanager
    def lease(self) -> Iterator[Snapshot]:
        """The current snapshot, kept open until the block ends; 503 `not_ready` when there is none."""
        with self._lock:
            snap = self._current
            if snap is None:
                raise not_ready(self.last_error or "no bundle loaded", self.settings.retry_after_s)
            snap._refs += 1
        try:
            yield snap
        finally:
            with self._lock:
                snap._refs -= 1
                close = snap._retired and snap._refs == 0
            if close:
                snap.bundle.close()

    def reload(self, force: bool = False) -> ReloadResult:
        """Load the bundle CURRENT names if it is new (blocking: run it off the event loop).

        A bundle that fails verification is recorded and the old one stays; polling retries it only
        after `reload_retry_s`, `force` (the admin route) retries at once.
        """
        with self._load_lock:
            try:
                name = read_current(self.bundles_dir)
            except ClipsearchError as e:
                return self._failure(None, str(e))
            current = self._current
            if current is not None and current.version == name:
                self._refresh_lease(name)
                return ReloadResult(name, changed=False)
            failed_at = self._failed.get(name)
            if not force and failed_at is not None and time.time() - failed_at < self.settings.reload_retry_s:
                return ReloadResult(current.version if current else None, False, self.last_error)
            try:
                snap = self._open(name, current)
            except (ClipsearchError, OSError, RuntimeError) as e:
                self._failed[name] = time.time()
                return self._failure(name, str(e))
            self._failed.pop(name, None)
            self._last_logged = None
            self._swap(snap)
            return ReloadResult(name, changed=True)

    def _failure(self, name: str | None, error: str) -> ReloadResult:
        """Log a refused bundle (once per reason); with nothing served yet, serve the newest that verifies."""
        current = self._current
        if current is None:
            self.last_error = error
        nothing_yet = name is None and not list_versions(self.bundles_dir)
        if (name, error) != self._last_logged:
            self._last_logged = (name, error)
            if not nothing_yet and self._on_refuse is not None:
                self._on_refuse(error)
            served = current.version if current else "nothing"
            level = logging.WARNING if nothing_yet else logging.ERROR
            log.log(level, "bundle %s refused: %s; serving %s", name or "(CURRENT)", error, served)
        if current is None and not nothing_yet:
            fallback = self._fallback(name, error)
            if fallback is not None:
                return ReloadResult(fallback, changed=True, error=error)
        return ReloadResult(current.version if current else None, changed=False, error=error)

    def _fallback(self, refused: str | None, reason: str) -> str | None:
        """Start-up only: serve the newest bundle that verifies instead of staying down."""
        for version in reversed(list_versions(self.bundles_dir)):
            failed_at = self._failed.get(version)
            if version == refused or (failed_at and time.time() - failed_at < self.settings.reload_retry_s):
                continue
            try:
                snap = self._open(version, None)
            except (ClipsearchError, OSError, RuntimeError) as e:
                self._failed[version] = time.time()
                log.error("bundle %s refused too: %s", version, e)
                continue
            self._swap(snap, Fallback(current=refused, reason=reason))
            what = f"CURRENT names {refused}, which" if refused else "CURRENT"
            log.error(
                "%s was refused (%s); serving %s instead, the newest bundle that verifies, until a bundle "
                "CURRENT names loads",
                what,
                reason,
                version,
            )
            return version
        return None

    def _open(self, name: str, current: Snapshot | None) -> Snapshot:
        # Layers (and weights) the current snapshot holds are reused by checksum: only what is new is read.
        reuse = current.bundle if current is not None else None
        bundle = open_bundle_dir(
            self.bundles_dir / name,
            checksums=self.settings.verify_checksums,
            reuse=reuse,
            mmap=self.settings.mmap_indexes,
        )
        try:
            fingerprint = bundle.manifest.model.fingerprint
            if current is not None and current.encoder.info.fingerprint == fingerprint:
                encoder = current.encoder  # same weights: no second model load
            else:
                # With checksums on, opening the bundle has just hashed the weights and matched them to
                # this fingerprint: the encoder need not read them a second time to hash them again.
                verified = fingerprint if self.settings.verify_checksums else None
                encoder = Encoder.from_dir(
                    bundle.model_dir, self.settings.device, verified, self.settings.precision
                )
            return Snapshot(bundle=bundle, encoder=encoder, collection_root=collection_root(bundle))
        except BaseException:
            bundle.close()
            raise

    def _swap(self, snap: Snapshot, fallback: Fallback | None = None) -> None:
        with self._lock:
            old, self._current = self._current, snap
            self.last_error = None
            self.fallback = fallback
            close_old = old is not None and old._refs == 0
            if old is not None:
                old._retired = True
        if close_old and old is not None:
            old.bundle.close()
        self._refresh_lease(snap.version)
        log.info("serving bundle %s", snap.version)
        if self._on_swap is not None:
            self._on_swap(snap)

    def _refresh_lease(self, version: str) -> None:
        # Best effort: a read-only bundles dir just means gc cannot see us.
        write_lease(self.bundles_dir, version)

    def close(self) -> None:
        with self._lock:
            snap, self._current = self._current, None
            if snap is not None:
                snap._retired = True
                close = snap._refs == 0
            else:
                close = False
        if close and snap is not None:
            snap.bundle.close()
