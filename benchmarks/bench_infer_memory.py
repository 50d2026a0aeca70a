"""Peak memory and time of tiled ``upscale_image`` with the default SSIU on a 1920x1080 image.

Each tile size runs in a fresh child process, so its peak resident set size (``ru_maxrss``) covers
exactly one model, one image and one upscale (plus the PNG encoding ``ssiu infer`` does). The image is
Set14 ``lenna`` resized to the requested size; the weights are random, which does not change memory
or time. Also prints how close tiled and untiled results are (PSNR on a 512x512 mirror-padded Set14
``baboon``, float output) for the default tiling. Wall clock depends on the other jobs of a shared
machine; CPU time does not. ``--precision bf16`` runs as ``ssiu infer --precision bf16`` does (the CPU engine's
bfloat16 path, or float32 with a notice where the CPU lacks native bfloat16).

    python benchmarks/bench_infer_memory.py [--tile 384 256] [--tile-overlap 32] [--scale 2] [--size 1920x1080]
                                            [--precision fp32|bf16]
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from ssiu_arch.archs.ssiu_arch import SSIU
from ssiu_arch.tools.infer import DEFAULT_TILE, DEFAULT_TILE_OVERLAP, tile_spans, upscale_image
from ssiu_arch.tools.precision import resolve_precision

SET14 = Path(__file__).resolve().parents[1] / 'tests' / 'data' / 'benchmark' / 'Set14' / 'HR'


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == 'darwin' else peak / 2**10


def child(tile: int, overlap: int, scale: int, width: int, height: int, precision: str = 'fp32') -> dict:
    torch.manual_seed(0)
    net = SSIU(upscale=scale).eval()
    img = cv2.resize(cv2.imread(str(SET14 / 'lenna.png')), (width, height), interpolation=cv2.INTER_CUBIC)
    setup = peak_rss_mb()
    start, cpu = time.perf_counter(), time.process_time()
    sr = upscale_image(net, img, scale, tile=tile, tile_overlap=overlap, precision=precision)
    ok, png = cv2.imencode('.png', sr)
    assert ok and sr.shape == (height * scale, width * scale, 3)
    align = net.pad_multiple
    return {'tiles': len(tile_spans(height, tile, overlap, align)) * len(tile_spans(width, tile, overlap, align)),
            'seconds': time.perf_counter() - start, 'cpu_seconds': time.process_time() - cpu,
            'setup_mb': setup, 'peak_mb': peak_rss_mb()}


def tiled_psnr(tile: int, overlap: int, scale: int) -> float:
    """PSNR (dB) between tiled and untiled outputs of the default SSIU on a 512x512 real image."""
    torch.manual_seed(0)
    net = SSIU(upscale=scale).eval()
    img = cv2.imread(str(SET14 / 'baboon.png'))
    img = cv2.copyMakeBorder(img, 0, 512 - img.shape[0], 0, 512 - img.shape[1], cv2.BORDER_REFLECT_101)
    img = img.astype(np.float32) / 255
    whole = upscale_image(net, img, scale, tile=0)
    tiled = upscale_image(net, img, scale, tile=tile, tile_overlap=overlap)
    return float(-10 * np.log10(np.mean((tiled.astype(np.float64) - whole) ** 2)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--tile', type=int, nargs='+', default=[DEFAULT_TILE],
                        help=f'LR tile sides to measure, 0 = untiled (default {DEFAULT_TILE})')
    parser.add_argument('--tile-overlap', type=int, default=DEFAULT_TILE_OVERLAP,
                        help=f'default {DEFAULT_TILE_OVERLAP}')
    parser.add_argument('--scale', type=int, default=2, help='default 2')
    parser.add_argument('--size', default='1920x1080', help='LR WIDTHxHEIGHT (default 1920x1080)')
    parser.add_argument('--precision', choices=('fp32', 'bf16'), default='fp32', help='default fp32')
    parser.add_argument('--skip-psnr', action='store_true', help='skip the tiled-vs-untiled PSNR check')
    parser.add_argument('--child', action='store_true', help=argparse.SUPPRESS)
    args = parser.parse_args()
    width, height = map(int, args.size.lower().split('x'))
    if args.child:
        print(json.dumps(child(args.tile[0], args.tile_overlap, args.scale, width, height, args.precision)))
        return

    precision, notice = resolve_precision(args.precision, 'cpu')
    print(f'default SSIU x{args.scale}, LR {width}x{height}, tile overlap {args.tile_overlap}, '
          f'{torch.get_num_threads()} threads, precision {precision}' + (f' ({notice})' if notice else ''))
    print(f'{"tile":>6} {"tiles":>6} {"wall s":>8} {"cpu s":>8} {"setup MiB":>10} {"peak RSS MiB":>13}')
    for tile in args.tile:
        cmd = [sys.executable, __file__, '--child', '--tile', str(tile), '--tile-overlap', str(args.tile_overlap),
               '--scale', str(args.scale), '--size', args.size, '--precision', precision]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            print(f'{tile:>6} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}')
            continue
        r = json.loads(done.stdout.strip().splitlines()[-1])
        print(f'{tile:>6} {r["tiles"]:>6} {r["seconds"]:>8.1f} {r["cpu_seconds"]:>8.1f} {r["setup_mb"]:>10.0f} '
              f'{r["peak_mb"]:>13.0f}', flush=True)
    print(f'recommended default: --tile {DEFAULT_TILE} --tile-overlap {DEFAULT_TILE_OVERLAP}')
    if not args.skip_psnr:
        value = tiled_psnr(DEFAULT_TILE, DEFAULT_TILE_OVERLAP, args.scale)
        print(f'tiled (tile {DEFAULT_TILE}, overlap {DEFAULT_TILE_OVERLAP}) vs untiled on 512x512 Set14 '
              f'baboon: PSNR {value:.1f} dB')


if __name__ == '__main__':
    main()
