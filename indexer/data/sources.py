"""Readers for image–caption sources: CSV/TSV, JSONL, folders with .txt captions, WebDataset tar shards.

Every reader yields `Record`s: one per image, with all of that image's captions. Training and indexing
use the same readers, so a source that trains also indexes.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from braceexpand import braceexpand

from indexer.core.bundle.items import BUILTIN_FIELDS, FieldValue, UserFields
from indexer.core.errors import ClipsearchError
from indexer.core.images import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)
RESERVED_FIELDS = frozenset({*BUILTIN_FIELDS, "any", "id", "kind", "text", "sha256"})

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
    extra: UserFields = field(default_factory=dict, compare=False)  # user fields (extra columns, sidecar)

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
    exclude: tuple[str, ...] = ()  # globs (`--exclude`): a path or any of its names matching one is left out
    label_column: str = DEFAULT_LABEL_COLUMN  # optional: rows without the column have no labels


def excluded(parts: Sequence[str], patterns: Sequence[str]) -> bool:
    """True when the relative path `parts` (or any one name in it) matches one of `patterns`."""
    if not patterns:
        return False
    joined = "/".join(parts)
    return any(
        fnmatch.fnmatchcase(joined, p) or any(fnmatch.fnmatchcase(x, p) for x in parts) for p in patterns
    )


def _drop_excluded(records: list[Record], patterns: Sequence[str], base: Path) -> list[Record]:
    """Records of a table, JSONL or shard source without those `patterns` exclude (matched on the path
    relative to the source's folder when it lies below it, else on the whole path)."""
    if not patterns:
        return records
    keep = []
    for rec in records:
        where = rec.member if rec.member is not None else rec.key
        try:
            rel = Path(where).relative_to(base) if rec.member is None else Path(where)
        except ValueError:
            rel = Path(where)
        if not excluded([p for p in rel.parts if p != "/"], patterns):
            keep.append(rec)
    return keep


def read_records(spec: SourceSpec) -> list[Record]:
    """All records of a source, grouped per image in source order.

    Raises:
        DataError: the source does not exist, has the wrong columns, or is of an unknown kind.
    """
    src = spec.source
    if "{" in src or src.endswith(".tar"):
        return _drop_excluded(list(iter_shards(_expand_shards(src))), spec.exclude, Path("."))
    path = Path(src)
    if not path.exists():
        raise DataError(f"{src} does not exist")
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if shards and not any(_is_image(p) for p in path.rglob("*")):
            return _drop_excluded(list(iter_shards(shards)), spec.exclude, path)
        return list(iter_folder(path, spec.exclude))
    suffix = path.suffix.lower()
    base = path.parent.resolve()
    if suffix in (".csv", ".tsv"):
        return _drop_excluded(
            read_table(path, spec.image_column, spec.caption_column, spec.label_column), spec.exclude, base
        )
    if suffix in (".jsonl", ".json", ".ndjson"):
        return _drop_excluded(
            read_jsonl(path, spec.image_column, spec.caption_column, spec.label_column), spec.exclude, base
        )
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


Row = tuple[Path, str, UserFields, Sequence[str]]  # image path, caption ("" for none), user fields, labels


def _group(rows: Iterable[Row]) -> list[Record]:
    """One record per path: its captions and labels in order, its user fields (a later row adds, never
    replaces)."""
    captions: dict[Path, list[str]] = {}
    labels: dict[Path, list[str]] = {}
    extras: dict[Path, dict[str, Any]] = {}
    for path, caption, extra, row_labels in rows:
        caps, labs = captions.setdefault(path, []), labels.setdefault(path, [])
        if caption and caption not in caps:
            caps.append(caption)
        labs.extend(lab for lab in row_labels if lab and lab not in labs)
        mine = extras.setdefault(path, {})
        mine.update((k, v) for k, v in extra.items() if k not in mine)
    return [
        Record(key=str(p), captions=tuple(c), labels=tuple(labels[p]), path=p, extra=extras[p])
        for p, c in captions.items()
    ]


_INT = re.compile(r"^[+-]?\d{1,18}$")


def _as_number(text: str) -> int | float | None:
    if _INT.match(text):
        return int(text)
    try:
        value = float(text)
    except ValueError:
        return None
    return value if value == value and abs(value) != float("inf") else None


def _typed_columns(rows: Sequence[Mapping[str, str | None]], names: Sequence[str]) -> dict[str, type]:
    """Each column's type: int or float when every non-empty value reads as one, else str."""
    out: dict[str, type] = {}
    for name in names:
        values = [v.strip() for r in rows if (v := r.get(name)) and v.strip()]
        numbers = [_as_number(v) for v in values]
        if values and all(isinstance(n, int) for n in numbers):
            out[name] = int
        elif values and all(n is not None for n in numbers):
            out[name] = float
        else:
            out[name] = str
    return out


def user_fields(obj: Mapping[str, Any], where: str, skip: Collection[str] = ()) -> dict[str, Any]:
    """A JSON object's values as typed user fields: scalars (booleans as 0/1), lists of scalars as
    tuples, nested objects flattened to `a.b`; null and empty values left out, and so are `skip` and
    the built-in names (logged: a user field may not shadow `path`, `size`, ...)."""
    out: dict[str, Any] = {}
    for key, value in obj.items():
        name = str(key)
        if name in skip or value is None:
            continue
        if name in RESERVED_FIELDS:
            log.warning("%s: field %r has a built-in name; it is not kept as a user field", where, name)
            continue
        if isinstance(value, Mapping):
            nested = user_fields({f"{name}.{k}": v for k, v in value.items()}, where)
            out.update(nested)
        elif isinstance(value, list):
            items = tuple(_scalar(v) for v in value if _scalar(v) is not None)
            if items:
                out[name] = items if len(items) > 1 else items[0]
        elif (scalar := _scalar(value)) is not None:
            out[name] = scalar
    return out


def _scalar(value: Any) -> FieldValue | None:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int | float):
        return value if value == value and abs(value) != float("inf") else None
    if isinstance(value, str):
        return value if value.strip() else None
    return None


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
    rows = [row for row in reader if (row.get(img_col) or "").strip()]
    others = [c for c in found if c not in (img_col, cap_col, lab_col)]
    types = _typed_columns(rows, others)
    return _group(
        (
            _resolve(base, row[img_col]),
            (row.get(cap_col) or "").strip(),
            _row_fields(row, types, path),
            [(row.get(lab_col) or "").strip()] if lab_col else [],
        )
        for row in rows
    )


