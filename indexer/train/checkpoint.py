"""Resumable training checkpoints without pickle: tensors in safetensors, everything else in JSON.

Layout of `RUN_DIR/checkpoint/`: `model.safetensors` (model state), `optimizer.safetensors` (AdamW
moments, flattened as `state.<param index>.<name>`), `state.json` (progress, optimizer param groups, RNG
seed state). The directory is written as `checkpoint.tmp/` and renamed into place, so a crash while
saving leaves the previous checkpoint whole.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from indexer.core.errors import ClipsearchError
from indexer.train.progress import Progress

CHECKPOINT_DIR = "checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ClipsearchError):
    """A run directory without a usable checkpoint."""


def _optimizer_tensors(opt_state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, scalars = {}, {}
    for idx, state in opt_state["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, scalars


def save_checkpoint(
    run_dir: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    progress: Progress,
    rng_state: torch.Tensor,
) -> Path:
    """Write the checkpoint atomically (temp dir, fsync, rename) and return its path."""
    final = run_dir / CHECKPOINT_DIR
    tmp = run_dir / f"{CHECKPOINT_DIR}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model_state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(model_state, str(tmp / "model.safetensors"))
    opt_state = optimizer.state_dict()
    tensors, scalars = _optimizer_tensors(opt_state)
    tensors["rng_state"] = rng_state.contiguous()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {
        "format_version": FORMAT_VERSION,
        "progress": progress.to_json(),
        "param_groups": opt_state["param_groups"],
        "optimizer_scalars": scalars,
    }
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    old = run_dir / f"{CHECKPOINT_DIR}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def _read_state(run_dir: Path) -> dict[str, Any]:
    ckpt = run_dir / CHECKPOINT_DIR
    if not (ckpt / "state.json").is_file():
        raise CheckpointError(f"{run_dir} has no resumable checkpoint ({CHECKPOINT_DIR}/state.json)")
    state: dict[str, Any] = json.loads((ckpt / "state.json").read_text())
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt}: unsupported checkpoint format {state.get('format_version')}")
    return state


def load_model_state(run_dir: Path, model: torch.nn.Module) -> None:
    """Restore the model weights of the checkpoint in place."""
    _read_state(run_dir)
    model.load_state_dict(load_file(str(run_dir / CHECKPOINT_DIR / "model.safetensors")))


def load_optimizer_state(run_dir: Path, optimizer: torch.optim.Optimizer) -> tuple[Progress, torch.Tensor]:
    """Restore the optimizer in place; returns (progress, generator RNG state)."""
    state = _read_state(run_dir)
    tensors = load_file(str(run_dir / CHECKPOINT_DIR / "optimizer.safetensors"))
    rng_state = tensors.pop("rng_state")
    opt_state: dict[str, Any] = {"state": {}, "param_groups": state["param_groups"]}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        opt_state["state"].setdefault(int(idx), {})[name] = value
    for key, value in state["optimizer_scalars"].items():
        idx, name = key.split(".", 1)
        opt_state["state"].setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict(opt_state)
    return Progress.from_json(state["progress"]), rng_state
