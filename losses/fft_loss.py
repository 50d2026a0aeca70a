"""Frequency-domain L1 loss of the published SSIU training recipe (``L1 + 0.01 * FFT``)."""
from __future__ import annotations

import torch
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn

from .loss_util import check_image_pair, check_reduction, reduce


@LOSS_REGISTRY.register()
class FFTLoss(nn.Module):
    """L1 distance between the real and imaginary parts of ``torch.fft.rfft2`` of output and target.

    With the default ``reduction='mean'`` this equals the published SSIU ``FFTLoss`` (``patch_size=0``):
    the mean absolute difference over the stacked real and imaginary parts of the unnormalised
    ("backward") 2-D real FFT of each channel.

    Args:
        loss_weight: multiplier of the loss. Default: 1.0 (the published recipe uses 0.01 beside L1).
        reduction: ``'none'`` (element-wise, shape (N, C, H, W // 2 + 1, 2)), ``'mean'`` or ``'sum'``.
            Default: ``'mean'``.
    """

    def __init__(self, loss_weight: float = 1.0, reduction: str = 'mean') -> None:
        super().__init__()
        self.loss_weight = loss_weight
        self.reduction = check_reduction(reduction)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, **kwargs) -> torch.Tensor:
        """``pred``, ``target``: (N, C, H, W) images of one shape."""
        check_image_pair(pred, target, 'FFTLoss')
        if pred.dtype in (torch.float16, torch.bfloat16):  # half FFTs need power-of-two sides on CUDA
            pred, target = pred.float(), target.float()
        pred_fft = torch.view_as_real(torch.fft.rfft2(pred, dim=(-2, -1)))
        target_fft = torch.view_as_real(torch.fft.rfft2(target, dim=(-2, -1)))
        return self.loss_weight * reduce((pred_fft - target_fft).abs(), self.reduction)
