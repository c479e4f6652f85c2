"""sha256 of files, read once: the model fingerprint, bundle checksums and data-set checksums all use it."""

from __future__ import annotations

import hashlib
import os
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

from indexer.core.errors import ClipsearchError


class FileChanged(ClipsearchError, RuntimeError):
    """A file was rewritten while it was being hashed."""


def file_sha256(path: Path, chunk: int = 1 << 20, copy_to: Path | None = None) -> str:
    """sha256 of a file's bytes; with `copy_to`, also writes those bytes there (one read for both)."""
    h = hashlib.sha256()
    with open(path, "rb") as f, ExitStack() as stack:
        out = stack.enter_context(open(copy_to, "wb")) if copy_to is not None else None
        while block := f.read(chunk):
            h.update(block)
            if out is not None:
                out.write(block)
    return h.hexdigest()


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
        raise FileChanged(f"{path} changed while it was being hashed")
    return HashedFile(sha, before)
