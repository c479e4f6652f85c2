"""One optimizer step of contrastive training, and validation: what the loop calls per step and epoch."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from indexer.core.errors import ClipsearchError
from indexer.core.precision import autocast
from indexer.eval.metrics import RetrievalMetrics, retrieval_metrics
from indexer.train.data import random_crop_batch
from indexer.train.distributed import local_batch
from indexer.train.loss import clamp_logit_scale, contrastive_loss
from indexer.train.run import Run

EVAL_BATCH = 512


class TrainingDiverged(ClipsearchError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def batches(run: Run, epoch: int) -> Iterator[torch.Tensor]:
    """Pair indices of each micro-batch of an epoch: a fixed permutation per (seed, epoch), so resume
    can skip the batches already done."""
    perm = torch.randperm(
        run.data.train.n_pairs, generator=torch.Generator().manual_seed(run.cfg.seed * 1000 + epoch)
    )
    micro = min(run.cfg.optim.batch_size, run.data.train.n_pairs)
    size = micro * run.cfg.optim.accum_steps * run.world_size  # the global batch of one step
    for s in range(run.schedule.steps_per_epoch):
        yield local_batch(perm[s * size : (s + 1) * size], run.dist)


def _image_input(run: Run, idx: torch.Tensor) -> torch.Tensor:
    """The image side's input for the pairs `idx`: augmented pixels, or a locked trunk's cached features."""
    images = run.data.train.pair_image[idx]
    if run.data.frozen_image is not None:
        return run.data.frozen_image.train[images].to(run.device, non_blocking=True)
    pixels = run.data.pipeline.normalise(
        random_crop_batch(run.data.train.pixels[images].float(), run.optim.generator, run.cfg.crop_scale)
    )
    return pixels.to(run.device, non_blocking=True)


def _features(run: Run, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    image = _image_input(run, idx)
    if run.data.frozen_text is not None:
        text = run.data.frozen_text.train[idx].to(run.device, non_blocking=True)
    else:
        text = run.data.train.tokens[idx].to(run.device, non_blocking=True)
    with autocast(run.cfg.precision, run.device):
        image_emb, text_emb = run.towers(image, text)
    return image_emb.float(), text_emb.float()


def _loss(run: Run, image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    model = run.built.model
    bias = getattr(model, "logit_bias", None)
    return contrastive_loss(run.optim.loss_fn, image_emb, text_emb, model.logit_scale.exp(), bias)


def train_step(run: Run, idx: torch.Tensor) -> float:
    """One optimizer step over `accum_steps` micro-batches.

    With accumulation the loss is computed over the whole effective batch, as open_clip_train does:
    features of every micro-batch are first computed without gradients, then each micro-batch is run
    again with gradients and its features swapped into the full set."""
    chunks = idx.chunk(run.cfg.optim.accum_steps)
    run.optim.optimizer.zero_grad(set_to_none=True)
    if len(chunks) == 1:
        loss = _loss(run, *_features(run, idx))
        _check_finite(run, loss)
        run.optim.scaler.scale(loss).backward()
    else:
        state = run.optim.generator.get_state()
        with torch.no_grad():
            cached = [_features(run, c) for c in chunks]
        run.optim.generator.set_state(state)  # the same crops again in the gradient pass
        for j, c in enumerate(chunks):
            img, txt = _features(run, c)
            all_img = torch.cat([img if k == j else cached[k][0] for k in range(len(chunks))])
            all_txt = torch.cat([txt if k == j else cached[k][1] for k in range(len(chunks))])
            loss = _loss(run, all_img, all_txt)
            _check_finite(run, loss)
            run.optim.scaler.scale(loss).backward()
        _average_shared_grads(run.built.model, len(chunks))
    if run.cfg.optim.grad_clip > 0:
        run.optim.scaler.unscale_(run.optim.optimizer)
        torch.nn.utils.clip_grad_norm_(run.built.model.parameters(), run.cfg.optim.grad_clip)
    run.optim.scaler.step(run.optim.optimizer)
    run.optim.scaler.update()
    clamp_logit_scale(run.built.model)
    return float(loss.detach())


def _average_shared_grads(model: torch.nn.Module, n: int) -> None:
    """logit_scale/bias take part in every micro-batch's full-batch loss, so their gradient was summed n
    times; scaled back, the step equals one full-batch step (open_clip_train leaves it n times larger)."""
    for name in ("logit_scale", "logit_bias"):
        p = getattr(model, name, None)
        if isinstance(p, torch.Tensor) and p.grad is not None:
            p.grad /= n


def _check_finite(run: Run, loss: torch.Tensor) -> None:
    if not math.isfinite(float(loss.detach())):
        raise TrainingDiverged(
            f"loss became {float(loss.detach())} at step {run.progress.step}: training diverged "
            "(try a lower --lr or "
            f"--precision fp32); the last good checkpoint is kept in {run.cfg.out}"
        )


@torch.no_grad()
def validate(run: Run) -> RetrievalMetrics:
    """Retrieval metrics of the current model on the cached val set."""
    assert run.data.val is not None
    model = run.built.model
    was_training = model.training
    model.eval()
    pairs = run.data.val_pairs
    tokens = run.data.val_tokens
    with autocast(run.cfg.precision, run.device):
        if run.data.frozen_image is not None and run.data.frozen_image.val is not None:
            image_emb = run.data.frozen_image.embed(run.data.frozen_image.val.to(run.device))
        else:
            image_emb = torch.cat(
                [
                    model.encode_image(
                        run.data.pipeline.normalise(run.data.val.pixels[s : s + EVAL_BATCH]).to(run.device),
                        normalize=True,
                    )
                    for s in range(0, len(run.data.val.pixels), EVAL_BATCH)
                ]
            )
        if run.data.frozen_text is not None and run.data.frozen_text.val is not None:
            text_emb = run.data.frozen_text.embed(run.data.frozen_text.val.to(run.device))
        else:
            text_emb = torch.cat(
                [
                    model.encode_text(tokens[s : s + EVAL_BATCH].to(run.device), normalize=True)
                    for s in range(0, len(tokens), EVAL_BATCH)
                ]
            )
    model.train(was_training)
    return retrieval_metrics(image_emb.float().cpu().numpy(), text_emb.float().cpu().numpy(), pairs)
