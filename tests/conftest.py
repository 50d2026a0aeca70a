"""Shared fixtures and helpers: paths to test data, the published reference forward passes, Set5 training patches."""
from __future__ import annotations

from pathlib import Path

import cv2
import pytest
import torch

import ssiu_arch.models  # noqa: F401  (compatibility fixes and registration before any basicsr import)

DATA = Path(__file__).parent / 'data'
REFERENCES = sorted(DATA.glob('ssiu_official_*.pt'))
SET5 = DATA / 'benchmark' / 'Set5'


@pytest.fixture(scope='session')
def data_dir() -> Path:
    return DATA


def load_reference(path: Path) -> dict:
    return torch.load(path, weights_only=True)


def read_rgb(path: Path) -> torch.Tensor:
    """An image file as a (3, H, W) RGB float tensor in [0, 1]."""
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1].copy()
    return torch.from_numpy(img).permute(2, 0, 1).float() / 255


def training_batch(lr_size: int = 24) -> dict:
    """Two aligned real patches: Set5 X2 LR crops of ``lr_size`` and the matching HR crops."""
    lq, gt = [], []
    for name, (top, left) in (('baby', (60, 50)), ('butterfly', (40, 70))):
        lr = read_rgb(SET5 / 'LR_bicubic' / 'X2' / f'{name}x2.png')
        hr = read_rgb(SET5 / 'HR' / f'{name}.png')
        lq.append(lr[:, top:top + lr_size, left:left + lr_size])
        gt.append(hr[:, 2 * top:2 * (top + lr_size), 2 * left:2 * (left + lr_size)])
    return {'lq': torch.stack(lq), 'gt': torch.stack(gt)}


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
