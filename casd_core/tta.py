"""Test-time augmentation: the class probabilities averaged over the 8 flips and 90° rotations
of each image (the dihedral group D4). An aerial scene has no "up", so each view is as valid
an input as the original; averaging them smooths out orientation-specific mistakes, at 8x the
model's cost.
"""

from __future__ import annotations

from typing import Callable

import torch

VIEWS = 8


def dihedral_views(x: torch.Tensor) -> list[torch.Tensor]:
    """The 8 views of a batch (N, C, H, W): 4 rotations, each also mirrored left-right."""
    rotations = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
    return rotations + [torch.flip(view, dims=(3,)) for view in rotations]


def averaged_probabilities(logits_of: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                           temperature: float = 1.0, tta: bool = True) -> torch.Tensor:
    """softmax(logits / T), averaged over the dihedral views when ``tta`` (else the image only).

    ``logits_of`` maps a batch to logits; the views of a batch go through it as one batch
    (square tiles keep their shape under rotation), so batch-norm statistics and speed are
    those of one large batch.
    """
    if not tta:
        return torch.softmax(logits_of(x).float() / temperature, dim=1)
    views = dihedral_views(x) if x.shape[2] == x.shape[3] else [x, torch.flip(x, dims=(3,)),
                                                                  torch.flip(x, dims=(2,)),
                                                                  torch.flip(x, dims=(2, 3))]
    logits = logits_of(torch.cat(views)).float() / temperature
    return torch.softmax(logits, dim=1).view(len(views), x.shape[0], -1).mean(0)
