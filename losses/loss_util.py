"""Input checks and reductions shared by the SSIU losses (BasicSR conventions)."""
from __future__ import annotations

import torch

REDUCTIONS = ('none', 'mean', 'sum')


def check_reduction(reduction: str) -> str:
    """Return ``reduction`` if it is one of BasicSR's modes, else raise ``ValueError``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f'Unsupported reduction mode: {reduction!r}. Supported ones are: {list(REDUCTIONS)}')
    return reduction


def reduce(loss: torch.Tensor, reduction: str) -> torch.Tensor:
    """Apply ``'none'`` (identity), ``'mean'`` or ``'sum'`` to an unreduced loss."""
    if reduction == 'mean':
        return loss.mean()
    if reduction == 'sum':
        return loss.sum()
    return loss


def check_image_pair(pred: torch.Tensor, target: torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` unless ``pred`` and ``target`` are (N, C, H, W) tensors of one shape."""
    if pred.dim() != 4:
        raise ValueError(f'{name}: expected pred of shape (N, C, H, W), got {tuple(pred.shape)}')
    if pred.shape != target.shape:
        raise ValueError(f'{name}: pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}')
