"""HR-only training set whose LR is MATLAB bicubic made on the fly (DF2K without stored LR copies)."""
from __future__ import annotations

import random

import numpy as np
from basicsr.data.data_util import paths_from_folder, paths_from_lmdb
from basicsr.data.transforms import augment, mod_crop
from basicsr.utils import FileClient, bgr2ycbcr, get_root_logger, imfrombytes, img2tensor
from basicsr.utils.registry import DATASET_REGISTRY
from ssiu_arch.datasets_lmdb.imresize import imresize
from torch.utils import data
from torchvision.transforms.functional import normalize

#: LR pixels kept around a patch before downscaling: the antialiased bicubic reaches 2 LR pixels away.
CROP_MARGIN = 2


def random_crop_and_downscale(img_gt: np.ndarray, gt_size: int, scale: int, gt_path: str = '',
                              margin: int = CROP_MARGIN) -> tuple[np.ndarray, np.ndarray]:
    """Random ``gt_size`` HR patch and its bicubic LR, equal to the same crop of ``imresize(img_gt, 1 / scale)``.

    ``img_gt`` (HxWxC, height and width multiples of ``scale``) is not downscaled whole: the LR patch
    position is drawn as ``paired_random_crop`` draws it (``random.randint`` for top, then left), the HR
    region under the patch plus ``margin`` LR pixels on each side is downscaled, and the margin dropped.
    This is exact, not an approximation: LR pixel ``j`` is a weighted sum of HR pixels within ``2 * scale``
    of its centre, i.e. of HR rows/columns ``scale * (j - 2)`` to ``scale * (j + 3)``, with weights that
    depend only on the position modulo ``scale``. The margin of 2 LR pixels therefore holds every HR
    pixel the patch needs, and only the dropped margin sees the mirrored region border; where the region
    touches the image border, it mirrors exactly as the whole image does. Each pass is rounded per pixel,
    so the 8-bit result equals the whole-image one bit for bit.
    """
    if gt_size % scale:
        raise ValueError(f'gt_size {gt_size} must be a multiple of scale {scale}')
    lq_size = gt_size // scale
    h_lq, w_lq = img_gt.shape[0] // scale, img_gt.shape[1] // scale
    if h_lq < lq_size or w_lq < lq_size:
        raise ValueError(f'{gt_path}: HR {img_gt.shape[1]}x{img_gt.shape[0]} is smaller than gt_size {gt_size}; '
                         'remove it from the training set')
    top = random.randint(0, h_lq - lq_size)
    left = random.randint(0, w_lq - lq_size)
    t0, l0 = max(top - margin, 0), max(left - margin, 0)
    t1, l1 = min(top + lq_size + margin, h_lq), min(left + lq_size + margin, w_lq)
    region_lq = imresize(img_gt[t0 * scale:t1 * scale, l0 * scale:l1 * scale], 1 / scale)
    img_lq = region_lq[top - t0:top - t0 + lq_size, left - l0:left - l0 + lq_size]
    # a copy: BasicSR's augment flips in place, and img_gt may be a cached image
    img_gt = img_gt[top * scale:(top + lq_size) * scale, left * scale:(left + lq_size) * scale].copy()
    return img_gt, img_lq


