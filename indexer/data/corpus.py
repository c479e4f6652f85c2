"""The text corpus of a bundle: the source's captions plus `--texts FILE`, de-duplicated in order."""

from __future__ import annotations

import csv
import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

from indexer.data.sources import CAPTION_FALLBACKS, DataError, Record


def read_texts_file(path: Path, column: str = "caption") -> list[str]:
    """One text per line, or a CSV/TSV column (`column`, else text/caption/title)."""
    if not path.is_file():
        raise DataError(f"--texts {path} does not exist")
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"--texts {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix.lower() not in (".csv", ".tsv"):
        return [line.strip() for line in raw.splitlines() if line.strip()]
    reader = csv.DictReader(io.StringIO(raw), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    found = list(reader.fieldnames or [])
    col = next((c for c in (column, "text", *CAPTION_FALLBACKS) if c in found), None)
    if col is None:
        raise DataError(f"--texts {path}: no text column; columns found: {', '.join(found) or '(none)'}")
    return [(row.get(col) or "").strip() for row in reader if (row.get(col) or "").strip()]


def collect_texts(records: Sequence[Record], extra: Sequence[str] = ()) -> list[str]:
    """Captions of the records, then `extra`, each text once, in first-seen order."""
    texts: dict[str, None] = {}
    for rec in records:
        texts.update((c, None) for c in rec.captions)
    texts.update((t, None) for t in extra)
    return list(texts)


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
