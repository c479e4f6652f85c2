"""The bundle format: an immutable, versioned directory of FAISS indexes, item metadata and the model.

Read side (`open_bundle`, `verify_bundle`, `ItemStore`) is what the service uses; write side
(`BundleWriter`, `publish`) is what the indexer uses. Layout and rules are in DESIGN.md.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import faiss
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from indexer.errors import ClipsearchError
from indexer.model import WEIGHTS_NAME, ModelInfo, file_sha256, model_files

SCHEMA_VERSION = 1
CURRENT = "CURRENT"
MANIFEST = "manifest.json"
IMAGES_INDEX = "images.faiss"
TEXTS_INDEX = "texts.faiss"
ITEMS_DB = "items.sqlite"
SKIPPED = "skipped.jsonl"
MODEL_DIR = "model"
WORK_DIR = ".work"
LEASES_DIR = ".leases"
TMP_PREFIX = ".tmp-"
LEASE_TTL_S = 600.0

ItemKind = Literal["image", "text"]

log = logging.getLogger(__name__)


class BundleError(ClipsearchError, RuntimeError):
    """A bundle that is missing, incomplete or inconsistent; the message says what disagrees."""


class ModelRef(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: str
    fingerprint: str = Field(description="sha256 of open_clip_model.safetensors")
    embed_dim: int
    image_size: int
    context_length: int
    preprocess: dict[str, Any] = Field(default_factory=dict)

    @classmethod
    def from_info(cls, info: ModelInfo, **overrides: Any) -> ModelRef:
        """The manifest entry of a loaded model (`Encoder.info`); `overrides` replace fields."""
        fields: dict[str, Any] = {
            "name": info.name,
            "fingerprint": info.fingerprint,
            "embed_dim": info.embed_dim,
            "image_size": info.image_size,
            "context_length": info.context_length,
            "preprocess": info.preprocess,
        }
        return cls(**(fields | overrides))


class IndexSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    count: int
    factory: str = "Flat"
    metric: Literal["inner_product"] = "inner_product"
    recall_at_10: float | None = Field(None, description="measured vs exact search; None for exact")
    params: dict[str, Any] = Field(default_factory=dict, description="search-time params, e.g. nprobe")


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sha256: str
    size: int


class BundleManifest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    schema_version: Literal[1] = 1
    version: str
    created_at: str
    model: ModelRef
    images: IndexSpec
    texts: IndexSpec
    files: dict[str, FileEntry]
    stats: dict[str, Any] = Field(default_factory=dict)


@dataclass(frozen=True)
class Item:
    """One row of `items.sqlite`: an image or a text, addressed by the id FAISS returns."""

    id: int
    kind: ItemKind
    path: str | None = None
    text: str | None = None
    size: int | None = None
    mtime: float | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None


_ITEM_COLUMNS = ("id", "kind", "path", "text", "size", "mtime", "sha256", "width", "height")
_SCHEMA = """
CREATE TABLE items (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('image', 'text')),
    path TEXT, text TEXT, size INTEGER, mtime REAL, sha256 TEXT, width INTEGER, height INTEGER
);
CREATE INDEX items_kind ON items(kind);
"""


class ItemStore:
    """Read-only, thread-safe access to a bundle's `items.sqlite`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        uri = f"file:{path}?mode=ro&immutable=1"
        self._conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
        self._lock = threading.Lock()

    def close(self) -> None:
        self._conn.close()

    def count(self, kind: ItemKind) -> int:
        with self._lock:
            row = self._conn.execute("SELECT COUNT(*) FROM items WHERE kind = ?", (kind,)).fetchone()
        return int(row[0])

    def get(self, item_id: int) -> Item | None:
        return self.get_many([item_id]).get(item_id)

    def get_many(self, ids: Sequence[int]) -> dict[int, Item]:
        """Items by id; unknown ids are absent from the result."""
        wanted = [int(i) for i in ids if int(i) >= 0]
        if not wanted:
            return {}
        marks = ",".join("?" * len(wanted))
        sql = f"SELECT {', '.join(_ITEM_COLUMNS)} FROM items WHERE id IN ({marks})"
        with self._lock:
            rows = self._conn.execute(sql, wanted).fetchall()
        return {int(r[0]): Item(*r) for r in rows}


@dataclass
class Bundle:
    """An opened, verified bundle: what the service serves from."""

    root: Path
    manifest: BundleManifest
    image_index: faiss.Index
    text_index: faiss.Index
    items: ItemStore

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def model_dir(self) -> Path:
        return self.root / MODEL_DIR

    def close(self) -> None:
        self.items.close()


def read_current(bundles_dir: Path) -> str:
    """The active bundle's name from `CURRENT`."""
    current = Path(bundles_dir) / CURRENT
    try:
        name = current.read_text().strip()
    except FileNotFoundError as e:
        raise BundleError(f"no bundle published yet: {current} does not exist") from e
    if not name or "/" in name or name.startswith("."):
        raise BundleError(f"{current} does not name a bundle: {name!r}")
    return name


