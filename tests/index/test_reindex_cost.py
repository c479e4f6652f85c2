"""What an incremental re-run reads: the model weights once, no file twice, and nothing unverified.

Behaviour, not timing: every `file_sha256` call of the run is recorded (wherever the function was
imported), so reading the ~600 MB weights of a real model three times per run cannot creep back.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from indexer.core.bundle.inventory import verify
from indexer.core.bundle.layout import MODEL_DIR
from indexer.core.bundle.read import read_current
from indexer.core.modeldir import WEIGHTS_NAME, model_fingerprint
from indexer.index.cache import FileState, FileStates
from tests.index.helpers import make_image, run_index


def _weights(bundles: Path, version: str | None = None) -> Path:
    return bundles / (version or read_current(bundles)) / MODEL_DIR / WEIGHTS_NAME


def test_incremental_run_reads_the_weights_once_and_no_file_twice(tiny_model_dir, folder, tmp_path, hashed):
    bundles = tmp_path / "bundles"
    run_index(tiny_model_dir, folder, bundles)
    first = [p for p in hashed if p.name == WEIGHTS_NAME]
    assert len(first) <= 2, f"a first run hashes the weights to fingerprint and to copy them: {first}"
    prev = read_current(bundles)
    hashed.clear()

    make_image(folder / "img01.png", seed=101)  # one changed image: the model has to be loaded
    res = run_index(tiny_model_dir, folder, bundles)

    assert res.embedded == 1 and res.bundle != prev
    weights = [p for p in hashed if p.name == WEIGHTS_NAME]
    assert len(weights) <= 1, f"the weights were read {len(weights)} times: {weights}"
    assert len(hashed) == len(set(hashed)), f"a file was hashed twice: {hashed}"
    assert os.stat(_weights(bundles)).st_ino == os.stat(_weights(bundles, prev)).st_ino, "linked, not copied"
    assert verify(bundles) == {prev: None, res.bundle: None}, "`clipsearch bundles verify` passes both"


def test_unchanged_rerun_reads_the_weights_at_most_once(tiny_model_dir, folder, tmp_path, hashed):
    bundles = tmp_path / "bundles"
    run_index(tiny_model_dir, folder, bundles)
    hashed.clear()
    res = run_index(tiny_model_dir, folder, bundles)
    assert res.embedded == 0
    assert len([p for p in hashed if p.name == WEIGHTS_NAME]) <= 1
    assert verify(bundles, [res.bundle]) == {res.bundle: None}


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

    with caplog.at_level(logging.WARNING, logger="indexer.index.publish"):
        res = run_index(tiny_model_dir, folder, bundles)

    new = _weights(bundles, res.bundle)
    assert os.stat(new).st_ino != os.stat(bad).st_ino, "the damaged file must not be shared"
    assert model_fingerprint(new.parent) == model_fingerprint(tiny_model_dir)
    assert "does not match the model's fingerprint" in caplog.text
    result = verify(bundles)
    assert result[res.bundle] is None
    assert "does not match its sha256" in (result[prev] or ""), "the damaged bundle still fails"


def test_incremental_run_reads_the_file_table_once_and_writes_back_only_changes(
    tiny_model_dir, folder, tmp_path, monkeypatch
):
    bundles = tmp_path / "bundles"
    run_index(tiny_model_dir, folder, bundles)
    stored: list[str] = []
    loads: list[int] = []
    put, load = FileStates.put, FileStates.load

    def counting_put(self: FileStates, rows: object) -> None:
        rows = list(rows)  # type: ignore[call-overload]
        stored.extend(key for key, _ in rows)
        put(self, rows)

    def counting_load(self: FileStates) -> dict[str, FileState]:
        loads.append(1)
        return load(self)

    monkeypatch.setattr(FileStates, "put", counting_put)
    monkeypatch.setattr(FileStates, "load", counting_load)
    make_image(folder / "img01.png", seed=101)
    assert run_index(tiny_model_dir, folder, bundles).updated == 1
    assert stored == [str((folder / "img01.png").resolve())]
    assert len(loads) == 1
