"""The writer: a new bundle is written into a temp dir, fsynced, verified as the service would open it,
renamed into place, and only then named by CURRENT (docs/architecture.md, "Publishing").

A crash at any point leaves the previous bundle current and loadable; leftovers are removed by the next
run (`clean_temp`).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import faiss

from indexer.core.bundle.items import Item, Skipped, write_items
from indexer.core.bundle.layout import CURRENT, ITEMS_DB, MANIFEST, MODEL_DIR, SKIPPED, TMP_PREFIX, WORK_DIR
from indexer.core.bundle.manifest import BundleManifest, FileEntry, IndexSpec, ModelRef
from indexer.core.bundle.read import open_bundle_dir
from indexer.core.hashing import FileChanged, HashedFile, hash_file
from indexer.core.modeldir import WEIGHTS_NAME, model_files
from indexer.index.stages import reached

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BundleContents:
    """Everything a new bundle holds, built by the indexer."""

    model_dir: Path
    model: ModelRef
    image_index: faiss.Index
    text_index: faiss.Index
    images: IndexSpec
    texts: IndexSpec
    items: Sequence[Item]
    skipped: Sequence[Skipped] = ()
    stats: dict[str, Any] | None = None
    # A published bundle's model dir holding the same weights: its files are hard-linked, not copied
    # (bundles are immutable, so sharing an inode is safe and saves a copy of the weights per run).
    # Its weights are hashed before they are linked; if they do not match `model.fingerprint` they are
    # copied from `model_dir` instead.
    link_model_from: Path | None = None


def new_version() -> str:
    """A sortable, unique bundle name: UTC time to the microsecond plus a random suffix."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(3)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def clean_temp(bundles_dir: Path) -> list[str]:
    """Remove leftovers of interrupted publishes (`.tmp-*` dirs and `CURRENT.tmp`)."""
    removed = []
    for p in Path(bundles_dir).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p.name)
    (Path(bundles_dir) / f"{CURRENT}.tmp").unlink(missing_ok=True)
    return removed


def publish(bundles_dir: Path, contents: BundleContents) -> Path:
    """Write a bundle into a temp dir, fsync, verify it as the service would, rename it, flip `CURRENT`.

    The stages `publish-written` (verified temp dir) and `publish-renamed` (renamed, CURRENT not yet
    flipped) are where the crash tests stop the process (`indexer.index.stages`).
    """

    def verify(tmp: Path, known: dict[str, HashedFile]) -> None:
        open_bundle_dir(tmp, known=known).close()

    final, _ = commit(bundles_dir, lambda tmp, version: _write_contents(tmp, version, contents), verify)
    return final


W = TypeVar("W")
V = TypeVar("V")