@DATASET_REGISTRY.register()
class HROnlyBicubicDataset(data.Dataset):
    """HR images (LMDB or folder) paired with their MATLAB-bicubic LR computed on the fly.

    A drop-in for ``PairedImageDataset`` when only HR is stored: same options (``dataroot_gt``,
    ``io_backend``, ``meta_info_file``, ``gt_size``, ``use_hflip``, ``use_rot``, ``scale``, ``phase``,
    ``color``, ``mean``, ``std``; ``dataroot_lq`` and ``filename_tmpl`` are accepted and ignored) and the
    same output ``{'lq', 'gt', 'lq_path', 'gt_path'}`` (``lq_path`` is the HR path: the LR has no file).

    HR is mod-cropped to a multiple of ``scale`` and the LR made from it in 8 bit with
    :func:`~ssiu_arch.datasets_lmdb.imresize.imresize`, so it is the LR that ``ssiu lmdb make-lr`` (and
    MATLAB) would have stored. Training crops first and downscales only the patch (exact, see
    :func:`random_crop_and_downscale`), drawing the same random numbers as ``PairedImageDataset``.

    ``cache_decoded: true`` keeps every decoded HR image in memory (in each loader worker) after its first
    read. For a small training set, such as the demo's 14 images, decoding a whole PNG for each 64x64
    patch costs about as much CPU as the training step itself (14 ms an image here); for DF2K-sized sets
    leave it off.
    """

    def __init__(self, opt: dict):
        super().__init__()
        self.opt = opt
        self.file_client = None
        self.io_backend_opt = dict(opt['io_backend'])
        self.mean = opt.get('mean')
        self.std = opt.get('std')
        self.gt_folder = opt['dataroot_gt']
        self.cache = {} if opt.get('cache_decoded', False) else None
        if opt.get('dataroot_lq') is not None:
            get_root_logger().warning(f'{type(self).__name__}: dataroot_lq {opt["dataroot_lq"]} is ignored, '
                                      'LR images are made from dataroot_gt')
        if self.io_backend_opt['type'] == 'lmdb':
            self.io_backend_opt['db_paths'] = [self.gt_folder]
            self.io_backend_opt['client_keys'] = ['gt']
            self.paths = paths_from_lmdb(self.gt_folder)
        elif opt.get('meta_info_file') is not None:
            with open(opt['meta_info_file']) as fin:
                names = [line.strip().split(' ')[0] for line in fin if line.strip()]
            self.paths = [f'{self.gt_folder}/{name}' for name in names]
        else:
            self.paths = sorted(paths_from_folder(self.gt_folder))

    def __getitem__(self, index: int) -> dict:
        if self.file_client is None:
            self.file_client = FileClient(self.io_backend_opt.pop('type'), **self.io_backend_opt)
        scale = self.opt['scale']
        gt_path = self.paths[index]
        img_gt = self.cache.get(gt_path) if self.cache is not None else None
        if img_gt is None:
            img_gt = self._read(gt_path, scale)
            if self.cache is not None:
                self.cache[gt_path] = img_gt
        if self.opt['phase'] == 'train':
            img_gt, img_lq = random_crop_and_downscale(img_gt, self.opt['gt_size'], scale, gt_path)
            img_gt, img_lq = augment([img_gt, img_lq], self.opt['use_hflip'], self.opt['use_rot'])
        else:
            img_lq = imresize(img_gt, 1 / scale)
        img_gt = img_gt.astype(np.float32) / 255.
        img_lq = img_lq.astype(np.float32) / 255.
        if self.opt.get('color') == 'y':
            img_gt = bgr2ycbcr(img_gt, y_only=True)[..., None]
            img_lq = bgr2ycbcr(img_lq, y_only=True)[..., None]
        img_gt, img_lq = img2tensor([img_gt, img_lq], bgr2rgb=True, float32=True)
        if self.mean is not None or self.std is not None:
            normalize(img_lq, self.mean, self.std, inplace=True)
            normalize(img_gt, self.mean, self.std, inplace=True)
        return {'lq': img_lq, 'gt': img_gt, 'lq_path': gt_path, 'gt_path': gt_path}

    def _read(self, gt_path: str, scale: int) -> np.ndarray:
        """The HR image at ``gt_path``, mod-cropped to a multiple of ``scale``."""
        img_bytes = self.file_client.get(gt_path, 'gt')
        img_gt = imfrombytes(img_bytes, float32=False) if img_bytes else None
        if img_gt is None:
            raise ValueError(f'{gt_path}: not a readable image (empty, truncated or corrupt)')
        return mod_crop(img_gt, scale)

    def __len__(self) -> int:
        return len(self.paths)
