"""The embedding stage on a Ray cluster (`clipsearch index --ray`): the changed files are read and decoded
in Ray tasks, embedded by a pool of encoder actors (Ray Data `map_batches` with `ActorPoolStrategy`), and
the vectors stream back to the driver, which commits them to the same embedding cache, batch by batch.

Only this stage moves: scanning, the cache, FAISS and publishing stay on the driver, so a bundle does not
depend on where its vectors were computed. Ray is an optional extra (`clipsearch[ray]`), imported only here.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.core.errors import ClipsearchError
from indexer.core.images import DecodeOptions, PhotoFacts
from indexer.data.decode import decode_one
from indexer.data.sources import Record
from indexer.index.cache import EmbeddingCache
from indexer.index.embed import EmbedConfig, EmbedReport, ImageJob, commit_batches

log = logging.getLogger(__name__)

LOCAL = "local"  # `--ray` with no address: start a Ray instance on this machine for the run
RAY_EXTRA = "pip install 'clipsearch[ray]'"


class RayUnavailable(ClipsearchError, RuntimeError):
    """`--ray` without Ray installed, or a cluster that cannot be reached."""


@dataclass(frozen=True)
class RayConfig:
    """Where and how wide the embedding stage runs.

    `address`: `local` starts Ray on this machine; `auto` joins the cluster this node belongs to;
    anything else is passed to `ray.init` (`HOST:6379`, `ray://HOST:10001`).
    `actors`: size of the encoder pool; None: one per GPU in the cluster, else one per 4 CPUs (at least 1).
    `actor_cpus`: CPUs reserved per encoder actor. Fractional on purpose: on a small node, whole-CPU actors
    take every slot and the decode tasks never run (the pipeline hangs, ray-project/ray#44687).
    `actor_gpus`: GPUs per actor; None: 1 when the cluster has GPUs, else 0.
    `decode_cpus`: CPUs reserved per decode task.
    """

    address: str = LOCAL
    actors: int | None = None
    actor_cpus: float = 0.5
    actor_gpus: float | None = None
    decode_cpus: float = 0.5
    num_cpus: int | None = None  # with `local`: the CPUs the local instance may use (None: all)


def require_ray() -> Any:
    """The `ray` module, or a one-line error saying what to install."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise RayUnavailable(f"--ray needs Ray Data, which is not installed: {RAY_EXTRA}") from None
    return ray


@contextmanager
def ray_session(cfg: RayConfig) -> Iterator[Any]:
    """Ray connected as `cfg` says; reuses an instance the process already started (tests, notebooks) and
    shuts down only one it started itself."""
    ray = require_ray()
    if ray.is_initialized():
        yield ray
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
    if cfg.address == LOCAL:
        kwargs["num_cpus"] = cfg.num_cpus
    else:
        kwargs["address"] = cfg.address
    try:
        ray.init(**kwargs)
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = "a local Ray instance" if cfg.address == LOCAL else f"the Ray cluster at {cfg.address}"
        raise RayUnavailable(f"could not start or reach {where}: {str(e).splitlines()[0]}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def pool_shape(cfg: RayConfig, resources: dict[str, float]) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) for a cluster with `resources` (`ray.cluster_resources()`)."""
    gpus = float(resources.get("GPU", 0.0))
    per_gpu = cfg.actor_gpus if cfg.actor_gpus is not None else (1.0 if gpus >= 1 else 0.0)
    if cfg.actors is not None:
        actors = cfg.actors
    elif per_gpu > 0:
        actors = max(1, math.floor(gpus / per_gpu))
    else:
        actors = max(1, math.floor(float(resources.get("CPU", 1.0)) / 4))
    return actors, cfg.actor_cpus, per_gpu


def actor_threads(resources: dict[str, float], actors: int) -> int:
    """torch threads for each CPU encoder actor: the cluster's CPUs shared among the actors. Ray sets
    `OMP_NUM_THREADS` to an actor's reserved CPUs, 1 for the fractional reservation that keeps decode
    tasks running, so on a 16-CPU node the default 4 actors would each compute on one core (on this
    2-core machine the difference was not measurable: docs/benchmarks.md, "Past one machine")."""
    return max(1, math.floor(float(resources.get("CPU", 1.0)) / max(1, actors)))


def _row(job_pos: int, record: Record) -> dict[str, Any]:
    # Plain strings: rows cross process (and node) boundaries as Arrow columns.
    return {
        "pos": job_pos,
        "key": record.key,
        "path": str(record.path) if record.path is not None else "",
        "shard": str(record.shard) if record.shard is not None else "",
        "member": record.member or "",
    }


def _record(row: dict[str, Any]) -> Record:
    return Record(
        key=str(row["key"]),
        path=Path(str(row["path"])) if row["path"] else None,
        shard=Path(str(row["shard"])) if row["shard"] else None,
        member=str(row["member"]) or None,
    )


def _decode_batch(
    batch: dict[str, np.ndarray], transform: Callable[[Any], Any], max_pixels: int, shape: tuple[int, ...]
) -> dict[str, np.ndarray]:
    """A Ray task: read and decode each row's image with the shared decoder and the model's transform.

    Failed rows keep their place with zero pixels and the failure's code and message."""
    options = DecodeOptions(max_pixels=max_pixels)
    n = len(batch["pos"])
    pixels = np.zeros((n, *shape), dtype=np.float32)
    width, height = np.zeros(n, np.int64), np.zeros(n, np.int64)
    codes, messages = [""] * n, [""] * n
    taken_at, camera = (
        np.full(n, np.nan),
        [""] * n,
    )  # EXIF facts, read while decoding (as the local path does)
    for j in range(n):
        row = {k: batch[k][j] for k in ("key", "path", "shard", "member")}
        d = decode_one(_record(row), transform, options, pos=j)
        if d.pixels is not None and d.size is not None:
            pixels[j] = d.pixels.numpy()
            width[j], height[j] = d.size
            if d.facts is not None:
                taken_at[j] = np.nan if d.facts.taken_at is None else d.facts.taken_at
                camera[j] = d.facts.camera or ""
        elif d.error is not None:
            codes[j], messages[j] = d.error
    return {
        "pos": batch["pos"],
        "pixels": pixels,
        "width": width,
        "height": height,
        "taken_at": taken_at,
        "camera": np.asarray(camera, dtype=object),
        "code": np.asarray(codes, dtype=object),
        "message": np.asarray(messages, dtype=object),
    }


class _EncoderActor:
    """One model per actor, loaded once; a batch of decoded pixels in, its unit vectors out."""

    def __init__(
        self, model_dir: str, device: str, fingerprint: str, embed: EmbedConfig, threads: int
    ) -> None:
        import torch

        from indexer.core.encoder import Encoder
        from indexer.index.embed import apply_fast_path

        if device == "cpu":
            torch.set_num_threads(threads)
        self.encoder = apply_fast_path(Encoder.from_dir(model_dir, device, fingerprint=fingerprint), embed)
        self.dim = self.encoder.info.embed_dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        ok = np.asarray([c == "" for c in batch["code"]], dtype=bool)
        vecs = np.zeros((len(ok), self.dim), dtype=np.float32)
        if ok.any():
            vecs[ok] = self.encoder.encode_pixels(torch.from_numpy(np.ascontiguousarray(batch["pixels"][ok])))
        return {
            "pos": batch["pos"],
            "vec": vecs,
            "width": batch["width"],
            "height": batch["height"],
            "taken_at": batch["taken_at"],
            "camera": batch["camera"],
            "code": batch["code"],
            "message": batch["message"],
        }


def embed_images_ray(
    cfg: RayConfig,
    model_dir: Path,
    device: str,
    fingerprint: str,
    transform: Callable[[Any], Any],
    jobs: Sequence[ImageJob],
    cache: EmbeddingCache,
    embed: EmbedConfig,
    work_dir: Path,
) -> EmbedReport:
    """`embed_images` on Ray: the same jobs, the same cache rows and failures, computed on the cluster.

    `transform` is the model's own preprocessing (the driver's encoder's), shipped to the decode tasks so
    a picture becomes the same tensor as in a single-process run."""
    report = EmbedReport()
    start = time.perf_counter()
    with ray_session(cfg) as ray:
        resources = ray.cluster_resources()
        actors, actor_cpus, actor_gpus = pool_shape(cfg, resources)
        shape = tuple(transform(_probe_image()).shape)
        log.info(
            "ray: %d images on %d encoder actor(s) (%.2g CPU, %.2g GPU each)",
            len(jobs),
            actors,
            actor_cpus,
            actor_gpus,
        )
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.execution_options.preserve_order = False
        items = [_row(i, j.record) for i, j in enumerate(jobs)]
        blocks = max(1, min(len(items) // max(1, embed.batch_size), 200))
        ds = ray.data.from_items(items, override_num_blocks=blocks)
        ds = ds.map_batches(
            _decode_batch,
            batch_size=embed.batch_size,
            fn_kwargs={"transform": transform, "max_pixels": embed.max_pixels, "shape": shape},
            num_cpus=cfg.decode_cpus,
        )
        ds = ds.map_batches(
            _EncoderActor,
            batch_size=embed.batch_size,
            compute=ray.data.ActorPoolStrategy(size=actors),
            fn_constructor_kwargs={
                "model_dir": str(model_dir.resolve()),
                "device": "cuda" if actor_gpus > 0 else _actor_device(device),
                "fingerprint": fingerprint,
                "embed": embed,
                "threads": actor_threads(resources, actors),
            },
            num_cpus=actor_cpus,
            num_gpus=actor_gpus,
            # A killed actor is restarted and its batches run again: Ray Data's default for actor pools
            # (max_restarts=-1, max_task_retries=-1), relied on, not re-declared.
        )

        def commit(out: dict[str, np.ndarray]) -> int:
            _commit(out, jobs, cache, report)
            return len(out["pos"])

        batches = ds.iter_batches(batch_size=None, batch_format="numpy")
        commit_batches(batches, commit, len(jobs), "embedding images (ray)", work_dir)
    report.seconds = time.perf_counter() - start
    return report


def _commit(
    out: dict[str, np.ndarray], jobs: Sequence[ImageJob], cache: EmbeddingCache, report: EmbedReport
) -> None:
    rows, facts = [], []
    for j, pos in enumerate(out["pos"]):
        job = jobs[int(pos)]
        code = str(out["code"][j])
        if code:
            report.failures[job.sha256] = (code, str(out["message"][j]))
        else:
            rows.append((job.sha256, out["vec"][j], int(out["width"][j]), int(out["height"][j])))
            t = float(out["taken_at"][j])
            facts.append(PhotoFacts(None if np.isnan(t) else t, str(out["camera"][j]) or None))
    if rows:
        cache.put("image", rows, facts)
        report.embedded += len(rows)


def _actor_device(device: str) -> str:
    # `auto` on the driver means "whatever each node has"; without GPUs reserved, actors run on the CPU.
    return "cpu" if device == "auto" else device


def _probe_image() -> Any:
    from PIL import Image

    return Image.new("RGB", (8, 8))
