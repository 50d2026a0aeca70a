"""Losses for training SSIU, registered in BasicSR's ``LOSS_REGISTRY`` when this package is imported.

* :class:`FFTLoss`: L1 on the real FFT, the frequency term of the published recipe.
* :class:`SSIMUnfoldingLoss`: ``1 - SSIM`` on the output and optionally on each unfolding step.
* :class:`MoELoadBalancingLoss`: balance of the MoE feature selector's experts.
"""
# BasicSR's compatibility fixes before the losses import basicsr; ssiu_arch.models imports this package back to
# register it, and the registration then finishes here.
import ssiu_arch.models  # noqa: F401

from .fft_loss import FFTLoss
from .moe_loss import MoELoadBalancingLoss
from .ssim_loss import SSIMUnfoldingLoss, gaussian_kernel1d, ssim

__all__ = ['FFTLoss', 'MoELoadBalancingLoss', 'SSIMUnfoldingLoss', 'gaussian_kernel1d', 'ssim']
