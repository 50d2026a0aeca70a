"""SSIM as the published SSIU evaluation computes it, re-implemented to measure how much it inflates SSIM.

For comparison with the published table only, never for reporting: :func:`published_ssim` and the size of
the inflation it measures (:data:`SSIM_INFLATION_NOTE`, printed under tables with published SSIU SSIM).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: Size of the published-SSIM inflation measured by :func:`published_ssim` against BasicSR's
#: ``calculate_ssim`` on MATLAB-bicubic outputs of Set5 / Set14 (tests/data/benchmark).
SSIM_INFLATION_NOTE = (
    'it converts [0, 1] RGB to Y with the formula for [0, 255] input (Y/255 + 16, then x255, so Y lies in '
    '4080..4299), which keeps PSNR but inflates SSIM: its luminance term becomes ~1, and its float32 Gaussian '
    'window (sum 1 - 3e-8) and float32 variances around 4300 add a bias. Re-implemented here (published_ssim) and '
    "measured against BasicSR's calculate_ssim on bicubic outputs of Set5 / Set14: +0.0014 / +0.0019 at x2, "
    '+0.0024 / +0.0030 at x3, +0.0033 / +0.0041 at x4 (the luminance term alone: +0.00003 / +0.00007, '
    '+0.0002 / +0.0003, +0.0007 / +0.0008). It also rounds averages up (+0.005 dB / +0.00005 before rounding) '
    'and its benchmark copy crops HR to a multiple of 12'
)


def published_ssim(img: np.ndarray, img2: np.ndarray, crop_border: int, dtype: type = np.float32,
                   win_size: int = 11, win_sigma: float = 1.5) -> float:
    """SSIM as the published SSIU code evaluates it: for comparison with its table, never for reporting.

    A re-implementation of that evaluation (``test.py`` with ``utils.rgb_to_ycbcr`` and
    ``pytorch_msssim.ssim`` 1.0.0): the 8-bit BGR HWC images (as BasicSR reads them) are taken to [0, 1]
    RGB, divided by 255 once more by a Y conversion meant for [0, 255] input (Y' = Y/255 + 16 with Y the
    usual 16-235 luma), cropped by ``crop_border`` and multiplied by 255, so Y lies in 4080..4299. SSIM
    then uses a ``win_size`` Gaussian window (sigma ``win_sigma``) applied by torch ``conv2d`` along H then
    W at valid positions, data range 255 and K = (0.01, 0.03), in ``dtype``: float32 as published, or
    float64, where the window is also normalised in float64. Element-wise steps run in numpy, which rounds
    them as torch does.

    The offset leaves PSNR unchanged but inflates SSIM. Against BasicSR's ``calculate_ssim`` on
    MATLAB-bicubic outputs of Set5 / Set14 it measures +0.0014 / +0.0019 at x2, +0.0024 / +0.0030 at x3 and
    +0.0033 / +0.0041 at x4 (float32, PyTorch CPU convolutions). Three causes add up: the luminance term
    becomes ~1 (alone, float64 with an exact window: +0.00003 / +0.00007, +0.0002 / +0.0003,
    +0.0007 / +0.0008); the float32 Gaussian window sums to 1 - 3e-8, which around 4300 raises every local
    variance by about 1 (with it, still float64: +0.0009 / +0.0014, +0.0018 / +0.0025, +0.0028 / +0.0036);
    float32 arithmetic adds the rest, which depends on how the convolution accumulates.
    """
    def to_y(image: np.ndarray) -> np.ndarray:
        image = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
        rgb = image[..., ::-1].transpose(2, 0, 1).astype(dtype) / dtype(255)
        rgb = rgb / dtype(255)  # the published conversion expects [0, 255] input
        y = dtype(65.481) * rgb[0] + dtype(128.553) * rgb[1] + dtype(24.966) * rgb[2] + dtype(16)
        if crop_border:
            y = y[crop_border:-crop_border, crop_border:-crop_border]
        return y * dtype(255)

    if img.shape != img2.shape:
        raise ValueError(f'image shapes differ: {img.shape} and {img2.shape}')
    x, y = to_y(img), to_y(img2)
    # The window as pytorch_msssim builds it: in float32 its sum is 1 - 3e-8, which around 4300 is not negligible.
    coords = torch.arange(win_size, dtype=torch.from_numpy(np.empty(0, dtype)).dtype) - win_size // 2
    window = torch.exp(-coords**2 / (2 * win_sigma**2))
    window = (window / window.sum()).view(1, 1, win_size, 1).expand(5, 1, win_size, 1)
    # The five filtered maps (one channel each) in one grouped pass, along H then W as pytorch_msssim.
    stats = torch.from_numpy(np.stack([x, y, x * x, y * y, x * y])[None])
    stats = F.conv2d(F.conv2d(stats, window, groups=5), window.transpose(2, 3), groups=5)
    mu1, mu2, xx, yy, xy = stats[0].numpy()
    c1, c2 = dtype((0.01 * 255)**2), dtype((0.03 * 255)**2)
    sigma1_sq = xx - mu1**2
    sigma2_sq = yy - mu2**2
    sigma12 = xy - mu1 * mu2
    cs_map = (2 * sigma12 + c2) / (sigma1_sq + sigma2_sq + c2)
    ssim_map = (2 * mu1 * mu2 + c1) / (mu1**2 + mu2**2 + c1) * cs_map
    return float(ssim_map.mean())
