"""Leases: a server records the bundle it serves, so `bundles gc` never deletes a bundle in use."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from indexer.core.bundle.layout import LEASES_DIR

LEASE_TTL_S = 600.0  # a lease not refreshed for this long belongs to a server that is gone


def write_lease(bundles_dir: Path, version: str) -> bool:
    """Record (best effort) that this process serves `version`. False if the dir is read-only."""
    lease = Path(bundles_dir) / LEASES_DIR / version / f"{socket.gethostname()}-{os.getpid()}"
    try:
        lease.parent.mkdir(parents=True, exist_ok=True)
        lease.touch()
        return True
    except OSError:
        return False


def leased_versions(bundles_dir: Path, ttl_s: float = LEASE_TTL_S) -> set[str]:
    """Versions with a lease refreshed within `ttl_s` seconds."""
    root = Path(bundles_dir) / LEASES_DIR
    now = time.time()
    live: set[str] = set()
    if root.is_dir():
        for d in root.iterdir():
            if any(now - f.stat().st_mtime < ttl_s for f in d.iterdir() if f.is_file()):
                live.add(d.name)
    return live
