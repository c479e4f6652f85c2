"""Data-parallel training under torchrun (PyTorch DDP), following open_clip's recipe for contrastive
training at scale: every rank computes its local batch's features, the features are all-gathered **with
their gradients** and each rank's loss is its local rows against the whole global batch (open_clip's
`ClipLoss(local_loss=True, gather_with_grad=True)`). With DDP averaging the gradients, that is the only
combination whose gradients equal one process on the whole global batch (tests/train/test_distributed.py).

`torchrun --nproc-per-node N -m clipsearch train ...` sets RANK/WORLD_SIZE/LOCAL_RANK; `clipsearch train
--nproc N` launches the same through torch's own launcher (`torch.distributed.run`). NCCL on GPUs, gloo on
the CPU. The loop's hooks: `local_batch` (each rank's share of the global batch), `agree` (all ranks stop at
the same step), `Dist.is_main` (only rank 0 writes logs, checkpoints and the model dir) and `computed_once`
(a locked tower's feature cache: each rank computes 1/N of the rows, all ranks receive the whole cache).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from open_clip.loss import ClipLoss, SigLipLoss
from torch.nn.parallel import DistributedDataParallel

from indexer.core.errors import ClipsearchError

log = logging.getLogger(__name__)

# Rank 0 validates and saves while the others wait at their next collective; a generous timeout keeps a
# long validation from being mistaken for a dead rank.
COLLECTIVE_TIMEOUT = timedelta(minutes=60)
STOP_CODES = {None: 0, "time_budget": 1, "finished": 2, "interrupted": 3}


class DistributedError(ClipsearchError, RuntimeError):
    """A distributed run that cannot start as asked (e.g. more GPU processes than GPUs)."""


@dataclass(frozen=True)
class Dist:
    """This process's place in a data-parallel run."""

    rank: int
    world_size: int
    local_rank: int
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_world_size() -> int:
    """WORLD_SIZE as set by torchrun (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env(device: torch.device) -> tuple[Dist | None, torch.device]:
    """Join the process group torchrun set up (None for a single process) and this rank's device."""
    world = launched_world_size()
    if world <= 1:
        return None, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise DistributedError(
                f"rank {rank} needs GPU {local_rank}, but this node has {torch.cuda.device_count()}: "
                "use at most one process per GPU"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend, timeout=COLLECTIVE_TIMEOUT)
    if rank != 0:  # one process reports; the others say only what goes wrong
        logging.getLogger().setLevel(logging.WARNING)
    return Dist(rank, world, local_rank, backend), device


def shutdown(d: Dist | None) -> None:
    if d is not None and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def local_batch(global_idx: torch.Tensor, d: Dist | None) -> torch.Tensor:
    """This rank's share of a step's global batch: every world_size-th index from `rank`, as
    `DistributedSampler` deals them. The global batch is the same permutation slice a single process with
    the global batch size would take, so a run on N ranks sees the same batches as one process."""
    if d is None:
        return global_idx
    return global_idx[d.rank :: d.world_size]


def agree(status: str | None, d: Dist | None) -> str | None:
    """The strongest stop reason any rank has (Ctrl-C/SIGTERM > finished > time budget), so all ranks stop
    after the same step: a rank that stopped alone would leave the others waiting in a collective."""
    if d is None:
        return status
    code = torch.tensor([STOP_CODES[status]], dtype=torch.int64)
    if d.backend == "nccl":
        code = code.cuda()
    dist.all_reduce(code, op=dist.ReduceOp.MAX)
    return {v: k for k, v in STOP_CODES.items()}[int(code.item())]


