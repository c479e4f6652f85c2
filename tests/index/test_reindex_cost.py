"""What an incremental re-run reads: the model weights once, no file twice, and nothing unverified."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from indexer.bundle import MODEL_DIR, read_current
from indexer.bundle_ops import verify
from indexer.model import WEIGHTS_NAME, model_fingerprint
from tests.index.helpers import run_index


def _weights(bundles: Path, version: str | None = None) -> Path:
    return bundles / (version or read_current(bundles)) / MODEL_DIR / WEIGHTS_NAME


def test_tampered_weights_in_the_previous_bundle_are_not_linked(tiny_model_dir, folder, tmp_path, caplog):
    """Bit rot or tampering that `stat` cannot see: same size, same mtime, different bytes."""
    bundles = tmp_path / "bundles"
    prev = run_index(tiny_model_dir, folder, bundles).bundle
    bad = _weights(bundles, prev)
    st = bad.stat()
    with open(bad, "r+b") as f:
        f.seek(st.st_size // 2)
        byte = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(bad, ns=(st.st_atime_ns, st.st_mtime_ns))

    with caplog.at_level(logging.WARNING, logger="indexer.bundle"):
        res = run_index(tiny_model_dir, folder, bundles)

    new = _weights(bundles, res.bundle)
    assert os.stat(new).st_ino != os.stat(bad).st_ino, "the damaged file must not be shared"
    assert model_fingerprint(new.parent) == model_fingerprint(tiny_model_dir)
    assert "does not match the model's fingerprint" in caplog.text
    result = verify(bundles)
    assert result[res.bundle] is None
    assert "does not match its sha256" in (result[prev] or ""), "the damaged bundle still fails"
