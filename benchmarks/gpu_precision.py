"""fp32, fp16 and bf16 SSIU inference on one CUDA GPU: latency, peak memory, finite outputs, PSNR against fp32.

For x2 and x4, the input is Set14 ``lenna`` resized to the LR size of a 1280x720 output (640x360, 320x180),
run whole under ``torch.autocast`` (fp16/bf16) as ``ssiu infer --precision`` does. Latency is the median of
``--repeats`` synchronised runs after two warm-up runs; peak memory is ``torch.cuda.max_memory_allocated``
over one run; "PSNR vs fp32" compares each precision's output (clamped to [0, 1]) with the fp32 output.
Then, per precision, Set5 and Set14 PSNR/SSIM against HR (Y channel, crop border = scale, the results
tables' metric code) and their change against fp32: the target is at most 0.05 dB.

The weights are the shipped CPU-trained zoo files (``benchmarks/weights/SSIU_x{2,4}_cpu1k.pth``) unless
``--weights`` names others; ``--random`` times the full-width network with random weights instead (latency
and memory hold, PSNR only shows that the precision runs). From a fresh checkout, environment included:

    RUN=benchmarks/gpu_precision.py bash benchmarks/cuda_check.sh [--weights A.pth B.pth] [--repeats 20]
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from bench_precision_quality import compare_precisions, format_rows
from torch import nn

from ssiu_arch.archs.ssiu_arch import SSIU
from ssiu_arch.tools.common import load_weights_or_exit
from ssiu_arch.tools.precision import autocast
from ssiu_arch.utils.weights import infer_config

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT / 'tests' / 'data' / 'benchmark' / 'Set14' / 'HR' / 'lenna.png'
ZOO = [str(ROOT / 'benchmarks' / 'weights' / f'SSIU_x{s}_cpu1k.pth') for s in (2, 4)]
OUTPUT_HW = (720, 1280)
PRECISIONS = ('fp32', 'fp16', 'bf16')


def require_cuda() -> torch.device:
    """The CUDA device, or ``SystemExit`` with one line saying why not."""
    if not torch.cuda.is_available():
        build = f'torch {torch.__version__}' + ('' if torch.version.cuda else ', a build without CUDA')
        raise SystemExit(f'gpu_precision: needs a CUDA GPU; none is available ({build})')
    return torch.device('cuda')


def lr_size(scale: int, output_hw: tuple[int, int] = OUTPUT_HW) -> tuple[int, int]:
    """(height, width) of the LR input whose x``scale`` output is ``output_hw``."""
    if output_hw[0] % scale or output_hw[1] % scale:
        raise ValueError(f'output {output_hw} is not a multiple of x{scale}')
    return output_hw[0] // scale, output_hw[1] // scale


def sample_input(scale: int, image: Path = IMAGE) -> torch.Tensor:
    """(1, 3, h, w) RGB float32 in [0, 1]: ``image`` resized (area) to the LR size for ``scale``."""
    h, w = lr_size(scale)
    bgr = cv2.imread(str(image), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f'gpu_precision: {image}: not a readable image')
    rgb = cv2.resize(bgr, (w, h), interpolation=cv2.INTER_AREA)[..., ::-1]
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)).astype(np.float32) / 255)[None]


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of ``a`` against ``b`` (peak 1, both clamped to [0, 1]); inf when equal."""
    mse = torch.mean((a.double().clamp(0, 1) - b.double().clamp(0, 1)) ** 2).item()
    return float('inf') if mse == 0 else -10 * np.log10(mse)


def measure(net: nn.Module, x: torch.Tensor, precision: str, repeats: int) -> tuple[float, float, torch.Tensor]:
    """(median latency in ms, peak memory in MiB, float32 output on the CPU) of ``net(x)`` in ``precision``."""
    def run() -> torch.Tensor:
        with torch.inference_mode(), autocast(precision, x.device):
            return net(x)

    for _ in range(2):
        run()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    out = run().float().cpu()
    peak = torch.cuda.max_memory_allocated() / 2 ** 20
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times), peak, out


def networks(weights: list[str] | None) -> list[tuple[str, int, nn.Module]]:
    """(label, scale, network) per weights file, or (None) the random full-width x2 and x4 networks."""
    if weights is None:
        torch.manual_seed(0)
        return [(f'random x{s}', s, SSIU(upscale=s)) for s in (2, 4)]
    nets = []
    for path in weights:
        net = load_weights_or_exit(path, 'gpu_precision')
        nets.append((Path(path).name, infer_config(net.state_dict())['upscale'], net))
    return nets


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--weights', nargs='+', default=ZOO, help='SSIU checkpoints (default: the shipped zoo)')
    parser.add_argument('--random', action='store_true', help='random full-width x2 and x4 networks instead')
    parser.add_argument('--repeats', type=int, default=20, help='timed runs per case (default: %(default)s)')
    args = parser.parse_args(argv)
    device = require_cuda()
    print(f'{torch.cuda.get_device_name(device)}, torch {torch.__version__}, CUDA {torch.version.cuda}')
    if args.random:
        print('note: random weights: latency and memory hold, PSNR only shows the precision runs')
    print(f'{"network":<20} {"prec":<5} {"input":>8} {"latency ms":>11} {"peak MiB":>9} {"finite":>6} '
          f'{"PSNR vs fp32":>13}')
    quality = []
    for label, scale, net in networks(None if args.random else args.weights):
        net = net.eval().to(device)
        x = sample_input(scale).to(device)
        reference = None
        for precision in PRECISIONS:
            size = f'{x.shape[3]}x{x.shape[2]}'
            if precision == 'bf16' and not torch.cuda.is_bf16_supported(including_emulation=False):
                print(f'{label:<20} {precision:<5} {size:>8}  skipped: this GPU has no native bfloat16')
                continue
            latency, peak, out = measure(net, x, precision, args.repeats)
            reference = out if reference is None else reference
            finite = bool(torch.isfinite(out).all())
            versus = f'{psnr(out, reference):13.2f}' if finite else f'{"-":>13}'
            print(f'{label:<20} {precision:<5} {size:>8} {latency:11.2f} {peak:9.1f} {str(finite):>6} {versus}',
                  flush=True)
        if not args.random:
            quality.append((label, scale, net))
    for label, scale, net in quality:
        precisions = [p for p in PRECISIONS if p != 'bf16' or torch.cuda.is_bf16_supported(including_emulation=False)]
        results = compare_precisions(net, scale, precisions=precisions, device='cuda')
        print('\n'.join(format_rows(label, scale, results)), flush=True)
        worst = max(abs(m['psnr'] - by['fp32']['psnr']) for by in results.values() for m in by.values())
        print(f'{label}: largest PSNR change against fp32 {worst:.4f} dB '
              f'({"within" if worst <= 0.05 else "ABOVE"} the 0.05 dB target)')
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
