"""The runner: `clipsearch index` end to end — lock, scan, embed what changed, build the indexes, publish.

reader (`scan`) → mapper/writer (`embed`, into `cache`) → FAISS (`build`) → writer (`publish`), in one
direction. Everything a run learns is committed to `BUNDLES/.work` as it goes, so a killed run costs only
the batch in flight.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.core.bundle.items import Item, Skipped, folder_of
from indexer.core.bundle.layout import IMAGES_INDEX, MODEL_DIR, TEXTS_INDEX, WORK_DIR
from indexer.core.bundle.manifest import IndexSpec, ModelRef
from indexer.core.encoder import Encoder, resolve_device
from indexer.core.errors import ClipsearchError
from indexer.core.hashing import file_sha256
from indexer.core.images import ImageError, PhotoFacts, read_photo_facts
from indexer.core.modeldir import CONFIG_NAME, WEIGHTS_NAME, ModelError, read_model_cfg, require_model_dir
from indexer.data.corpus import collect_texts, read_texts_file, text_sha256
from indexer.data.sources import SourceSpec, read_records
from indexer.index.build import IndexConfig, build_index, validate_factory
from indexer.index.cache import MODEL_KEY_PREFIX, EmbeddingCache, FileState, FileStates, ImageFacts
from indexer.index.embed import (
    EmbedConfig,
    EmbedReport,
    ImageJob,
    apply_fast_path,
    embed_images,
    embed_texts,
)
from indexer.index.gc import prune
from indexer.index.ids import save_ids
from indexer.index.lock import exclusive_lock
from indexer.index.publish import BundleContents, clean_temp, publish
from indexer.index.scan import Previous, ScanResult, SourceImage, read_previous, scan
from indexer.index.space import RunSpace, check_space, run_needs, tidy_after_failure
from indexer.index.stages import reached

if TYPE_CHECKING:
    from indexer.index.ray_embed import RayConfig

log = logging.getLogger(__name__)


class IndexingError(ClipsearchError, RuntimeError):
    """A run that cannot publish anything useful (e.g. no image could be used)."""


@dataclass(frozen=True)
class ReindexConfig:
    model_dir: Path
    source: SourceSpec
    bundles_dir: Path
    texts_file: Path | None = None
    index: IndexConfig = field(default_factory=IndexConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    device: str = "auto"
    keep: int = 3  # bundles kept after publishing (CURRENT and leased ones are always kept)
    full: bool = False  # ignore file signatures and the embedding cache
    reset_ids: bool = False  # number items from 0 again, on purpose (ids clients cached change meaning)
    ray: RayConfig | None = None  # embed the images on a Ray cluster (`--ray`); None: in this process


@dataclass(frozen=True)
class ReindexResult:
    bundle: str
    added: int
    updated: int
    removed: int
    unchanged: int
    skipped: int
    images: int
    texts: int
    seconds: float
    embedded: int = 0  # images actually run through the model this time
    images_per_s: float = 0.0  # embedding-phase throughput
    pruned: tuple[str, ...] = ()
    # "images index: ..." for each index published below the recall target (`--accept-low-recall`)
    recall_warnings: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        """The `--json` object: exactly the keys the CLI promises."""
        keys = ("bundle", "added", "updated", "removed", "unchanged", "skipped", "images", "texts", "seconds")
        return {k: asdict(self)[k] for k in keys}


def _check_inputs(cfg: ReindexConfig) -> dict[str, Any]:
    """Fail fast, before taking the lock or reading any image, on inputs that cannot work."""
    require_model_dir(cfg.model_dir, "--model")
    try:
        model_cfg = read_model_cfg(cfg.model_dir)
        int(model_cfg["embed_dim"])
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"--model {cfg.model_dir}/{CONFIG_NAME} is not an open_clip config ({e})") from None
    validate_factory(cfg.index.kind, int(model_cfg["embed_dim"]))
    resolve_device(cfg.device)
    if cfg.texts_file is not None and not cfg.texts_file.is_file():
        raise IndexingError(f"--texts {cfg.texts_file} does not exist")
    if cfg.bundles_dir.exists() and not cfg.bundles_dir.is_dir():
        raise IndexingError(f"--bundles {cfg.bundles_dir} exists and is not a directory")
    if cfg.ray is not None:
        from indexer.index.ray_embed import require_ray

        require_ray()
    return model_cfg


def _fingerprint(model_dir: Path, states: FileStates, full: bool) -> str:
    """sha256 of the weights, remembered by (size, mtime) so an unchanged model is not hashed again."""
    weights = (model_dir / WEIGHTS_NAME).resolve()
    st = weights.stat()
    key = MODEL_KEY_PREFIX + str(weights)
    old = states.get(key)
    if not full and old is not None and (old.size, old.mtime_ns) == (st.st_size, st.st_mtime_ns):
        return old.sha256
    sha = file_sha256(weights)
    states.put([(key, FileState(st.st_size, st.st_mtime_ns, sha, st.st_size))])
    return sha


class LazyEncoder:
    """Loads the model only if something has to be embedded (an unchanged re-run never builds it).

    `fingerprint` is the run's (`_fingerprint`), so loading does not read the weights again to hash them.
    """

    def __init__(self, model_dir: Path, device: str, embed: EmbedConfig, fingerprint: str) -> None:
        self.model_dir, self.device, self.embed, self.fingerprint = model_dir, device, embed, fingerprint
        self._encoder: Encoder | None = None

    def get(self) -> Encoder:
        if self._encoder is None:
            encoder = Encoder.from_dir(self.model_dir, self.device, fingerprint=self.fingerprint)
            self._encoder = apply_fast_path(encoder, self.embed)
        return self._encoder


def reindex(cfg: ReindexConfig) -> ReindexResult:
    """Index `cfg.source` into a new bundle under `cfg.bundles_dir` and make it current."""
    start = time.perf_counter()
    model_cfg = _check_inputs(cfg)
    cfg.bundles_dir.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(cfg.bundles_dir, "index"):
        removed = clean_temp(cfg.bundles_dir)
        if removed:
            log.info("removed leftovers of an interrupted run: %s", ", ".join(removed))
        try:
            return _run(cfg, int(model_cfg["embed_dim"]), start)
        except BaseException:
            tidy_after_failure(cfg.bundles_dir)
            raise


def _run(cfg: ReindexConfig, dim: int, start: float) -> ReindexResult:
    work = cfg.bundles_dir / WORK_DIR
    records = read_records(cfg.source)
    if not records:
        raise IndexingError(f"no images found in {cfg.source.source}")
    extra = read_texts_file(cfg.texts_file, cfg.source.caption_column) if cfg.texts_file else []
    texts = collect_texts(records, extra)
    prev = read_previous(cfg.bundles_dir, cfg.reset_ids)
    states = FileStates(cfg.bundles_dir)
    try:
        scanned = scan(records, states, cfg.full)
        states.retain({r.key for r in records})
        fingerprint = _fingerprint(cfg.model_dir, states, cfg.full)
    finally:
        states.close()
    reached("scanned", work)
    variant = cfg.embed.numerics(resolve_device(cfg.device).type)
    cache = EmbeddingCache(cfg.bundles_dir, fingerprint, dim, fresh=cfg.full, variant=variant)
    try:
        return _embed_and_publish(cfg, scanned, texts, prev, cache, start)
    finally:
        cache.close()


def _embed_and_publish(
    cfg: ReindexConfig,
    scanned: ScanResult,
    texts: list[str],
    prev: Previous,
    cache: EmbeddingCache,
    start: float,
) -> ReindexResult:
    work = cfg.bundles_dir / WORK_DIR
    encoder = LazyEncoder(cfg.model_dir, cfg.device, cfg.embed, cache.fingerprint)
    jobs = _image_jobs(scanned.images, cache)
    text_shas = [(text_sha256(t), t) for t in texts]
    known_texts = cache.known("text", [s for s, _ in text_shas])
    missing_texts = {s: t for s, t in text_shas if s not in known_texts}
    space = _space(cfg, scanned, texts, prev, cache, len(jobs) + len(missing_texts))
    with space.writing(cache.path, "writing the embedding cache"):
        report = _embed_images(cfg, encoder, jobs, cache) if jobs else None
        if missing_texts:
            embed_texts(encoder.get(), list(missing_texts.items()), cache, cfg.embed)
    reached("embedded", work)
    failures = dict(report.failures) if report else {}
    usable, skipped = _split(scanned, failures, cache)
    if not usable:
        raise IndexingError(_all_failed_message(skipped))
    contents, counts = _contents(cfg, usable, texts, prev, cache, encoder, skipped)
    with space.writing(cfg.bundles_dir, "publishing the new bundle"):
        # The id record first: it is never behind a bundle that shows its ids.
        save_ids(cfg.bundles_dir, contents.items, (contents.stats or {})["next_id"])
        root = publish(cfg.bundles_dir, contents)
    reached("published", work)
    pruned = tuple(prune(cfg.bundles_dir, cfg.keep)) if cfg.keep > 0 else ()
    embedded = report.embedded if report else 0
    rate = embedded / report.seconds if report and report.seconds > 0 else 0.0
    return ReindexResult(
        bundle=root.name,
        **counts,
        skipped=len(skipped),
        images=len(usable),
        texts=len(texts),
        seconds=round(time.perf_counter() - start, 3),
        embedded=embedded,
        images_per_s=round(rate, 2),
        pruned=pruned,
        recall_warnings=tuple(
            f"{name} index: {spec.recall_warning}"
            for name, spec in (("images", contents.images), ("texts", contents.texts))
            if spec.recall_warning
        ),
    )


def _embed_images(
    cfg: ReindexConfig, encoder: LazyEncoder, jobs: list[ImageJob], cache: EmbeddingCache
) -> EmbedReport:
    work = cfg.bundles_dir / WORK_DIR
    if cfg.ray is None:
        return embed_images(encoder.get(), jobs, cache, cfg.embed, work)
    from indexer.index.ray_embed import embed_images_ray

    transform = encoder.get().preprocess  # the model's own, so pixels match a single-process run
    return embed_images_ray(
        cfg.ray, cfg.model_dir, cfg.device, cache.fingerprint, transform, jobs, cache, cfg.embed, work
    )


def _space(
    cfg: ReindexConfig, scanned: ScanResult, texts: list[str], prev: Previous, cache: EmbeddingCache, new: int
) -> RunSpace:
    """What the run will add to the bundles dir, checked against the free space before embedding."""
    items = len(scanned.images) + len(texts)
    text_bytes = sum(len(i.key) + sum(map(len, i.record.captions[:1])) for i in scanned.images)
    exact = cfg.index.kind == "flat" or (cfg.index.kind == "auto" and items <= cfg.index.exact_max)
    linked = prev.manifest is not None and prev.manifest.model.fingerprint == cache.fingerprint
    model = None if linked else cfg.model_dir
    needed = run_needs(cache.dim, new, items, text_bytes + sum(map(len, texts)), exact, model)
    return check_space(cfg.bundles_dir, needed)


def _image_jobs(images: list[SourceImage], cache: EmbeddingCache) -> list[ImageJob]:
    """One job per distinct content not yet in the cache (duplicates and renames are embedded once)."""
    distinct = {img.sha256: img.record for img in images}
    known = cache.known("image", list(distinct))
    return [ImageJob(sha, rec) for sha, rec in distinct.items() if sha not in known]


def _split(
    scanned: ScanResult, failures: dict[str, tuple[str, str]], cache: EmbeddingCache
) -> tuple[list[SourceImage], list[Skipped]]:
    """Images that have a vector now, and skipped.jsonl rows for the rest."""
    skipped = list(scanned.failed)
    usable = []
    for img in scanned.images:
        if img.sha256 in failures:
            code, message = failures[img.sha256]
            skipped.append(Skipped(img.key, code, message))
        else:
            usable.append(img)
    return usable, skipped


def _all_failed_message(skipped: list[Skipped]) -> str:
    first = "; ".join(f"{Path(s.path).name}: {s.reason}" for s in skipped[:3])
    return f"none of the {len(skipped)} images could be used ({first}); nothing was published"


def _assign_ids(
    usable: list[SourceImage], texts: list[str], prev: Previous
) -> tuple[list[int], list[int], int]:
    """Reuse the previous bundle's id for the same path / text; new items get ids never used before."""
    next_id = prev.next_id
    image_ids, text_ids = [], []
    for img in usable:
        old = prev.images.get(img.key)
        image_ids.append(old[0] if old else next_id)
        next_id += 0 if old else 1
    for text in texts:
        old_id = prev.texts.get(text)
        text_ids.append(old_id if old_id is not None else next_id)
        next_id += 0 if old_id is not None else 1
    return image_ids, text_ids, next_id