def commit(
    bundles_dir: Path, write: Callable[[Path, str], W], verify: Callable[[Path, W], V]
) -> tuple[Path, V]:
    """The publishing protocol every version goes through: `write(tmp, version)` fills a temp dir,
    `verify(tmp, written)` opens it as the service would, then it is renamed into place and `CURRENT` is
    flipped. A failure (or a crash) anywhere leaves `CURRENT` as it was; a temp dir is removed here or by
    the next run's `clean_temp`."""
    bundles_dir = Path(bundles_dir)
    bundles_dir.mkdir(parents=True, exist_ok=True)
    work = bundles_dir / WORK_DIR
    version = new_version()
    tmp = bundles_dir / f"{TMP_PREFIX}{version}"
    tmp.mkdir()
    try:
        checked = verify(tmp, write(tmp, version))
        reached("publish-written", work)
        final = bundles_dir / version
        os.rename(tmp, final)
        fsync_dir(bundles_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    reached("publish-renamed", work)
    set_current(bundles_dir, version)
    return final, checked


def set_current(bundles_dir: Path, version: str) -> None:
    """Atomically point `CURRENT` at `version`."""
    tmp = Path(bundles_dir) / f"{CURRENT}.tmp"
    tmp.write_text(version + "\n")
    fsync_file(tmp)
    reached("current-tmp", Path(bundles_dir) / WORK_DIR)
    os.replace(tmp, Path(bundles_dir) / CURRENT)
    fsync_dir(Path(bundles_dir))


def _copy_or_link(src: Path, dst: Path, link_dir: Path | None) -> None:
    """A small file: hard-linked from `link_dir` when its bytes there are the same, else copied."""
    linked = link_dir / src.name if link_dir is not None else None
    if linked is not None and linked.is_file() and linked.read_bytes() == src.read_bytes():
        try:
            os.link(linked, dst)
            return
        except OSError:
            pass  # another filesystem, or links unsupported: copy instead
    shutil.copyfile(src, dst)


def _place_weights(c: BundleContents, dst: Path) -> HashedFile:
    """Put the weights at `dst` and return their sha256, reading them once in all.

    The previous bundle's weights are hashed (verified) here before they are shared with the new
    bundle, so a damaged or tampered file there is never linked unread: it is copied from the model dir
    instead. The copy is hashed as it is written; `verify_files` then checks it against the fingerprint.
    """
    if c.link_model_from is not None:
        prev = c.link_model_from / WEIGHTS_NAME
        try:
            hashed = hash_file(prev)
            if hashed.sha256 == c.model.fingerprint:
                os.link(prev, dst)
                if hashed.still_holds(dst):
                    return hashed
            else:
                log.warning("%s does not match the model's fingerprint; copying the weights instead", prev)
        except (OSError, FileChanged) as e:  # gone, another filesystem, or changed while hashed
            log.info("not linking %s (%s); copying the weights instead", prev, e)
        dst.unlink(missing_ok=True)
    return hash_file(c.model_dir / WEIGHTS_NAME, copy_to=dst)


def _write_contents(tmp: Path, version: str, c: BundleContents) -> dict[str, HashedFile]:
    """Write the bundle's files and manifest into `tmp`; returns the sha256s computed on the way."""
    model_out = tmp / MODEL_DIR
    model_out.mkdir()
    names = model_files(c.model_dir)
    for name in names:
        if name != WEIGHTS_NAME:
            _copy_or_link(c.model_dir / name, model_out / name, c.link_model_from)
    known = {f"{MODEL_DIR}/{WEIGHTS_NAME}": _place_weights(c, model_out / WEIGHTS_NAME)}
    reached("publish-model", tmp.parent / WORK_DIR)
    faiss.write_index(c.image_index, str(tmp / c.images.file))
    faiss.write_index(c.text_index, str(tmp / c.texts.file))
    reached("publish-indexes", tmp.parent / WORK_DIR)
    write_items(tmp / ITEMS_DB, c.items)
    write_skipped(tmp / SKIPPED, c.skipped)
    rels = [*(f"{MODEL_DIR}/{name}" for name in names), c.images.file, c.texts.file, ITEMS_DB, SKIPPED]
    files = {}
    for rel in rels:
        fsync_file(tmp / rel)
        if rel not in known:
            known[rel] = hash_file(tmp / rel)
        files[rel] = FileEntry(sha256=known[rel].sha256, size=known[rel].stamp.size)
    manifest = BundleManifest(
        version=version,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        model=c.model,
        images=c.images,
        texts=c.texts,
        files=files,
        stats=c.stats or {},
    )
    write_manifest(tmp, manifest)
    fsync_dir(model_out)
    return known


def write_manifest(tmp: Path, manifest: BundleManifest) -> None:
    """The manifest goes last: it is what makes the files a bundle."""
    (tmp / MANIFEST).write_text(manifest.to_json())
    fsync_file(tmp / MANIFEST)
    fsync_dir(tmp)


def write_skipped(path: Path, skipped: Sequence[Skipped]) -> None:
    with open(path, "w") as f:
        for row in skipped:
            f.write(json.dumps(asdict(row)) + "\n")