def load_manifest(root: Path) -> BundleManifest:
    path = root / MANIFEST
    try:
        return BundleManifest.model_validate_json(path.read_bytes())
    except FileNotFoundError as e:
        raise BundleError(f"{root.name}: {MANIFEST} is missing") from e
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BundleError(f"{root.name}: {MANIFEST} is invalid at {where}: {first['msg']}") from e


@dataclass(frozen=True)
class FileStamp:
    """A file as `stat` sees it: the same (size, mtime, inode) means the same file, not rewritten."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: Path) -> FileStamp:
        st = os.stat(path)
        return cls(st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True)
class HashedFile:
    """A sha256 computed by this process, with the stamp of the file whose bytes it is."""

    sha256: str
    stamp: FileStamp

    def still_holds(self, path: Path) -> bool:
        """`path` is the file that was hashed and has not changed since."""
        try:
            return FileStamp.of(path) == self.stamp
        except OSError:
            return False


def hash_file(path: Path, copy_to: Path | None = None) -> HashedFile:
    """Hash `path`, or copy it to `copy_to` hashing the bytes written (then the stamp is the copy's)."""
    if copy_to is not None:
        sha = file_sha256(path, copy_to=copy_to)
        return HashedFile(sha, FileStamp.of(copy_to))
    before = FileStamp.of(path)
    sha = file_sha256(path)
    if FileStamp.of(path) != before:
        raise BundleError(f"{path} changed while it was being hashed")
    return HashedFile(sha, before)


def verify_files(
    root: Path,
    manifest: BundleManifest,
    checksums: bool = True,
    known: Mapping[str, HashedFile] | None = None,
) -> None:
    """Every file the manifest lists exists with its size (and sha256); the model fingerprint agrees.

    `known` (the indexer's verify-on-publish only): sha256s this process computed for files it has just
    written or linked, by manifest path; such a file is not read again while `still_holds` is true.
    """
    known = known or {}
    for rel, entry in manifest.files.items():
        path = root / rel
        if not path.is_file():
            raise BundleError(f"{root.name}: {rel} is missing")
        if path.stat().st_size != entry.size:
            raise BundleError(
                f"{root.name}: {rel} is {path.stat().st_size} bytes, manifest says {entry.size}"
            )
        if checksums and _sha256_now(path, known.get(rel)) != entry.sha256:
            raise BundleError(f"{root.name}: {rel} does not match its sha256 in the manifest")
    weights = f"{MODEL_DIR}/{WEIGHTS_NAME}"
    if weights not in manifest.files or manifest.files[weights].sha256 != manifest.model.fingerprint:
        raise BundleError(f"{root.name}: model weights do not match the manifest's model fingerprint")


def _sha256_now(path: Path, hashed: HashedFile | None) -> str:
    """`hashed`'s sha256 while it still describes `path`, else `path` read and hashed now."""
    return hashed.sha256 if hashed is not None and hashed.still_holds(path) else file_sha256(path)


def _check_index(root: Path, index: faiss.Index, spec: IndexSpec, dim: int, what: str) -> None:
    if index.d != dim:
        raise BundleError(f"{root.name}: {what} index has dimension {index.d}, the model embeds to {dim}")
    if index.ntotal != spec.count:
        raise BundleError(
            f"{root.name}: {what} index holds {index.ntotal} vectors, manifest says {spec.count}"
        )


def open_bundle_dir(
    root: Path, checksums: bool = True, known: Mapping[str, HashedFile] | None = None
) -> Bundle:
    """Open and verify one bundle directory (checksums, dimensions, counts, model fingerprint).

    `known` is for the indexer's own verify-on-publish only (see `verify_files`); readers leave it unset.
    """
    root = Path(root)
    if not root.is_dir():
        raise BundleError(f"bundle {root} does not exist")
    manifest = load_manifest(root)
    verify_files(root, manifest, checksums=checksums, known=known)
    try:
        image_index = faiss.read_index(str(root / manifest.images.file))
        text_index = faiss.read_index(str(root / manifest.texts.file))
    except RuntimeError as e:
        raise BundleError(f"{root.name}: cannot read a FAISS index: {e}") from e
    dim = manifest.model.embed_dim
    _check_index(root, image_index, manifest.images, dim, "image")
    _check_index(root, text_index, manifest.texts, dim, "text")
    _apply_search_params(image_index, manifest.images)
    _apply_search_params(text_index, manifest.texts)
    items = ItemStore(root / ITEMS_DB)
    try:
        for kind, spec in (("image", manifest.images), ("text", manifest.texts)):
            n = items.count(kind)  # type: ignore[arg-type]
            if n != spec.count:
                raise BundleError(
                    f"{root.name}: items.sqlite has {n} {kind} rows, the index has {spec.count}"
                )
    except sqlite3.DatabaseError as e:
        items.close()
        raise BundleError(f"{root.name}: items.sqlite is unreadable: {e}") from e
    except BundleError:
        items.close()
        raise
    return Bundle(root=root, manifest=manifest, image_index=image_index, text_index=text_index, items=items)


def _apply_search_params(index: faiss.Index, spec: IndexSpec) -> None:
    if spec.params:
        ps = faiss.ParameterSpace()
        ps.set_index_parameters(index, ",".join(f"{k}={v}" for k, v in spec.params.items()))  # type: ignore[arg-type]


def open_bundle(bundles_dir: Path, version: str | None = None, checksums: bool = True) -> Bundle:
    """Open the bundle `CURRENT` names (or `version`), verified."""
    bundles_dir = Path(bundles_dir)
    name = version or read_current(bundles_dir)
    return open_bundle_dir(bundles_dir / name, checksums=checksums)


def list_versions(bundles_dir: Path) -> list[str]:
    """Published bundle names, oldest first (names sort by creation time)."""
    bundles_dir = Path(bundles_dir)
    if not bundles_dir.is_dir():
        return []
    return sorted(p.name for p in bundles_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


# ---------------------------------------------------------------------------------------------- leases


def write_lease(bundles_dir: Path, version: str) -> bool:
    """Record (best effort) that this process serves `version`, so gc keeps it. False if read-only."""
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


# ------------------------------------------------------------------------------------------ write side


def new_version() -> str:
    """A sortable, unique bundle name: UTC time to the microsecond plus a random suffix."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%S%fZ") + "-" + secrets.token_hex(3)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_items(path: Path, items: Iterable[Item]) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.executescript(_SCHEMA)
        conn.executemany(
            f"INSERT INTO items ({', '.join(_ITEM_COLUMNS)}) VALUES ({', '.join('?' * len(_ITEM_COLUMNS))})",
            ((i.id, i.kind, i.path, i.text, i.size, i.mtime, i.sha256, i.width, i.height) for i in items),
        )
        conn.commit()
    finally:
        conn.close()


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
    skipped: Sequence[dict[str, Any]] = ()
    stats: dict[str, Any] | None = None
    # A published bundle's model dir holding the same weights: its files are hard-linked, not copied
    # (bundles are immutable, so sharing an inode is safe and saves a copy of the weights per run).
    # Its weights are hashed before they are linked; if they do not match `model.fingerprint` they are
    # copied from `model_dir` instead.
    link_model_from: Path | None = None


def clean_temp(bundles_dir: Path) -> list[str]:
    """Remove leftovers of interrupted publishes (`.tmp-*` dirs and `CURRENT.tmp`)."""
    removed = []
    for p in Path(bundles_dir).glob(f"{TMP_PREFIX}*"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        removed.append(p.name)
    (Path(bundles_dir) / f"{CURRENT}.tmp").unlink(missing_ok=True)
    return removed


def publish(bundles_dir: Path, contents: BundleContents, hook: Callable[[str], None] | None = None) -> Path:
    """Write a bundle into a temp dir, fsync, verify it as the service would, rename it, flip `CURRENT`.

    A crash at any point leaves the previous bundle current and loadable. `hook(stage)` is called at
    `publish-written` (verified temp dir) and `publish-renamed` (renamed, CURRENT not yet flipped),
    which the crash tests use to stop the process there.
    """
    hook = hook or (lambda stage: None)
    bundles_dir = Path(bundles_dir)
    bundles_dir.mkdir(parents=True, exist_ok=True)
    version = new_version()
    tmp = bundles_dir / f"{TMP_PREFIX}{version}"
    tmp.mkdir()
    try:
        known = _write_contents(tmp, version, contents)
        open_bundle_dir(tmp, known=known).close()
        hook("publish-written")
        final = bundles_dir / version
        os.rename(tmp, final)
        _fsync_dir(bundles_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    hook("publish-renamed")
    set_current(bundles_dir, version)
    return final


def set_current(bundles_dir: Path, version: str) -> None:
    """Atomically point `CURRENT` at `version`."""
    tmp = Path(bundles_dir) / f"{CURRENT}.tmp"
    tmp.write_text(version + "\n")
    _fsync_file(tmp)
    os.replace(tmp, Path(bundles_dir) / CURRENT)
    _fsync_dir(Path(bundles_dir))


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
        except (OSError, BundleError) as e:  # gone, another filesystem, or changed while hashed
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
    faiss.write_index(c.image_index, str(tmp / c.images.file))
    faiss.write_index(c.text_index, str(tmp / c.texts.file))
    write_items(tmp / ITEMS_DB, c.items)
    with open(tmp / SKIPPED, "w") as f:
        for row in c.skipped:
            f.write(json.dumps(row) + "\n")
    rels = [
        *(f"{MODEL_DIR}/{name}" for name in names),
        c.images.file,
        c.texts.file,
        ITEMS_DB,
        SKIPPED,
    ]
    files = {}
    for rel in rels:
        _fsync_file(tmp / rel)
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
    (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
    _fsync_file(tmp / MANIFEST)
    _fsync_dir(model_out)
    _fsync_dir(tmp)
    return known