def _counts(usable: list[SourceImage], prev: Previous) -> dict[str, int]:
    keys = {img.key for img in usable}
    added = sum(1 for img in usable if img.key not in prev.images)
    updated = sum(1 for img in usable if img.key in prev.images and prev.images[img.key][1] != img.sha256)
    removed = sum(1 for key in prev.images if key not in keys)
    return {
        "added": added,
        "updated": updated,
        "removed": removed,
        "unchanged": len(usable) - added - updated,
    }


def _model_ref(prev: Previous, fingerprint: str, encoder: LazyEncoder) -> tuple[ModelRef, Path | None]:
    """The manifest's model entry; reused from the previous bundle (with its files) if the weights match."""
    if prev.manifest is not None and prev.root is not None and prev.manifest.model.fingerprint == fingerprint:
        return prev.manifest.model, prev.root / MODEL_DIR
    return encoder.get().info.model_copy(update={"fingerprint": fingerprint}), None


def _image_item(item_id: int, img: SourceImage, facts: ImageFacts) -> Item:
    photo = facts.photo or PhotoFacts()
    return Item(
        id=item_id,
        kind="image",
        path=img.key,
        text=img.record.captions[0] if img.record.captions else None,  # shown as the hit's caption
        size=img.state.nbytes,
        mtime=img.mtime,
        sha256=img.sha256,
        width=facts.width,
        height=facts.height,
        folder=folder_of(img.key),
        taken_at=photo.taken_at,
        camera=photo.camera,
        fields=img.record.extra,
    )


