"""Readers for image–caption sources: CSV/TSV, JSONL, folders with .txt captions, WebDataset tar shards.

Every reader yields `Record`s: one per image, with all of that image's captions. Training and indexing
use the same readers, so a source that trains also indexes.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from braceexpand import braceexpand

from indexer.core.errors import ClipsearchError
from indexer.core.images import IMAGE_EXTENSIONS

DEFAULT_IMAGE_COLUMN = "filepath"
DEFAULT_CAPTION_COLUMN = "caption"
DEFAULT_LABEL_COLUMN = "label"  # read when present: class labels, for zero-shot classification
CAPTION_FALLBACKS = ("caption", "title", "text")
IMAGE_FALLBACKS = ("filepath", "image", "path", "file", "url")


class DataError(ClipsearchError, ValueError):
    """A source that cannot be read as asked; the message says what was found instead."""


@dataclass(frozen=True)
class Record:
    """One image and its captions.

    `key` is the image's stable identity: the resolved file path, or `SHARD.tar::MEMBER` for an
    image inside a WebDataset shard.
    """

    key: str
    captions: tuple[str, ...] = ()
    labels: tuple[str, ...] = field(default=(), compare=False)  # class labels (a label column), if any
    path: Path | None = None
    shard: Path | None = None
    member: str | None = None
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    def image_source(self) -> Path | bytes:
        """What the image decoder reads: the file's path, or a shard member's bytes.

        Shards stay open per process across members (a worker decodes many members of one shard).
        Raises OSError when the image cannot be read.
        """
        if self.path is not None:
            return self.path
        if self.shard is None or self.member is None:
            raise OSError(f"record {self.key} has no path")
        st = os.stat(self.shard)
        key = (st.st_ino, st.st_mtime_ns, st.st_size)  # a rewritten shard is opened afresh
        held = _OPEN_SHARDS.get(self.shard)
        if held is None or held[0] != key:
            if held is not None:
                held[1].close()
            try:
                held = _OPEN_SHARDS[self.shard] = (key, tarfile.open(self.shard))  # noqa: SIM115 - kept open
            except tarfile.TarError as e:
                raise OSError(f"{self.shard}: not a readable tar shard ({e})") from e
        tar = held[1]
        try:
            f = tar.extractfile(self.member)
        except KeyError:
            f = None
        if f is None:
            raise OSError(f"{self.member} is not a file in {self.shard}")
        return f.read()


# Open shards of this process. A forked child (a decoding worker) must not share the parent's file
# offsets, so it starts with none of them.
_OPEN_SHARDS: dict[Path, tuple[tuple[int, int, int], tarfile.TarFile]] = {}
os.register_at_fork(after_in_child=_OPEN_SHARDS.clear)


@dataclass(frozen=True)
class SourceSpec:
    """Where the records come from and which columns to read."""

    source: str
    image_column: str = DEFAULT_IMAGE_COLUMN
    caption_column: str = DEFAULT_CAPTION_COLUMN
    label_column: str = DEFAULT_LABEL_COLUMN  # optional: rows without the column have no labels


def read_records(spec: SourceSpec) -> list[Record]:
    """All records of a source, grouped per image in source order.

    Raises:
        DataError: the source does not exist, has the wrong columns, or is of an unknown kind.
    """
    src = spec.source
    if "{" in src or src.endswith(".tar"):
        return list(iter_shards(_expand_shards(src)))
    path = Path(src)
    if not path.exists():
        raise DataError(f"{src} does not exist")
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if shards and not any(_is_image(p) for p in path.rglob("*")):
            return list(iter_shards(shards))
        return list(iter_folder(path))
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return read_table(path, spec.image_column, spec.caption_column, spec.label_column)
    if suffix in (".jsonl", ".json", ".ndjson"):
        return read_jsonl(path, spec.image_column, spec.caption_column, spec.label_column)
    raise DataError(f"{src}: unknown source kind; use a folder, .csv/.tsv, .jsonl or .tar shards")


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()


def _expand_shards(pattern: str) -> list[Path]:
    paths = [Path(p) for p in braceexpand(pattern)]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataError(f"shard(s) not found: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    return paths


def _pick_column(found: Sequence[str], wanted: str, fallbacks: Sequence[str], what: str, src: Path) -> str:
    if wanted in found:
        return wanted
    defaults = (DEFAULT_IMAGE_COLUMN, DEFAULT_CAPTION_COLUMN)
    if wanted in defaults:
        for alt in fallbacks:
            if alt in found:
                return alt
    raise DataError(
        f"{src}: no {what} column {wanted!r}; columns found: {', '.join(found) or '(none)'}"
        f" (choose one with --{what}-column)"
    )


Row = tuple[Path, str, Sequence[str]]  # image path, caption ("" for none), labels


def _group(rows: Iterable[Row]) -> list[Record]:
    captions: dict[Path, list[str]] = {}
    labels: dict[Path, list[str]] = {}
    for path, caption, row_labels in rows:
        caps, labs = captions.setdefault(path, []), labels.setdefault(path, [])
        if caption and caption not in caps:
            caps.append(caption)
        labs.extend(lab for lab in row_labels if lab and lab not in labs)
    return [
        Record(key=str(p), captions=tuple(c), labels=tuple(labels[p]), path=p) for p, c in captions.items()
    ]


def _resolve(base: Path, value: str) -> Path:
    p = Path(value).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def read_table(
    path: Path, image_column: str, caption_column: str, label_column: str = DEFAULT_LABEL_COLUMN
) -> list[Record]:
    """CSV or TSV with a header (open_clip's format). Relative paths are relative to the file's folder.

    A `label_column` that the header has gives each image its class labels; without it, none."""
    text = path.read_text(encoding="utf-8-sig")
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    found = list(reader.fieldnames or [])
    img_col = _pick_column(found, image_column, IMAGE_FALLBACKS, "image", path)
    cap_col = _pick_column(found, caption_column, CAPTION_FALLBACKS, "caption", path)
    base = path.parent.resolve()
    lab_col = label_column if label_column in found else None
    return _group(
        (
            _resolve(base, row[img_col]),
            (row.get(cap_col) or "").strip(),
            [(row.get(lab_col) or "").strip()] if lab_col else [],
        )
        for row in reader
        if (row.get(img_col) or "").strip()
    )


def read_jsonl(
    path: Path, image_column: str, caption_column: str, label_column: str = DEFAULT_LABEL_COLUMN
) -> list[Record]:
    """One JSON object per line; the caption field may be a string or a list of strings, and so may the
    optional `label_column` field (numbers are read as their text)."""
    base = path.parent.resolve()
    rows: list[Row] = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from e
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{n}: each line must be a JSON object")
        found = list(obj)
        img_col = _pick_column(found, image_column, IMAGE_FALLBACKS, "image", path)
        cap_col = next(
            (c for c in (caption_column, "captions", *CAPTION_FALLBACKS) if c in obj), caption_column
        )
        caps = obj.get(cap_col) or []
        labs = obj.get(label_column)
        labs = [] if labs is None else labs if isinstance(labs, list) else [labs]
        labels = [str(x).strip() for x in labs]
        image = _resolve(base, str(obj[img_col]))
        for cap in [caps] if isinstance(caps, str) else caps:
            rows.append((image, str(cap).strip(), labels))
        if not caps:
            rows.append((image, "", labels))
    return _group(rows)


def _read_caption_file(path: Path) -> tuple[str, ...]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return tuple(dict.fromkeys(line.strip() for line in lines if line.strip()))


def _walk_files(root: Path) -> dict[tuple[str, ...], str]:
    """Relative parts -> path of every file below `root`, skipping hidden names and what is below them.

    One `scandir` per folder, whose listing tells files from folders without a `stat` per file (the
    cost of `rglob` + `is_file` on a large collection). Like `rglob`, symlinked folders are not
    entered and unreadable folders are skipped; a symlink to a file is a file.
    """
    files: dict[tuple[str, ...], str] = {}
    todo: list[tuple[tuple[str, ...], str]] = [((), str(root))]
    while todo:
        rel, folder = todo.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    if entry.is_dir(follow_symlinks=False):
                        todo.append(((*rel, entry.name), entry.path))
                    elif _is_file(entry):
                        files[(*rel, entry.name)] = entry.path
        except (PermissionError, FileNotFoundError):  # unreadable, or removed while we walk
            continue
    return files


def _is_file(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file()
    except OSError:  # a symlink loop, say: `Path.is_file` says False there too
        return False


def iter_folder(root: Path) -> Iterator[Record]:
    """Every image below `root` (recursive, extension allow-list, hidden files skipped), sorted by path.

    The caption of `a/b.jpg` is `a/b.txt` (one caption per line) when it exists.
    """
    files = _walk_files(root.resolve())
    for rel in sorted(files):  # the order of `sorted(Path...)`: part by part
        stem, ext = os.path.splitext(rel[-1])
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        caption = files.get((*rel[:-1], stem + ".txt"))
        captions = _read_caption_file(Path(caption)) if caption is not None else ()
        yield Record(key=files[rel], captions=captions, path=Path(files[rel]))


@dataclass(frozen=True)
class FolderChanges:
    """What a set of changed paths below a folder means for its records (a watcher's batch).

    `keys`: the record keys to look at again; `records`: those of them that are images now (captions
    read as `iter_folder` reads them); `prefixes`: folders that changed as a whole (moved, deleted), whose
    previously known records must be looked at again too.
    """

    keys: set[str]
    records: list[Record]
    prefixes: set[str]


def folder_changes(root: Path, paths: Iterable[str | Path]) -> FolderChanges:
    """The records `iter_folder(root)` would now give for the images that `paths` (changed files or
    folders below `root`) touch: the file itself, the image of a caption `.txt`, everything below a
    folder. Keys are spelled as `iter_folder` spells them; hidden names are ignored like there."""
    base = str(root.resolve())
    keys: set[str] = set()
    prefixes: set[str] = set()
    for raw in paths:
        path = os.path.abspath(str(raw))
        rel = os.path.relpath(path, base)
        parts = rel.split(os.sep)
        if rel == "." or parts[0] == ".." or any(p.startswith(".") for p in parts):
            continue
        key = os.path.join(base, *parts)
        if os.path.isdir(key) and not os.path.islink(key):
            keys.update(os.path.join(key, *r) for r in _walk_files(Path(key)))
            prefixes.add(key)
            continue
        stem, ext = os.path.splitext(key)
        if ext.lower() == ".txt":
            keys.update(_same_stem_images(stem))
        elif not os.path.exists(key):
            prefixes.add(key)  # it may have been a folder
        keys.add(key)
    keys = {k for k in keys if os.path.splitext(k)[1].lower() in IMAGE_EXTENSIONS}
    records = [_folder_record(k) for k in sorted(keys) if os.path.isfile(k)]
    return FolderChanges(keys, records, prefixes)


def _same_stem_images(stem: str) -> list[str]:
    folder, name = os.path.split(stem)
    try:
        with os.scandir(folder) as entries:
            return [e.path for e in entries if os.path.splitext(e.name)[0] == name]
    except OSError:
        return []


def _folder_record(key: str) -> Record:
    caption = os.path.splitext(key)[0] + ".txt"
    captions = _read_caption_file(Path(caption)) if os.path.isfile(caption) else ()
    return Record(key=key, captions=captions, path=Path(key))


def iter_shards(shards: Sequence[Path]) -> Iterator[Record]:
    """WebDataset tar shards as img2dataset writes them: `KEY.jpg` + `KEY.txt` (and/or `KEY.json`)."""
    for shard in shards:
        shard = shard.resolve()
        try:
            tar = tarfile.open(shard)  # noqa: SIM115 - closed by the with below
        except (tarfile.TarError, OSError) as e:
            raise DataError(f"{shard}: not a readable tar shard ({e})") from e
        with tar:
            images: dict[str, str] = {}
            texts: dict[str, tuple[str, ...]] = {}
            for m in tar.getmembers():
                if not m.isfile():
                    continue
                stem, _, ext = m.name.rpartition(".")
                ext = "." + ext.lower()
                if ext in IMAGE_EXTENSIONS:
                    images.setdefault(stem, m.name)
                elif ext in (".txt", ".json"):
                    f = tar.extractfile(m)
                    raw = f.read().decode("utf-8", errors="replace") if f else ""
                    caps = _shard_captions(raw, ext)
                    if caps and stem not in texts:
                        texts[stem] = caps
            for stem, member in images.items():
                yield Record(
                    key=f"{shard}::{member}", captions=texts.get(stem, ()), shard=shard, member=member
                )


def _shard_captions(raw: str, ext: str) -> tuple[str, ...]:
    if ext == ".txt":
        return tuple(line.strip() for line in raw.splitlines() if line.strip())
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError:
        return ()
    cap = obj.get("caption") if isinstance(obj, dict) else None
    return (cap.strip(),) if isinstance(cap, str) and cap.strip() else ()
