"""The CPU-trained model-zoo weights in benchmarks/weights: their checksums, loading, and low-precision quality.

The bfloat16 limits are the precision targets against float32 on trained weights (random weights prove
nothing about rounding): Set5/Set14 PSNR change at most 0.01 dB, SSIM change at most 0.0002, measured here
over the first images of each set with the metric code of the results tables.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch

from ssiu_arch.archs.ssiu_arch import SSIU
from ssiu_arch.utils.weights import load_ssiu, read_checkpoint

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / 'benchmarks' / 'weights'
BENCHMARK = ROOT / 'tests' / 'data' / 'benchmark'
ZOO = {'SSIU_x2_cpu1k.pth': (2, 64, 9), 'SSIU_x4_cpu1k.pth': (4, 64, 9), 'SSIU_x2_demo.pth': (2, 64, 3)}
PSNR_LIMIT, SSIM_LIMIT = 0.01, 0.0002

sys.path.insert(0, str(ROOT / 'benchmarks'))
from bench_precision_quality import compare_precisions  # noqa: E402


def bicubic_psnr(dataset: str, scale: int, limit: int) -> float:
    """Mean PSNR (Y, crop border = scale) of MATLAB bicubic upscaling over the first ``limit`` images."""
    import ssiu_arch.models  # noqa: F401  (compatibility fixes before basicsr is imported)
    # isort: split
    from basicsr.metrics import calculate_psnr

    from ssiu_arch.evaluation.bicubic import bicubic_upscale, read_image
    from ssiu_arch.evaluation.datasets import benchmark_pairs

    scores = []
    for _, hr_path, lr_path in benchmark_pairs(BENCHMARK, dataset, scale)[:limit]:
        lr = read_image(lr_path)
        hr = read_image(hr_path)[:lr.shape[0] * scale, :lr.shape[1] * scale]
        scores.append(calculate_psnr(bicubic_upscale(lr, scale), hr, crop_border=scale, test_y_channel=True))
    return sum(scores) / len(scores)


def listed_sums() -> dict[str, str]:
    lines = (WEIGHTS / 'SHA256SUMS').read_text().splitlines()
    return {name: digest for digest, name in (line.split('  ', 1) for line in lines if line.strip())}


def test_every_zoo_file_is_listed_with_its_sha256():
    sums = listed_sums()
    assert sorted(sums) == sorted(ZOO) == sorted(p.name for p in WEIGHTS.glob('*.pth'))
    for name, digest in sums.items():
        assert hashlib.sha256((WEIGHTS / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize('name', sorted(ZOO))
def test_zoo_weights_load_strict_with_their_options(name):
    scale, width, steps = ZOO[name]
    state, options = read_checkpoint(WEIGHTS / name)
    assert options['type'] == 'SSIU' and options['upscale'] == scale
    net = load_ssiu(WEIGHTS / name)
    assert isinstance(net, SSIU) and net.upscale == scale
    assert net.head.out_channels == width and len(net.body) == steps
    assert all(torch.isfinite(t).all() for t in state.values())


@pytest.mark.parametrize('name', sorted(ZOO))
def test_bf16_quality_matches_fp32_on_trained_weights(name):
    scale = ZOO[name][0]
    net = load_ssiu(WEIGHTS / name)
    figures = compare_precisions(net, scale, precisions=('fp32', 'bf16'), limit=2)
    for dataset, by_precision in figures.items():
        fp32, bf16 = by_precision['fp32'], by_precision['bf16']
        assert fp32['psnr'] > bicubic_psnr(dataset, scale, 2) + 0.5, (name, dataset, fp32)  # trained weights
        assert abs(bf16['psnr'] - fp32['psnr']) <= PSNR_LIMIT, (name, dataset, fp32, bf16)
        assert abs(bf16['ssim'] - fp32['ssim']) <= SSIM_LIMIT, (name, dataset, fp32, bf16)
        assert 0 <= bf16['beyond_one_level'] < 0.01, (name, dataset, bf16)
