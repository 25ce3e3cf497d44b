"""One optimisation step on a triplet batch, shared by the trainer and the benchmarks."""

from __future__ import annotations

from typing import Any

import torch

from casd_core import distributed

BRANCHES = ("anchor", "positive", "negative")


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """What training's forward passes autocast to (``None``: float32 throughout).

    ``auto`` is float16 on CUDA (with a gradient scaler) and float32 elsewhere; ``bf16`` is
    bfloat16 on any device, with no scaler (it has float32's range). On this 2-core AVX-512
    BF16 CPU, bfloat16 steps are no faster than float32 ones (0.83-1.01x,
    ``benchmarks/bench_training.py --alternatives``), hence float32 there by default."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and device.type == "cuda":
        return torch.float16
    return None


def _average_loss_gradients(loss_fn: torch.nn.Module) -> None:
    """Average the loss module's gradients (the learnable α) over the ranks, in one
    all-reduce: DDP averages the model's, but α lives in the loss, outside DDP, and must stay
    the same number on every rank."""
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    if not params:
        return
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    flat = distributed.all_reduce(flat, "mean")
    for p, grad in zip(params, flat.split([p.numel() for p in params])):
        p.grad = grad.view_as(p).clone()


def training_step(model: torch.nn.Module, loss_fn: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler, batch: dict[str, torch.Tensor],
                  device: torch.device, progress: float = 0.0,
                  precision: str = "auto") -> tuple[Any, torch.Tensor, torch.Tensor]:
    """One optimisation step on a triplet batch; returns the loss output and the anchors'
    logits and embeddings (detached), which feed the confusion/centroid negative mining.
    ``progress`` (the fraction of the run's steps done before this one) goes to the loss, for
    a scheduled distillation weight; ``precision`` is :func:`autocast_dtype`'s.

    The branches present in ``batch`` go through the network as one concatenated batch:
    one forward pass is faster than three and the weights are shared anyway. Under a process
    group ``model`` is the DDP wrapper and the loss's gradients are averaged here.
    """
    dtype = autocast_dtype(precision, device)
    branches = [k for k in BRANCHES if k in batch]
    images = torch.cat([batch[k] for k in branches]).to(device, non_blocking=True)
    labels = [batch[f"{k}_label"].to(device, non_blocking=True) for k in branches]
    # no layout change here: the model's own (channels_last where faster) is what convolutions follow
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits, features = model(images, return_features=True)
    chunks = logits.float().chunk(len(branches))
    partners = dict(zip(("z2", "y2", "z3", "y3"),
                        [t for pair in zip(chunks[1:], labels[1:]) for t in pair]))
    out = loss_fn(chunks[0], labels[0], **partners, progress=progress)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(out.total).backward()
    if distributed.is_distributed():
        _average_loss_gradients(loss_fn)
    scaler.step(optimizer)
    scaler.update()
    return out, chunks[0].detach(), features[: len(labels[0])].detach()