def image_facts(cache: EmbeddingCache, images: Iterable[SourceImage]) -> dict[str, ImageFacts]:
    """Each image's cached size and EXIF facts by sha256; facts missing from an older cache are read
    from the file's header now (once: they are written back)."""
    images = list(images)
    facts = cache.sizes("image", [img.sha256 for img in images])
    todo = {img.sha256: img for img in images if img.sha256 in facts and facts[img.sha256].photo is None}
    if todo:
        log.info("reading the EXIF of %d images indexed before capture times were kept", len(todo))
    read: list[tuple[str, PhotoFacts]] = []
    for sha, img in todo.items():
        try:
            photo = read_photo_facts(img.record.image_source())
        except (ImageError, OSError):
            photo = PhotoFacts()
        read.append((sha, photo))
        facts[sha] = replace(facts[sha], photo=photo)
    if read:
        cache.put_facts(read)
    return facts


def _contents(
    cfg: ReindexConfig,
    usable: list[SourceImage],
    texts: list[str],
    prev: Previous,
    cache: EmbeddingCache,
    encoder: LazyEncoder,
    skipped: list[Skipped],
) -> tuple[BundleContents, dict[str, int]]:
    image_ids, text_ids, next_id = _assign_ids(usable, texts, prev)
    image_shas = [img.sha256 for img in usable]
    text_shas = [text_sha256(t) for t in texts]
    image_index, image_spec = build_index(
        lambda: cache.blocks("image", image_shas), np.asarray(image_ids, np.int64), cache.dim, cfg.index
    )
    reached("built-images", cfg.bundles_dir / WORK_DIR)
    text_index, text_spec = build_index(
        lambda: cache.blocks("text", text_shas), np.asarray(text_ids, np.int64), cache.dim, cfg.index
    )
    sizes = image_facts(cache, usable)
    items = [
        _image_item(i, img, sizes.get(img.sha256, ImageFacts()))
        for i, img in zip(image_ids, usable, strict=True)
    ]
    items += [
        Item(id=i, kind="text", text=t, sha256=s) for i, t, s in zip(text_ids, texts, text_shas, strict=True)
    ]
    model_ref, link_from = _model_ref(prev, cache.fingerprint, encoder)
    counts = _counts(usable, prev)
    contents = BundleContents(
        model_dir=cfg.model_dir,
        model=model_ref,
        image_index=image_index,
        text_index=text_index,
        images=IndexSpec(**{**image_spec.model_dump(), "file": IMAGES_INDEX}),
        texts=IndexSpec(**{**text_spec.model_dump(), "file": TEXTS_INDEX}),
        items=items,
        skipped=skipped,
        stats={
            **counts,
            "skipped": len(skipped),
            "next_id": next_id,
            "source": cfg.source.source,
            "numerics": cache.variant or "default",
        },
        link_model_from=link_from,
    )
    return contents, counts


def reindex_locked(cfg: ReindexConfig) -> ReindexResult:
    """`reindex` for a caller that already holds the bundles dir's lock (the watcher's full passes)."""
    start = time.perf_counter()
    model_cfg = _check_inputs(cfg)
    return _run(cfg, int(model_cfg["embed_dim"]), start)
