"""Build a real image–caption set from a colour emoji font: one PNG per emoji, its English name as caption.

The split is by concept, not by image: skin-tone, gender and person-type variants of one emoji (👋🏻 …
👋🏿, 🏃‍♀️ / 🏃‍♂️, 👩‍🍳 / 👨‍🍳 / 🧑‍🍳) share a concept, and a concept lands wholly in train or wholly
in val. Validation therefore measures recall on things the model has never seen, not on a recoloured
copy of a training image.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import unicodedata
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import emoji
from PIL import Image, ImageChops, ImageDraw, ImageFont, features

from indexer.core.errors import ClipsearchError
from indexer.core.hashing import file_sha256
from indexer.data.emoji_manifest import (
    DATASET_FILE,
    TABLES,
    EmojiDatasetInfo,
    SkipCounts,
    SplitCounts,
    check_emoji_dataset,
    images_digest,
)

DEFAULT_FONT = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
# CBDT bitmap fonts (Noto Color Emoji) only load at their strike size, 109; sbix fonts (Apple Color Emoji)
# at one of theirs; scalable COLR fonts at any size. The first size that loads wins.
FONT_SIZES = (109, 160, 137, 128, 96, 64)
SKIN_TONES = frozenset(chr(c) for c in range(0x1F3FB, 0x1F400))
ZWJ, VS16 = "\u200d", "\ufe0f"
GENDER_SIGNS = frozenset({"\u2640", "\u2642"})
# Inside a ZWJ sequence these three only choose who is shown (👩‍🍳 / 👨‍🍳 / 🧑‍🍳); the concept is the same.
PERSON_BASES = {"\U0001f468": "\U0001f9d1", "\U0001f469": "\U0001f9d1"}
# A missing glyph (.notdef) is rendered from a noncharacter the font surely lacks, to recognise tofu.
NOT_A_CHARACTER = "\U0010fffd"
# Pillow's wheels carry raqm and HarfBuzz but load FriBiDi from the system: without it, raqm is off.
RAQM_MISSING = (
    "Pillow's complex text layout (raqm) is unavailable, so no emoji sequence (skin tones, ZWJ "
    "sequences, flags: about two thirds of the set) can be drawn; raqm needs the FriBiDi library: "
    "`apt-get install libfribidi0` (Debian, Ubuntu), `dnf install fribidi` (Fedora), "
    "`brew install fribidi` (macOS), then run again (a Pillow built from source also needs libraqm)"
)


class FontError(ClipsearchError, ValueError):
    """The emoji font is missing or cannot be used."""


@dataclass(frozen=True)
class EmojiDataConfig:
    """What `clipsearch data emoji` builds."""

    out: Path
    font: Path = DEFAULT_FONT
    size: int = 64  # side of the square PNGs, in pixels
    val_fraction: float = 0.1  # share of the images whose concepts go to val.csv
    seed: int = 0  # chooses which concepts are held out
    limit: int | None = None  # only this many concepts (all their variants); for quick tests
    workers: int = 1  # rendering processes


@dataclass(frozen=True)
class EmojiEntry:
    """One fully-qualified emoji of the catalogue."""

    chars: str
    caption: str
    concept: str  # codepoints of the variant-free form, e.g. "1f9d1-200d-1f373" for every cook

    @property
    def filepath(self) -> str:
        return f"images/{codepoints(self.chars)}.png"


def codepoints(chars: str) -> str:
    return "-".join(f"{ord(c):x}" for c in chars)


def caption_of(chars: str) -> str:
    """The English name: the `emoji` package's CLDR name, else Unicode's character name."""
    data = emoji.EMOJI_DATA.get(chars)
    if data is None:
        return unicodedata.name(chars, "").lower() if len(chars) == 1 else ""
    name = data["en"].strip(":").replace("_", " ")
    # CLDR calls them "flag: Japan"; the package drops the word, and the caption needs it.
    is_flag = all(0x1F1E6 <= ord(c) <= 0x1F1FF for c in chars) or chars.startswith("\U0001f3f4\U000e0067")
    return f"flag {name}" if is_flag and "flag" not in name.lower() else name


def concept_of(chars: str) -> str:
    """The variant-free key of an emoji: skin tones, gender signs and person type removed."""
    out: list[str] = []
    for c in chars:
        if c in SKIN_TONES or c == VS16:
            continue
        if c in GENDER_SIGNS and out and out[-1] == ZWJ:
            out.pop()  # "🏃 ZWJ ♀" -> "🏃": the sign is a variant, not the thing
            continue
        out.append(c)
    if ZWJ in out:
        out = [PERSON_BASES.get(c, c) for c in out]
    return codepoints("".join(out) or chars)


def catalogue() -> list[EmojiEntry]:
    """Every fully-qualified emoji the `emoji` package knows, in codepoint order."""
    fully = emoji.STATUS["fully_qualified"]
    chars = sorted(c for c, d in emoji.EMOJI_DATA.items() if d["status"] == fully)
    return [EmojiEntry(c, caption_of(c), concept_of(c)) for c in chars]


def concept_rank(concept: str, seed: int) -> str:
    """A fixed pseudo-random order of concepts; `seed` reshuffles it."""
    return hashlib.sha256(f"{seed}:{concept}".encode()).hexdigest()


def limit_concepts(entries: Sequence[EmojiEntry], limit: int | None) -> list[EmojiEntry]:
    """Keep every variant of the first `limit` concepts in a seed-independent pseudo-random order."""
    if limit is None:
        return list(entries)
    keep = set(sorted({e.concept for e in entries}, key=lambda c: concept_rank(c, -1))[:limit])
    return [e for e in entries if e.concept in keep]


def split_by_concept(
    entries: Sequence[EmojiEntry], val_fraction: float, seed: int
) -> tuple[list[EmojiEntry], list[EmojiEntry]]:
    """(train, val): whole concepts go to val, in hash order, until it holds `val_fraction` of the images.

    A concept's place in the order depends only on its key and the seed, so a new font version moves
    the cut-off a little but never reshuffles the rest.
    """
    sizes: dict[str, int] = {}
    for e in entries:
        sizes[e.concept] = sizes.get(e.concept, 0) + 1
    target = val_fraction * len(entries)
    val_concepts: set[str] = set()
    taken = 0
    for concept in sorted(sizes, key=lambda c: concept_rank(c, seed)):
        if taken >= target or len(val_concepts) + 1 >= len(sizes):
            break  # the last concept always stays in train
        val_concepts.add(concept)
        taken += sizes[concept]
    train = [e for e in entries if e.concept not in val_concepts]
    val = [e for e in entries if e.concept in val_concepts]
    return train, val


def text_layout() -> Literal["raqm", "basic"]:
    """`raqm` when Pillow can shape emoji sequences into one glyph; `basic` draws single emoji only."""
    return "raqm" if features.check("raqm") else "basic"


def load_font(path: Path) -> ImageFont.FreeTypeFont:
    """The colour font at the first size it loads at; a one-line error when it can't be used."""
    if not path.is_file():
        raise FontError(
            f"emoji font not found: {path}; install it with `apt-get install fonts-noto-color-emoji` "
            "or pass --font PATH to a colour emoji font"
        )
    # Raqm does the shaping that turns ZWJ sequences and flags into one glyph.
    engine = ImageFont.Layout.RAQM if text_layout() == "raqm" else ImageFont.Layout.BASIC
    for size in FONT_SIZES:
        try:
            return ImageFont.truetype(str(path), size, layout_engine=engine)
        except OSError:
            continue
    raise FontError(f"{path} is not a font Pillow can load at any of the sizes {FONT_SIZES}")


