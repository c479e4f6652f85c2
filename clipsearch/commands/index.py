"""`clipsearch index`: embed a collection and a text corpus and publish a new bundle."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from clipsearch.commands.app import OPTIONAL_VALUES, app, setup_logging, user_errors, warn
from indexer.core.errors import ClipsearchError

if TYPE_CHECKING:
    from indexer.index.ray_embed import RayConfig
    from indexer.index.runner import ReindexConfig

OPTIONAL_VALUES["--ray"] = "local"  # `--ray` alone: a Ray instance on this machine

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


class BadOption(ClipsearchError, ValueError):
    """A command-line value that does not parse."""


def parse_bytes(value: str) -> int:
    """`4G`, `512MiB`, `1.5g` or plain bytes -> bytes (binary units)."""
    m = _SIZE.match(value)
    if not m:
        raise BadOption(f"--max-index-memory {value!r} is not a size like 4G, 512M or 1000000")
    power = " kmgt".index(m.group(2).lower() or " ")
    return int(float(m.group(1)) * 1024**power)


def _positive(name: str, value: int, minimum: int = 1) -> int:
    if value < minimum:
        raise BadOption(f"{name} must be at least {minimum}, got {value}")
    return value


@app.command("index")
def index_command(
    model: Annotated[
        str,
        typer.Option(help="Model dir, open_clip architecture (with --pretrained) or hf-hub:ORG/NAME."),
    ],
    images: Annotated[str, typer.Option(help="Folder, CSV/TSV/JSONL of image paths, or .tar shards.")],
    bundles: Annotated[Path, typer.Option(help="Bundles dir; a new bundle is published under it.")],
    pretrained: Annotated[
        str | None,
        typer.Option(
            help="With an architecture: a tag from open_clip.list_pretrained(), a checkpoint or a model dir."
        ),
    ] = None,
    texts: Annotated[Path | None, typer.Option(help="Extra texts: one per line, or a CSV column.")] = None,
    index: Annotated[
        str, typer.Option(help="auto, flat, hnsw, ivfpq or a faiss index_factory string.")
    ] = "auto",
    max_index_memory: Annotated[str, typer.Option(help="RAM budget per index for `auto`, e.g. 4G.")] = "4G",
    exact_max: Annotated[
        int, typer.Option(help="`auto` keeps exact search up to this many vectors.")
    ] = 200_000,
    accept_low_recall: Annotated[
        bool,
        typer.Option(
            "--accept-low-recall",
            help="With --index auto: publish (with a warning) when no layout within --max-index-memory "
            "reaches recall@10 0.95, instead of failing.",
        ),
    ] = False,
    keep: Annotated[int, typer.Option(help="Keep this many newest bundles (0 keeps all).")] = 3,
    full: Annotated[bool, typer.Option("--full", help="Re-hash and re-embed everything.")] = False,
    reset_ids: Annotated[
        bool,
        typer.Option("--reset-ids", help="Number items from 0 again (ids clients cached change meaning)."),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object on stdout.")] = False,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    workers: Annotated[int | None, typer.Option(help="Decoding processes (default: cores - 1).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda (fp16 on GPU).")] = "auto",
    image_column: Annotated[str, typer.Option(help="CSV/JSONL column with the image path.")] = "filepath",
    caption_column: Annotated[str, typer.Option(help="CSV/JSONL column with the caption.")] = "caption",
    exclude: Annotated[
        list[str] | None,
        typer.Option(
            help="Leave out paths matching this glob, or with a folder or file name matching it "
            "(repeatable), e.g. --exclude node_modules --exclude '*/cache/*'."
        ),
    ] = None,
    max_pixels: Annotated[
        int, typer.Option(help="Skip images whose header declares more pixels.")
    ] = 50_000_000,
    cpu_int8: Annotated[
        bool,
        typer.Option("--cpu-int8", help="CPU fast path: int8 dynamic quantisation (opt-in, see README)."),
    ] = False,
    watch: Annotated[
        bool,
        typer.Option("--watch", help="Keep running and follow the folder: each change is a delta version."),
    ] = False,
    poll: Annotated[
        bool | None,
        typer.Option(
            "--poll/--no-poll",
            help="With --watch: poll instead of file events (default: auto).",
            show_default=False,
        ),
    ] = None,
    settle: Annotated[
        float, typer.Option(help="With --watch: seconds without a new change that end a batch.")
    ] = 0.5,
    ray: Annotated[
        str | None,
        typer.Option(
            help="Embed the images on Ray Data: `--ray` alone starts Ray here, `auto` joins this node's "
            "cluster, or a cluster address (HOST:6379, ray://HOST:10001). Needs clipsearch[ray].",
            metavar="[ADDRESS]",
        ),
    ] = None,
    ray_actors: Annotated[
        int | None, typer.Option(help="With --ray: encoder actors (default: one per GPU, else CPUs/4).")
    ] = None,
    ray_actor_cpus: Annotated[float, typer.Option(help="With --ray: CPUs reserved per encoder actor.")] = 0.5,
    ray_actor_gpus: Annotated[
        float | None, typer.Option(help="With --ray: GPUs per encoder actor (default: 1 on GPU clusters).")
    ] = None,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Debug logging, and the traceback with an error.")
    ] = False,
) -> None:
    """Embed images and texts with MODEL and publish a bundle under BUNDLES (incremental by default)."""
    setup_logging(verbose)
    with user_errors(verbose, disk=bundles):
        from indexer.core.bundle.layout import WORK_DIR
        from indexer.core.modelref import ModelReference, resolve_model_dir
        from indexer.data.sources import SourceSpec
        from indexer.data.workers import default_workers
        from indexer.index.build import IndexConfig
        from indexer.index.embed import EmbedConfig
        from indexer.index.runner import IndexingError, ReindexConfig, reindex

        if bundles.exists() and not bundles.is_dir():
            raise IndexingError(f"--bundles {bundles} exists and is not a directory")
        if watch and settle <= 0:
            raise BadOption(f"--settle must be more than 0 seconds, got {settle}")
        if watch and ray is not None:
            raise BadOption("--watch embeds each small batch of changes here; it does not take --ray")
        cfg = ReindexConfig(
            model_dir=resolve_model_dir(ModelReference(model, pretrained), bundles / WORK_DIR),
            source=SourceSpec(
                images, image_column=image_column, caption_column=caption_column, exclude=tuple(exclude or ())
            ),
            bundles_dir=bundles,
            texts_file=texts,
            index=IndexConfig(
                kind=index,
                max_memory=parse_bytes(max_index_memory),
                exact_max=_positive("--exact-max", exact_max, 0),
                accept_low_recall=accept_low_recall,
            ),
            embed=EmbedConfig(
                batch_size=_positive("--batch-size", batch_size),
                workers=default_workers() if workers is None else _positive("--workers", workers, 0),
                max_pixels=_positive("--max-pixels", max_pixels),
                cpu_int8=cpu_int8,
            ),
            device=device,
            keep=_positive("--keep", keep, 0),
            full=full,
            reset_ids=reset_ids,
            ray=_ray_config(ray, ray_actors, ray_actor_cpus, ray_actor_gpus),
        )
        if watch:
            _watch(cfg, settle, poll, json_out)
            return
        result = reindex(cfg)
        for line in result.recall_warnings:
            warn(f"{line} (published because of --accept-low-recall)")
    if json_out:
        typer.echo(json.dumps(result.summary()))
        return
    typer.echo(
        f"published {result.bundle}: {result.images} images ({result.added} added, {result.updated} updated, "
        f"{result.removed} removed, {result.unchanged} unchanged; {result.embedded} embedded"
        f"{f' at {result.images_per_s:.1f} img/s' if result.embedded else ''}), {result.texts} texts, "
        f"{result.skipped} skipped, in {result.seconds:.1f} s"
    )


def _ray_config(
    address: str | None, actors: int | None, actor_cpus: float, actor_gpus: float | None
) -> RayConfig | None:
    if address is None:
        return None
    from indexer.index.ray_embed import RayConfig

    if actors is not None:
        _positive("--ray-actors", actors)
    if actor_cpus <= 0 or (actor_gpus is not None and actor_gpus < 0):
        raise BadOption("--ray-actor-cpus must be more than 0 and --ray-actor-gpus at least 0")
    return RayConfig(address=address, actors=actors, actor_cpus=actor_cpus, actor_gpus=actor_gpus)


def _watch(cfg: ReindexConfig, settle: float, poll: bool | None, json_out: bool) -> None:
    """`--watch`: one line (or JSON object) per published version until Ctrl-C."""
    from indexer.index.live import LiveResult
    from indexer.index.watch import WatchConfig, watch

    def report(r: LiveResult) -> None:
        if json_out:
            typer.echo(json.dumps(r.summary()))
            return
        typer.echo(
            f"published {r.bundle} ({r.kind}): {r.added} added, {r.updated} updated, {r.removed} removed; "
            f"{r.images} images, {r.texts} texts, {r.skipped} skipped, in {r.seconds:.2f} s"
        )

    try:
        watch(cfg, WatchConfig(settle_s=settle, poll=poll), on_publish=report)
    except KeyboardInterrupt:
        typer.echo("stopped watching", err=True)
