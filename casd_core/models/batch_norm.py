"""Batch-norm running statistics after short training: when they lag the weights, and
re-estimating them."""

from __future__ import annotations

import torch
from torch import nn

# Running batch-norm statistics are an exponential average with this many steps of memory
# left at 5 % ((1 - m) ** (3 / m) ≈ e ** -3): a run with fewer steps than that evaluates on
# statistics that still mostly describe the data before it (the package's, ImageNet's).
BATCH_NORM_SETTLE_MOMENTA = 3.0


def batch_norm_lags(model: nn.Module, trainable_steps: int) -> bool:
    """Whether ``trainable_steps`` optimizer steps are too few for ``model``'s batch-norm
    running statistics to follow its weights (EfficientNet-Lite's momentum is 0.01: 300 steps)."""
    momenta = [m.momentum for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
               and m.track_running_stats and m.momentum]
    return bool(momenta) and trainable_steps < BATCH_NORM_SETTLE_MOMENTA / max(momenta)


@torch.no_grad()
def recompute_batch_norm(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device) -> None:
    """Re-estimate ``model``'s batch-norm running statistics over ``loader``'s images (the plain
    average over its batches, :func:`torch.optim.swa_utils.update_bn`), so evaluation sees the statistics
    training normalised with. A short fine-tune on new imagery otherwise evaluates on the old
    ones and can collapse to one class (measured: 100 % in train mode, 41 % in eval mode)."""
    torch.optim.swa_utils.update_bn(loader, model, device)