def _row_fields(row: Mapping[str, str | None], types: Mapping[str, type], where: Path) -> dict[str, Any]:
    typed: dict[str, Any] = {}
    for name, kind in types.items():
        text = (row.get(name) or "").strip()
        if text:
            typed[name] = text if kind is str else kind(_as_number(text))
    return user_fields(typed, str(where))


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
        extra = user_fields(obj, f"{path}:{n}", skip=(img_col, cap_col, label_column))
        labs = obj.get(label_column)
        labs = [] if labs is None else labs if isinstance(labs, list) else [labs]
        labels = [str(x).strip() for x in labs]
        image = _resolve(base, str(obj[img_col]))
        for cap in [caps] if isinstance(caps, str) else caps:
            rows.append((image, str(cap).strip(), extra, labels))
        if not caps:
            rows.append((image, "", extra, labels))
    return _group(rows)


def _read_caption_file(path: Path) -> tuple[str, ...]:
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return tuple(dict.fromkeys(line.strip() for line in lines if line.strip()))


def _walk_files(
    root: Path, exclude: Sequence[str] = (), under: tuple[str, ...] = ()
) -> dict[tuple[str, ...], str]:
    """Relative parts -> path of every file below `root`, skipping hidden names and what is below them,
    and what `exclude` matches (a matching folder is not entered). `under`: `root`'s own parts below the
    source folder, so that `exclude` sees whole relative paths.

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
                    if entry.name.startswith(".") or excluded((*under, *rel, entry.name), exclude):
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


def iter_folder(root: Path, exclude: Sequence[str] = ()) -> Iterator[Record]:
    """Every image below `root` (recursive, extension allow-list, hidden files and `exclude` skipped),
    sorted by path.

    The caption of `a/b.jpg` is `a/b.txt` (one caption per line) when it exists; its user fields are the
    JSON object in `a/b.json` or `a/b.jpg.json` (a sidecar).
    """
    files = _walk_files(root.resolve(), exclude)
    for rel in sorted(files):  # the order of `sorted(Path...)`: part by part
        stem, ext = os.path.splitext(rel[-1])
        if ext.lower() not in IMAGE_EXTENSIONS:
            continue
        caption = files.get((*rel[:-1], stem + ".txt"))
        captions = _read_caption_file(Path(caption)) if caption is not None else ()
        sidecar = next(
            (
                files[(*rel[:-1], os.path.basename(p))]
                for p in _sidecars(rel[-1])
                if (*rel[:-1], os.path.basename(p)) in files
            ),
            None,
        )
        extra = _read_sidecar(Path(sidecar)) if sidecar is not None else {}
        yield Record(key=files[rel], captions=captions, path=Path(files[rel]), extra=extra)


def _sidecars(image: str) -> tuple[str, str]:
    return os.path.splitext(image)[0] + ".json", image + ".json"


def _read_sidecar(path: Path) -> dict[str, Any]:
    """The user fields of a sidecar `.json`; an unreadable or non-object one is logged and ignored."""
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        log.warning("%s: not a readable JSON sidecar (%s); its fields are not kept", path, e)
        return {}
    if not isinstance(obj, dict):
        log.warning("%s: a sidecar must hold a JSON object; its fields are not kept", path)
        return {}
    return user_fields(obj, str(path))


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


def folder_changes(root: Path, paths: Iterable[str | Path], exclude: Sequence[str] = ()) -> FolderChanges:
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
        if (
            rel == "."
            or parts[0] == ".."
            or any(p.startswith(".") for p in parts)
            or excluded(parts, exclude)
        ):
            continue
        key = os.path.join(base, *parts)
        if os.path.isdir(key) and not os.path.islink(key):
            keys.update(os.path.join(key, *r) for r in _walk_files(Path(key), exclude, tuple(parts)))
            prefixes.add(key)
            continue
        stem, ext = os.path.splitext(key)
        if ext.lower() == ".txt":
            keys.update(_same_stem_images(stem))
        elif ext.lower() == ".json":  # a sidecar: `b.json` or `b.jpg.json`
            keys.update(_same_stem_images(stem))
            keys.add(stem)
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
    sidecar = next((p for p in _sidecars(key) if os.path.isfile(p)), None)
    extra = _read_sidecar(Path(sidecar)) if sidecar is not None else {}
    return Record(key=key, captions=captions, path=Path(key), extra=extra)


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
