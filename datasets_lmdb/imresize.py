"""MATLAB-compatible bicubic ``imresize`` (the resize used to make DIV2K, Flickr2K and the SR benchmarks).

MATLAB's ``imresize(A, scale, 'bicubic')`` resizes one dimension at a time, the one with the smaller
scale first (rows first on a tie). Each pass computes every output sample in double precision as a
weighted sum over ``ceil(kernel_width) + 2`` input samples (mirror-reflected at the borders, weights
normalised per output sample; when downscaling, the cubic kernel is stretched by ``1 / scale`` for
antialiasing) and then converts the result back to the class of the input: for integer images it
rounds half away from zero and saturates after *each* pass.

``basicsr.utils.matlab_functions.imresize`` computes both passes in float32 on [0, 1] and rounds once at
the end, which matches MATLAB's 8-bit output on only 86-90% of pixels; this module reproduces the
per-pass double computation and rounding, and so the published LR images, exactly.
"""
from __future__ import annotations

import math

import numpy as np

#: Width of the bicubic kernel in input samples, before stretching for antialiasing.
CUBIC_WIDTH = 4.0


def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5 (MATLAB's ``cubic``)."""
    absx = np.abs(x)
    absx2 = absx * absx
    absx3 = absx2 * absx
    inner = (1.5 * absx3 - 2.5 * absx2 + 1) * (absx <= 1)
    outer = (-0.5 * absx3 + 2.5 * absx2 - 4 * absx + 2) * ((absx > 1) & (absx <= 2))
    return inner + outer


def contributions(in_length: int, out_length: int, scale: float,
                  antialiasing: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``(out_length, P)`` and 0-based input indices ``(out_length, P)`` of one resize pass.

    Output sample ``x`` (1-based) sits at input coordinate ``u = x / scale + (1 - 1 / scale) / 2`` so that
    pixel edges line up; indices falling outside ``[1, in_length]`` are mirrored (edge sample repeated).
    Columns whose weights are zero for every output sample are dropped.
    """
    if scale < 1 and antialiasing:
        kernel_width = CUBIC_WIDTH / scale

        def kernel(x):
            return scale * cubic(scale * x)
    else:
        kernel_width = CUBIC_WIDTH
        kernel = cubic
    x = np.arange(1, out_length + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - kernel_width / 2)
    taps = int(math.ceil(kernel_width)) + 2
    indices = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]
    weights = kernel(u[:, None] - indices)
    weights = weights / weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    indices = mirror[np.mod(indices.astype(np.int64) - 1, 2 * in_length)]
    keep = np.any(weights != 0, axis=0)
    return weights[:, keep], indices[:, keep]


def _resize_axis(img: np.ndarray, axis: int, weights: np.ndarray, indices: np.ndarray) -> np.ndarray:
    """One pass along ``axis`` (0 or 1), in float64, summing taps in order as MATLAB's ``imresizemex`` does."""
    shape = list(img.shape)
    shape[axis] = weights.shape[0]
    out = np.zeros(shape, dtype=np.float64)
    expand = [None] * img.ndim
    expand[axis] = slice(None)
    for k in range(weights.shape[1]):
        out += weights[:, k][tuple(expand)] * np.take(img, indices[:, k], axis=axis)
    return out


def _to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """MATLAB's conversion from double: round half away from zero and saturate for integer classes."""
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = np.clip(values, info.min, info.max)
        return (np.sign(values) * np.floor(np.abs(values) + 0.5)).astype(dtype)
    return values.astype(dtype)


def output_size(in_size: int, scale: float) -> int:
    """MATLAB's ``ceil(scale * in_size)``, tolerant to the rounding of ``1 / s`` (``1/3 * 300`` gives 100)."""
    return int(math.ceil(in_size * scale - 1e-9))


def imresize(img: np.ndarray, scale: float, antialiasing: bool = True) -> np.ndarray:
    """Resize ``img`` (HxW or HxWxC; uint8, uint16 or float) by ``scale`` exactly like MATLAB's bicubic imresize.

    ``scale`` < 1 downscales (e.g. ``1 / 4`` for x4 LR), > 1 upscales; the output is
    ``ceil(scale * size)`` along each spatial axis. Integer images come back in their own dtype, each pass
    rounded half away from zero and saturated as MATLAB does; float images are computed in float64 and
    returned in their dtype without clipping. ``antialiasing`` (MATLAB's ``'Antialiasing'``, default True)
    only matters when downscaling.
    """
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f'imresize expects an HxW or HxWxC image, got shape {img.shape}')
    if not (np.issubdtype(img.dtype, np.integer) or np.issubdtype(img.dtype, np.floating)):
        raise TypeError(f'imresize expects an integer or float image, got dtype {img.dtype}')
    if not scale > 0:
        raise ValueError(f'scale must be positive, got {scale}')
    dtype = img.dtype
    out = img
    # MATLAB resizes the dimension with the smaller scale first; with one scale for both, rows first.
    for axis in (0, 1):
        in_length = out.shape[axis]
        out_length = output_size(img.shape[axis], scale)
        weights, indices = contributions(in_length, out_length, scale, antialiasing)
        out = _to_dtype(_resize_axis(out, axis, weights, indices), dtype)
    return out