def _draw(font: ImageFont.FreeTypeFont, chars: str) -> Image.Image:
    """The glyph(s) on a transparent canvas."""
    _, _, right, bottom = font.getbbox(chars)
    canvas = Image.new("RGBA", (max(int(right), 1) + 8, max(int(bottom), 1) + 8), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((4, 4), chars, font=font, embedded_color=True)
    return canvas


def render(font: ImageFont.FreeTypeFont, chars: str, size: int, tofu: Image.Image | None) -> bytes | str:
    """PNG bytes of the emoji on white, `size`×`size`; or why it was skipped (blank, tofu, unsupported)."""
    first = font.getlength(chars[0])
    if first > 0 and font.getlength(chars) > 1.5 * first:
        return "unsupported"  # the font drew the parts of a sequence side by side: no glyph for the whole
    glyph = _draw(font, chars)
    box = glyph.getchannel("A").getbbox()
    if box is None:
        return "blank"
    if tofu is not None and glyph.size == tofu.size and ImageChops.difference(glyph, tofu).getbbox() is None:
        return "tofu"
    glyph = glyph.crop(box)
    side = int(max(glyph.size) * 1.08)  # a thin white margin, as emoji pickers show them
    square = Image.new("RGBA", (side, side), (255, 255, 255, 255))
    square.alpha_composite(glyph, ((side - glyph.width) // 2, (side - glyph.height) // 2))
    small = square.convert("RGB").resize((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    small.save(buf, format="PNG")  # optimize=True: 6x slower for 1% smaller
    return buf.getvalue()


_WORKER: tuple[ImageFont.FreeTypeFont, Image.Image | None, int] | None = None


def _init_worker(font_path: str, size: int) -> None:
    global _WORKER
    font = load_font(Path(font_path))
    reference = _draw(font, NOT_A_CHARACTER)
    _WORKER = (font, reference if reference.getchannel("A").getbbox() else None, size)


def _render_one(chars: str) -> bytes | str:
    assert _WORKER is not None
    font, tofu, size = _WORKER
    return render(font, chars, size, tofu)


def render_all(entries: Sequence[EmojiEntry], font: Path, size: int, workers: int) -> list[bytes | str]:
    """Render every entry, in order, on `workers` processes (1: in this process)."""
    chars = [e.chars for e in entries]
    if workers <= 1:
        _init_worker(str(font), size)
        return [_render_one(c) for c in chars]
    with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(str(font), size)) as pool:
        return list(pool.map(_render_one, chars, chunksize=64))


def _write_if_changed(path: Path, data: bytes) -> None:
    """Atomic write that leaves an identical file untouched (re-runs keep mtimes, so caches stay warm)."""
    if path.is_file() and path.read_bytes() == data:
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _csv_bytes(rows: Iterable[Sequence[str]], header: Sequence[str]) -> bytes:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue().encode()


def _prepare_out(out: Path) -> None:
    """Refuse to write into a folder that holds anything but (part of) an earlier emoji build."""
    if out.exists() and not out.is_dir():
        raise ClipsearchError(f"--out {out} exists and is not a folder")
    ours = {"images", DATASET_FILE, *TABLES}
    found = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [name for name in found if name not in ours and not name.endswith(".tmp")]
    if foreign:
        raise ClipsearchError(
            f"--out {out} holds other files ({foreign[0]}, ...); pick a new or empty folder"
        )
    (out / DATASET_FILE).unlink(missing_ok=True)  # absent until this build is complete
    (out / "images").mkdir(parents=True, exist_ok=True)


def _write_images(out: Path, rendered: Sequence[tuple[EmojiEntry, bytes]]) -> None:
    keep = {out / e.filepath for e, _ in rendered}
    for stale in (out / "images").glob("*.png"):
        if stale not in keep:
            stale.unlink()  # from an earlier build with another font or --limit
    for entry, png in rendered:
        _write_if_changed(out / entry.filepath, png)


def _write_tables(out: Path, train: Sequence[EmojiEntry], val: Sequence[EmojiEntry]) -> None:
    every = sorted([*train, *val], key=lambda e: e.chars)
    split = {e.chars: "val" for e in val}
    header = ("filepath", "caption")
    _write_if_changed(out / "captions.csv", _csv_bytes(((e.filepath, e.caption) for e in every), header))
    _write_if_changed(out / "train.csv", _csv_bytes(((e.filepath, e.caption) for e in train), header))
    _write_if_changed(out / "val.csv", _csv_bytes(((e.filepath, e.caption) for e in val), header))
    meta = ((e.filepath, e.chars, e.caption, e.concept, split.get(e.chars, "train")) for e in every)
    _write_if_changed(
        out / "metadata.csv", _csv_bytes(meta, ("filepath", "emoji", "caption", "concept", "split"))
    )


def build_emoji_dataset(cfg: EmojiDataConfig) -> EmojiDatasetInfo:
    """Render, split and write the data set under `cfg.out`; the same config always gives the same bytes."""
    if cfg.size < 8 or not 0 <= cfg.val_fraction < 1:
        raise ClipsearchError("--size must be at least 8 and --val-fraction in [0, 1)")
    load_font(cfg.font)  # fail early on a bad font
    entries = limit_concepts(catalogue(), cfg.limit)
    results = render_all(entries, cfg.font, cfg.size, cfg.workers)
    rendered = [(e, r) for e, r in zip(entries, results, strict=True) if isinstance(r, bytes)]
    skipped = [r for r in results if isinstance(r, str)]
    if not rendered:
        raise FontError(f"{cfg.font} rendered none of the {len(entries)} emoji; is it a colour emoji font?")
    train, val = split_by_concept([e for e, _ in rendered], cfg.val_fraction, cfg.seed)
    _prepare_out(cfg.out)
    _write_images(cfg.out, rendered)
    _write_tables(cfg.out, train, val)
    info = EmojiDatasetInfo(
        font=str(cfg.font),
        font_sha256=file_sha256(cfg.font),
        size=cfg.size,
        seed=cfg.seed,
        val_fraction=cfg.val_fraction,
        limit=cfg.limit,
        emoji_package=emoji.__version__,
        layout=text_layout(),
        catalogue=len(entries),
        images=len(rendered),
        skipped=SkipCounts(**{k: skipped.count(k) for k in ("blank", "tofu", "unsupported")}),
        train=SplitCounts(images=len(train), concepts=len({e.concept for e in train})),
        val=SplitCounts(images=len(val), concepts=len({e.concept for e in val})),
        files={name: file_sha256(cfg.out / name) for name in TABLES},
        images_sha256=images_digest(cfg.out, sorted(e.filepath for e, _ in rendered)),
    )
    _write_if_changed(cfg.out / DATASET_FILE, (info.model_dump_json(indent=2) + "\n").encode())
    return check_emoji_dataset(cfg.out)
