"""HROnlyBicubicDataset: same samples as BasicSR's PairedImageDataset over stored bicubic LR."""
from __future__ import annotations

import copy
import gc
import random

import cv2
import numpy as np
import pytest
import torch
from basicsr.data import build_dataset
from basicsr.data.paired_image_dataset import PairedImageDataset
from ssiu_arch.datasets_lmdb import HROnlyBicubicDataset, build_lmdb, imresize, make_lr
from ssiu_arch.datasets_lmdb.hr_only_dataset import random_crop_and_downscale
from ssiu_arch.datasets_lmdb.prepare import mod_crop


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_patch_downscale_equals_crop_of_whole_image_downscale(scale):
    rng = np.random.default_rng(scale)
    smooth = cv2.GaussianBlur(rng.integers(0, 256, (101, 89, 3), np.uint8), (5, 5), 2)
    img = mod_crop(smooth, scale)
    whole = imresize(img, 1 / scale)
    gt_size = 12 * scale
    lq_size = gt_size // scale
    differs_without_margin = False
    for seed in range(40):
        random.seed(seed)
        top = random.randint(0, img.shape[0] // scale - lq_size)
        left = random.randint(0, img.shape[1] // scale - lq_size)
        random.seed(seed)
        gt, lq = random_crop_and_downscale(img, gt_size, scale)
        rows, cols = slice(top * scale, (top + lq_size) * scale), slice(left * scale, (left + lq_size) * scale)
        np.testing.assert_array_equal(gt, img[rows, cols])
        np.testing.assert_array_equal(lq, whole[top:top + lq_size, left:left + lq_size])
        random.seed(seed)
        _, lq0 = random_crop_and_downscale(img, gt_size, scale, margin=0)
        differs_without_margin |= not np.array_equal(lq0, lq)
    assert differs_without_margin  # the margin is what makes it exact


def _paired_opt(gt, lq, scale, phase, backend='lmdb', **extra):
    return {'name': 'x', 'type': 'PairedImageDataset', 'dataroot_gt': str(gt), 'dataroot_lq': str(lq),
            'io_backend': {'type': backend}, 'scale': scale, 'phase': phase, **extra}


@pytest.mark.parametrize('scale', [2, 3])
def test_train_samples_equal_paired_dataset_over_make_lr(data_dir, tmp_path, scale):
    hr_dir = tmp_path / 'hr'
    hr_dir.mkdir()
    for path in sorted((data_dir / 'benchmark' / 'Set14' / 'HR').glob('*.png'))[:6]:
        cv2.imwrite(str(hr_dir / path.name), mod_crop(cv2.imread(str(path), cv2.IMREAD_UNCHANGED), scale))
    make_lr(hr_dir, tmp_path / 'lr', (scale,), progress=False)
    build_lmdb(hr_dir, tmp_path / 'hr.lmdb', progress=False)
    build_lmdb(tmp_path / 'lr' / f'X{scale}', tmp_path / 'lr.lmdb', strip_suffix=f'x{scale}', progress=False)
    opt = _paired_opt(tmp_path / 'hr.lmdb', tmp_path / 'lr.lmdb', scale, 'train', gt_size=24 * scale,
                      use_hflip=True, use_rot=True, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    paired = PairedImageDataset(copy.deepcopy(opt))
    expected = {}
    for index in range(len(paired)):
        for seed in range(3):
            random.seed(seed)
            expected[index, seed] = paired[index]
    del paired
    gc.collect()  # py-lmdb opens a path once per process: close hr.lmdb before the other dataset opens it
    hr_only = build_dataset({**copy.deepcopy(opt), 'type': 'HROnlyBicubicDataset'})
    assert isinstance(hr_only, HROnlyBicubicDataset) and len(hr_only) == 6
    for (index, seed), want in expected.items():
        random.seed(seed)
        item = hr_only[index]
        assert set(item) == {'lq', 'gt', 'lq_path', 'gt_path'}
        assert item['gt_path'] == item['lq_path'] == want['gt_path']
        assert torch.equal(item['gt'], want['gt']), (index, seed)
        assert torch.equal(item['lq'], want['lq']), (index, seed)
    del hr_only
    gc.collect()


def test_val_samples_equal_published_benchmark_lr(data_dir):
    bench = data_dir / 'benchmark' / 'Set5'
    opt = _paired_opt(bench / 'HR', bench / 'LR_bicubic' / 'X4', 4, 'val', backend='disk', filename_tmpl='{}x4')
    paired = PairedImageDataset(copy.deepcopy(opt))
    hr_only = HROnlyBicubicDataset({**copy.deepcopy(opt), 'type': 'HROnlyBicubicDataset'})
    assert len(hr_only) == len(paired) == 5
    expected = {item['gt_path']: item for item in (paired[i] for i in range(5))}  # BasicSR lists folders unsorted
    for item in (hr_only[i] for i in range(5)):
        want = expected[item['gt_path']]
        assert torch.equal(item['gt'], want['gt']) and torch.equal(item['lq'], want['lq']), item['gt_path']


def test_y_channel_and_folder_meta_info(data_dir, tmp_path):
    bench = data_dir / 'benchmark' / 'Set14' / 'HR'
    meta = tmp_path / 'meta.txt'
    meta.write_text('bridge.png (512,512,1) 1\nzebra.png (391,586,3) 1\n')
    dataset = HROnlyBicubicDataset({'dataroot_gt': str(bench), 'meta_info_file': str(meta),
                                    'io_backend': {'type': 'disk'}, 'scale': 2, 'phase': 'train', 'gt_size': 64,
                                    'use_hflip': False, 'use_rot': False, 'color': 'y'})
    assert len(dataset) == 2
    item = dataset[0]
    assert item['gt_path'].endswith('bridge.png')
    assert item['gt'].shape == (1, 64, 64) and item['lq'].shape == (1, 32, 32)


def test_unreadable_hr_is_named(tmp_path):
    (tmp_path / 'ok.png').write_bytes(b'')
    dataset = HROnlyBicubicDataset({'dataroot_gt': str(tmp_path), 'io_backend': {'type': 'disk'}, 'scale': 2,
                                    'phase': 'val'})
    with pytest.raises(ValueError, match=r'ok\.png: not a readable image'):
        dataset[0]
    small = tmp_path / 'small'
    small.mkdir()
    cv2.imwrite(str(small / 'tiny.png'), np.zeros((20, 30, 3), np.uint8))
    dataset = HROnlyBicubicDataset({'dataroot_gt': str(small), 'io_backend': {'type': 'disk'}, 'scale': 2,
                                    'phase': 'train', 'gt_size': 32, 'use_hflip': True, 'use_rot': True})
    with pytest.raises(ValueError, match=r'tiny\.png: HR 30x20 is smaller than gt_size 32'):
        dataset[0]
    with pytest.raises(ValueError, match='gt_size 33 must be a multiple of scale 2'):
        random_crop_and_downscale(np.zeros((64, 64, 3), np.uint8), 33, 2)


def test_cache_decoded_gives_the_same_samples_and_stays_intact(data_dir):
    bench = data_dir / 'benchmark' / 'Set14' / 'HR'
    opt = {'dataroot_gt': str(bench), 'io_backend': {'type': 'disk'}, 'scale': 2, 'phase': 'train', 'gt_size': 64,
           'use_hflip': True, 'use_rot': True}
    plain = HROnlyBicubicDataset(copy.deepcopy(opt))
    cached = HROnlyBicubicDataset({**copy.deepcopy(opt), 'cache_decoded': True})
    for seed in range(12):  # flips and rotations in place must not reach the cached images
        for index in (0, 5):
            random.seed(seed)
            want = plain[index]
            random.seed(seed)
            got = cached[index]
            assert torch.equal(got['gt'], want['gt']) and torch.equal(got['lq'], want['lq']), (seed, index)
    assert sorted(cached.cache) == sorted(plain.paths[i] for i in (0, 5))
