"""The bicubic baseline, measured as BasicSR's validation measures a network.

8-bit BGR images read as BasicSR's ``imfrombytes`` reads them (grayscale expanded to three channels, as
``PairedImageDataset`` reads them), LR upscaled by MATLAB-compatible bicubic ``imresize``, HR cropped to LR
size x s, ``basicsr.metrics.calculate_psnr`` / ``calculate_ssim`` on the Y channel (BT.601, 16-235) with
``crop_border = s``. Results are metrics documents (:mod:`ssiu_arch.evaluation.metrics_schema`).
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ssiu_arch.evaluation.datasets import DATASETS, benchmark_pairs
from ssiu_arch.evaluation.errors import ResultsError
from ssiu_arch.evaluation.metrics_schema import make_metrics
from ssiu_arch.evaluation.published_ssim import published_ssim
from ssiu_arch.evaluation.table import Entry, entries_from_results
from ssiu_arch.utils import images
from ssiu_arch.utils.images import to_bgr8


def read_image(path: Path) -> np.ndarray:
    """8-bit BGR HxWx3 image, as BasicSR's ``imfrombytes`` decodes it for validation (:func:`to_bgr8`)."""
    try:
        return to_bgr8(images.read_image(path))
    except images.ImageError as err:
        raise ResultsError(str(err)) from None


def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB ``imresize(lr, s, 'bicubic')`` of an 8-bit image (the resize of ``ssiu lmdb make-lr``)."""
    from ssiu_arch.datasets_lmdb.imresize import imresize  # the package registers a BasicSR dataset

    return imresize(lr, scale)


def evaluate_bicubic(root: str | os.PathLike, scale: int, datasets: Sequence[str] = DATASETS,
                     with_published_ssim: bool = False) -> dict[str, dict]:
    """Bicubic baseline of each set under an EDSR-style ``root``, as metrics documents.

    Each LR image is upscaled by :func:`bicubic_upscale` and compared with its HR image cropped to LR size x
    ``scale`` by BasicSR's ``calculate_psnr`` / ``calculate_ssim`` (Y channel, ``crop_border = scale``).
    ``with_published_ssim`` adds ``ssim_ssiu_code`` (:func:`published_ssim`) per image and to the mean.
    A missing dataset folder, HR or LR folder, or an HR image without its LR image raises
    :class:`ResultsError` naming the path.
    """
    import ssiu_arch.models  # noqa: F401  (compatibility fixes before basicsr is imported)
    # isort: split
    from basicsr.metrics import calculate_psnr, calculate_ssim

    pairs = {dataset: benchmark_pairs(root, dataset, scale) for dataset in datasets}
    out = {}
    for dataset, items in pairs.items():
        images = []
        for name, hr_path, lr_path in items:
            lr = read_image(lr_path)
            hr = read_image(hr_path)[:lr.shape[0] * scale, :lr.shape[1] * scale]
            sr = bicubic_upscale(lr, scale)
            if sr.shape != hr.shape:
                raise ResultsError(f'{hr_path}: HR {hr.shape[:2]} is smaller than {lr_path} x{scale}')
            image = {'name': name,
                     'psnr': float(calculate_psnr(sr, hr, crop_border=scale, test_y_channel=True)),
                     'ssim': float(calculate_ssim(sr, hr, crop_border=scale, test_y_channel=True))}
            if with_published_ssim:
                image['ssim_ssiu_code'] = published_ssim(sr, hr, crop_border=scale)
            images.append(image)
        keys = [k for k in images[0] if k != 'name']
        out[dataset] = make_metrics(name='Bicubic', model='bicubic', scale=scale, dataset=dataset,
                                    crop_border=scale, test_y_channel=True, iter=None, metrics=['psnr', 'ssim'],
                                    images=images, mean={k: float(np.mean([img[k] for img in images])) for k in keys},
                                    origin=str(Path(root) / dataset))
    return out


def entry_from_bicubic(results: dict[str, dict], root: str | os.PathLike) -> Entry:
    """The bicubic row of one scale from :func:`evaluate_bicubic` documents."""
    (scale,) = {doc['scale'] for doc in results.values()}
    entry = entries_from_results([(str(root), doc) for doc in results.values()], kind='bicubic')[0]
    entry.method = 'Bicubic'
    entry.scale = scale
    entry.source = (f'measured here: MATLAB-compatible bicubic upscaling of the LR images under {root}, '
                    "BasicSR's calculate_psnr/calculate_ssim (Y channel, crop_border = scale)")
    return entry
