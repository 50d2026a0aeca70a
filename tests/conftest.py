"""Shared fixtures: paths to test data and the published reference forward passes."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import ssiu_arch.models  # noqa: F401  (compatibility fixes and registration before any basicsr import)

DATA = Path(__file__).parent / 'data'
REFERENCES = sorted(DATA.glob('ssiu_official_*.pt'))


@pytest.fixture(scope='session')
def data_dir() -> Path:
    return DATA


def load_reference(path: Path) -> dict:
    return torch.load(path, weights_only=True)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield
