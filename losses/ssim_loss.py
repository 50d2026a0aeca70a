"""Differentiable SSIM and the structural-similarity training objective of the SSIU unfolding.

SSIU (Ni et al., IEEE TIP 2025) unfolds an SR objective constrained by structural similarity; here
that constraint is a loss, ``1 - SSIM``, on the final output and optionally on the reconstruction of
each unfolding step fed to the MoE feature selector (``SSIU(..., return_aux=True)[1]['step_outputs']``).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from basicsr.utils import rgb2ycbcr_pt
from basicsr.utils.registry import LOSS_REGISTRY
from torch import nn

from .loss_util import check_image_pair, check_reduction, reduce

__all__ = ['SSIMUnfoldingLoss', 'gaussian_kernel1d', 'ssim']


def gaussian_kernel1d(window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Normalised 1-D Gaussian of ``window_size`` taps (float64), as ``cv2.getGaussianKernel``."""
    coords = torch.arange(window_size, dtype=torch.float64) - (window_size - 1) / 2
    kernel = torch.exp(-coords.square() / (2 * sigma**2))
    return kernel / kernel.sum()


# BasicSR's calculate_ssim_pt has the same definition but runs a dense 11x11 window in float64 and
# returns only per-image means; as a training loss we want the separable window in the input dtype.
def ssim(
    img: torch.Tensor,
    img2: torch.Tensor,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
    data_range: float = 1.0,
    y_channel: bool = False,
    float64: bool = False,
) -> torch.Tensor:
    """Per-image SSIM (N,) of two (N, C, H, W) batches in ``[0, data_range]``, differentiable.

    The definition of Wang et al. (2004) as in BasicSR's ``calculate_ssim`` / MATLAB ``ssim_index``:
    Gaussian window (``window_size`` taps, ``sigma``), constants ``(k1 L)^2`` and ``(k2 L)^2`` with
    ``L = data_range``, 'valid' filtering (no padding), averaged over positions and channels.

    Args:
        y_channel: compare the BT.601 luma of RGB inputs (BasicSR's ``rgb2ycbcr`` with ``y_only``,
            ``Y = (65.481 R + 128.553 G + 24.966 B) / 255 + 16 / 255``); one-channel inputs are used
            as they are, as BasicSR's metric does. Default: False.
        float64: compute in float64 (otherwise in the input dtype, half precision upcast to float32).
            Default: False.
    """
    check_image_pair(img, img2, 'ssim')
    if img.shape[-2] < window_size or img.shape[-1] < window_size:
        raise ValueError(f'ssim: images of {img.shape[-2]}x{img.shape[-1]} are smaller than the '
                         f'{window_size}x{window_size} window')
    if y_channel and img.shape[1] == 3:
        img, img2 = rgb2ycbcr_pt(img, y_only=True), rgb2ycbcr_pt(img2, y_only=True)
    elif y_channel and img.shape[1] != 1:
        raise ValueError(f'ssim: y_channel needs RGB or one-channel images, got {img.shape[1]} channels')
    dtype = torch.float64 if float64 else torch.promote_types(img.dtype, torch.float32)
    x, y = img.to(dtype), img2.to(dtype)
    channels = x.shape[1]
    kernel = gaussian_kernel1d(window_size, sigma).to(dtype=dtype, device=x.device)
    groups = 5 * channels
    # One grouped separable filter over the five local statistics: E[x], E[y], E[x^2], E[y^2], E[xy].
    moments = torch.cat([x, y, x * x, y * y, x * y], dim=1)
    moments = F.conv2d(moments, kernel.view(1, 1, -1, 1).expand(groups, 1, -1, 1), groups=groups)
    moments = F.conv2d(moments, kernel.view(1, 1, 1, -1).expand(groups, 1, 1, -1), groups=groups)
    mu_x, mu_y, e_xx, e_yy, e_xy = moments.split(channels, dim=1)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    ssim_map = ((2 * mu_xy + c1) * (2 * (e_xy - mu_xy) + c2)) / (
        (mu_xx + mu_yy + c1) * ((e_xx - mu_xx) + (e_yy - mu_yy) + c2))
    return ssim_map.mean(dim=(1, 2, 3))


@LOSS_REGISTRY.register()
class SSIMUnfoldingLoss(nn.Module):
    """``1 - SSIM`` of the output and, optionally, of the unfolding steps' reconstructions.

    ``loss = loss_weight * [(1 - SSIM(pred, gt)) + sum_k step_weights[k] * (1 - SSIM(step_outputs[k], gt))]``
    per image, then reduced over the batch. SSIM is :func:`ssim` (Gaussian window 11, sigma 1.5,
    K1 0.01, K2 0.03, valid filtering, data range 1 by default).

    Args:
        loss_weight: multiplier of the loss. Default: 1.0.
        reduction: ``'none'`` (one value per image, shape (N,)), ``'mean'`` or ``'sum'`` over the batch.
            Default: ``'mean'``.
        step_weights: weight of each step reconstruction, in the order of ``step_outputs`` (for SSIU:
            its three MoE expert steps); 0 leaves a step out. Default: None, the final output only.
        y_channel: SSIM of the BT.601 luma instead of the mean over RGB channels. Default: False.
        window_size, sigma, k1, k2, data_range: SSIM parameters. Defaults: 11, 1.5, 0.01, 0.03, 1.0.
        float64: compute SSIM in float64. Default: False.
    """

    def __init__(
        self,
        loss_weight: float = 1.0,
        reduction: str = 'mean',
        step_weights: Sequence[float] | None = None,
        y_channel: bool = False,
        window_size: int = 11,
        sigma: float = 1.5,
        k1: float = 0.01,
        k2: float = 0.03,
        data_range: float = 1.0,
        float64: bool = False,
    ) -> None:
        super().__init__()
        self.loss_weight = loss_weight
        self.reduction = check_reduction(reduction)
        self.step_weights = [float(w) for w in step_weights] if step_weights else []
        if any(w < 0 for w in self.step_weights):
            raise ValueError(f'SSIMUnfoldingLoss: step_weights must be >= 0, got {self.step_weights}')
        self.ssim_kwargs = dict(window_size=window_size, sigma=sigma, k1=k1, k2=k2, data_range=data_range,
                                y_channel=y_channel, float64=float64)

    def forward(
        self,
        pred: torch.Tensor,
        target: torch.Tensor,
        step_outputs: Sequence[torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """``pred``, ``target``: (N, C, H, W); ``step_outputs``: images of the same shape, one per step weight."""
        terms = [(1.0, pred)]
        if self.step_weights:
            if step_outputs is None or len(step_outputs) != len(self.step_weights):
                got = 'none' if step_outputs is None else len(step_outputs)
                raise ValueError(f'SSIMUnfoldingLoss: {len(self.step_weights)} step_weights need as many '
                                 f'step_outputs, got {got} (call the network with return_aux=True)')
            terms += [(w, out) for w, out in zip(self.step_weights, step_outputs) if w > 0]
        loss = sum(w * (1 - ssim(out, target, **self.ssim_kwargs)) for w, out in terms)
        loss = loss.to(torch.promote_types(pred.dtype, torch.float32))
        return self.loss_weight * reduce(loss, self.reduction)
