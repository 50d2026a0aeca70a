"""Quality of low-precision inference against float32: Set5/Set14 PSNR and SSIM per precision.

For each weights file, every LR image of the sets is super-resolved whole (no tiling) in fp32, bf16 and,
on CUDA, fp16 (``upscale_image(..., precision=...)``, run as asked even where ``ssiu infer`` would fall
back), and scored as the results tables are: BasicSR's ``calculate_psnr`` / ``calculate_ssim`` on the Y
channel with ``crop_border = scale``. Printed per set: the fp32 means, the change of each lower precision,
and the share of 8-bit output values (pixels x channels) that differ from fp32 by more than one level.
Random weights prove nothing here: pass trained weights.

    python benchmarks/bench_precision_quality.py --weights SSIU_x2.pth SSIU_x4.pth [--device cuda]
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ssiu_arch.evaluation.bicubic import read_image
from ssiu_arch.evaluation.datasets import benchmark_pairs
from ssiu_arch.tools.common import load_weights_or_exit
from ssiu_arch.tools.infer import upscale_image
from ssiu_arch.utils.weights import infer_config

ROOT = Path(__file__).resolve().parents[1] / 'tests' / 'data' / 'benchmark'


def compare_precisions(net: nn.Module, scale: int, root: str | os.PathLike = ROOT,
                       datasets: Sequence[str] = ('Set5', 'Set14'), precisions: Sequence[str] = ('fp32', 'bf16'),
                       device: str = 'cpu', limit: int | None = None) -> dict[str, dict[str, dict[str, float]]]:
    """``{dataset: {precision: {'psnr', 'ssim', 'beyond_one_level'}}}``: means over the first ``limit`` images.

    ``beyond_one_level`` is the share of output values differing from the fp32 output by more than 1 (0 for
    fp32 itself). ``precisions`` must start with ``fp32``.
    """
    import ssiu_arch.models  # noqa: F401  (compatibility fixes before basicsr is imported)
    # isort: split
    from basicsr.metrics import calculate_psnr, calculate_ssim

    if precisions[0] != 'fp32':
        raise ValueError(f'precisions {precisions}: fp32 comes first (the reference)')
    net = net.eval().to(device)
    out = {}
    for dataset in datasets:
        sums = {p: np.zeros(3) for p in precisions}
        pairs = benchmark_pairs(root, dataset, scale)[:limit]
        for _, hr_path, lr_path in pairs:
            lr = read_image(lr_path)
            hr = read_image(hr_path)[:lr.shape[0] * scale, :lr.shape[1] * scale]
            reference = None
            for precision in precisions:
                sr = upscale_image(net, lr, scale, tile=0, device=device, precision=precision)
                reference = sr if reference is None else reference
                beyond = np.mean(np.abs(sr.astype(np.int16) - reference.astype(np.int16)) > 1)
                sums[precision] += (calculate_psnr(sr, hr, crop_border=scale, test_y_channel=True),
                                    calculate_ssim(sr, hr, crop_border=scale, test_y_channel=True), beyond)
        out[dataset] = {p: dict(zip(('psnr', 'ssim', 'beyond_one_level'), (s / len(pairs)).tolist()))
                        for p, s in sums.items()}
    return out


def format_rows(name: str, scale: int, results: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    """Table lines: per set and precision, PSNR/SSIM, their change against fp32, the share beyond one level."""
    lines = []
    for dataset, by_precision in results.items():
        ref = by_precision['fp32']
        for precision, m in by_precision.items():
            lines.append(f'{name:<24} x{scale}  {dataset:<6} {precision:<5} {m["psnr"]:8.4f} {m["ssim"]:8.5f} '
                         f'{m["psnr"] - ref["psnr"]:+9.4f} {m["ssim"] - ref["ssim"]:+10.6f} '
                         f'{100 * m["beyond_one_level"]:9.4f}%')
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--weights', nargs='+', required=True, help='SSIU checkpoints (BasicSR or published)')
    parser.add_argument('--root', default=str(ROOT), help='EDSR-style benchmark root (default: the shipped sets)')
    parser.add_argument('--datasets', nargs='+', default=['Set5', 'Set14'])
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--limit', type=int, help='first N images of each set only')
    args = parser.parse_args(argv)
    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('bench_precision_quality: --device cuda requested but CUDA is not available')
    precisions = ('fp32', 'bf16', 'fp16') if args.device == 'cuda' else ('fp32', 'bf16')
    print(f'device {args.device}; fp16 {"included" if args.device == "cuda" else "skipped (CUDA only)"}')
    print(f'{"weights":<24} scale set    prec      PSNR     SSIM     dPSNR      dSSIM  >1 level')
    for path in args.weights:
        net = load_weights_or_exit(path, 'bench_precision_quality')
        scale = infer_config(net.state_dict())['upscale']
        results = compare_precisions(net, scale, args.root, args.datasets, precisions, args.device, args.limit)
        print('\n'.join(format_rows(Path(path).name, scale, results)), flush=True)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