def computed_once(n: int, compute: Callable[[int, int], torch.Tensor], d: Dist | None) -> torch.Tensor:
    """Rows 0..n of a cache computed once across the ranks: rank r runs `compute(start, stop)` on its
    contiguous 1/world_size share of the rows, and an all-gather hands every rank the whole (n, ...) tensor.
    A locked tower's features (frozen_text, frozen_image) so take 1/N of the time on N ranks instead of
    every rank computing them all; the rows equal one process's up to float noise (the same inputs in
    differently sized batches). One process: `compute(0, n)`."""
    if d is None or d.world_size == 1 or n == 0:
        return compute(0, n)
    per = -(-n // d.world_size)  # ceil: rank 0 always has rows, the last ranks may have none
    start, stop = min(d.rank * per, n), min((d.rank + 1) * per, n)
    part = compute(start, stop) if stop > start else None
    # Rank 0's share is never empty: it tells the others the row shape and dtype (for an empty share).
    meta: list[Any] = [(tuple(part.shape[1:]), part.dtype) if part is not None and d.rank == 0 else None]
    dist.broadcast_object_list(meta, src=0)
    shape, dtype = meta[0]
    device = torch.device("cuda", torch.cuda.current_device()) if d.backend == "nccl" else torch.device("cpu")
    padded = torch.zeros((per, *shape), dtype=dtype, device=device)
    if part is not None:
        padded[: len(part)] = part.to(device)
    gathered = [torch.empty_like(padded) for _ in range(d.world_size)]
    dist.all_gather(gathered, padded)
    out = torch.cat([g[: max(0, min(per, n - r * per))] for r, g in enumerate(gathered)])
    return out if part is None else out.to(part.device)


def make_distributed_loss(kind: str, d: Dist) -> torch.nn.Module:
    """open_clip's losses as its own trainer configures them at scale: local loss over features gathered
    with gradients (CLIP); SigLIP exchanges text features with the neighbouring ranks."""
    if kind == "clip":
        return ClipLoss(
            local_loss=True, gather_with_grad=True, cache_labels=True, rank=d.rank, world_size=d.world_size
        )
    if kind == "siglip":
        return SigLipLoss(rank=d.rank, world_size=d.world_size)
    raise ValueError(f"unknown loss {kind!r}")


class Towers(torch.nn.Module):
    """The forward pass of one training step as a module, so DDP can hook it: the image input (pixels, or a
    locked image trunk's cached features) and the text input (tokens, or a frozen text trunk's cached
    features) in, unit image and text embeddings out."""

    def __init__(
        self,
        model: torch.nn.Module,
        frozen_head: Callable[[torch.Tensor], torch.Tensor] | None,
        frozen_image_head: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__()
        self.model = model
        # `FrozenText.embed` / `FrozenImage.embed`: their trainable parts are submodules of `model`
        self.frozen_head = frozen_head
        self.frozen_image_head = frozen_image_head

    def forward(self, image_in: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m: Any = self.model
        if self.frozen_image_head is not None:
            image = self.frozen_image_head(image_in)
        else:
            image = m.encode_image(image_in, normalize=True)
        if self.frozen_head is not None:
            return image, self.frozen_head(text)
        return image, m.encode_text(text, normalize=True)


def wrap(towers: Towers, d: Dist, device: torch.device) -> torch.nn.Module:
    """DDP over `towers`: rank 0's weights broadcast to every rank, gradients averaged in buckets during
    backward. BatchNorm becomes SyncBatchNorm on GPUs (torch synchronises batch statistics on GPUs only; on
    the CPU each rank normalises with its local batch's statistics, stated in docs/scale.md)."""
    if device.type == "cuda":
        towers.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(towers.model)
    return DistributedDataParallel(
        towers,
        device_ids=[device.index] if device.type == "cuda" else None,
        # logit_scale/bias take part through the loss, not the forward; every trainable weight gets a
        # gradient each step, so no search for unused parameters is needed.
        find_unused_parameters=False,
    )


def launch(nproc: int, args: list[str]) -> None:
    """`clipsearch ARGS` in `nproc` processes on this machine through torch's own launcher, exactly as
    `torchrun --standalone --nproc-per-node NPROC -m clipsearch ARGS` would run it."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    ns = get_args_parser().parse_args(
        ["--standalone", f"--nproc-per-node={nproc}", "--module", "clipsearch", *args]
    )
    try:
        run(ns)
    except ChildFailedError as e:
        ranks = ", ".join(str(f.local_rank) for f in e.failures.values())
        raise DistributedError(
            f"training process(es) {ranks} of {nproc} failed; the error is printed above"
        ) from None
