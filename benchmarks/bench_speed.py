"""CPU speed of SSIU: params, multiply-adds, latency, peak memory and efficiency, plus a training step.

Inference cases are the ~1280x720-output inputs of the lightweight-SR literature (x2 640x360, x3 426x240,
x4 320x180), each measured in a fresh process by :mod:`ssiu_arch.tools.bench` (the code behind ``ssiu bench``),
with glibc malloc left at its defaults and tuned to retain freed memory. ``--maps compare`` times each case
twice, with whole feature maps and with 8 MiB row bands (by default SSIU's CPU inference engine chooses: bands above
32 MiB maps, above 128 MiB where freed memory is retained; ``ssiu_arch.cpu.engine.ENGINE``).
Each inference case also times ``--precision bf16`` passes interleaved with the float32 ones in the same process
(bfloat16 CPU autocast through the engine's bfloat16 kernels, or the float32 fallback on a CPU where bfloat16
products are not faster): the bf16 latency and the median bf16/fp32 ratio of the pairs, printed side by side,
against the targets of at most 0.5 at x4 320x180 and x2 640x360. For scale, on a CPU with native bfloat16 it also prints
the bfloat16/float32 rate of oneDNN's own matrix products (``torch.mm``) of a 2048 square and of the network's
shape (a 320x192 map of 64 channels times 64x64): the latency ratio that products alone could reach. The training
step is one forward + backward of an x2 batch of 8 LR patches of 64x64.

    python benchmarks/bench_speed.py [--threads 2] [--runs 5] [--malloc both|retain|default] [--maps auto|compare]
"""
from __future__ import annotations

import argparse

import torch

from ssiu_arch.cpu import kernels
from ssiu_arch.tools.bench import (
    DEFAULT_INPUTS,
    format_rows,
    load_average,
    machine_description,
    matmul_rate,
    run_case,
)
from ssiu_arch.utils.cpu_features import native_bf16

# Largest bf16/fp32 latency ratio aimed at on a CPU with native bfloat16, per (scale, LR input height, width).
BF16_TARGETS = {(4, 180, 320): 0.5, (2, 360, 640): 0.5}
# (m, k, n) of the matrix products timed for scale: a 2048 square, and a 64 -> 64 1x1 convolution of a 320x192 map.
PRODUCT_SHAPES = {'2048x2048x2048': (2048, 2048, 2048), '61440x64x64': (320 * 192, 64, 64)}


def product_rates(threads: int) -> str:
    """oneDNN's float32 and bfloat16 matrix-product rates on this CPU, one line."""
    torch.set_num_threads(threads)
    parts = []
    for name, shape in PRODUCT_SHAPES.items():
        fp32, bf16 = (matmul_rate(shape=shape, repeats=5, dtype=dtype) for dtype in (torch.float32, torch.bfloat16))
        parts.append(f'{name}: fp32 {fp32 / 1e9:.0f}, bf16 {bf16 / 1e9:.0f} G multiply-adds/s (bf16/fp32 time '
                     f'{fp32 / bf16:.2f})')
    return 'torch.mm on this CPU, ' + '; '.join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--runs', type=int, default=5, help='timed passes per case after the first')
    parser.add_argument('--malloc', choices=('both', 'retain', 'default'), default='both')
    parser.add_argument('--maps', choices=('auto', 'compare'), default='auto',
                        help="the SSIU engine's own choice of whole maps or row bands, or both timed (compare)")
    args = parser.parse_args()
    modes = {'both': (True, False), 'retain': (True,), 'default': (False,)}[args.malloc]
    maps = ('whole', 'bands') if args.maps == 'compare' else ('auto',)

    print(f'machine: {machine_description()}; torch {torch.__version__}; threads {args.threads}')
    print(kernels.status_line())
    if native_bf16():
        print(product_rates(args.threads))
    print(f'load average at start: {load_average()}', flush=True)
    rows = []
    for retain in modes:
        for scale, input_hw in DEFAULT_INPUTS.items():
            for choice in maps:
                rows.append(run_case('inference', arch='SSIU', scale=scale, input_hw=input_hw, threads=args.threads,
                                     runs=args.runs, retain_memory=retain, maps=choice, bf16=True))
                print(format_rows(rows[-1:]).splitlines()[-1], f'(load {load_average()})', flush=True)
    print()
    print(format_rows(rows))
    print('MACs(G) are for a 1280x720 output; efficiency = multiply-adds/s of the pass on its input divided by '
          'those of a float32 2048x2048 matmul in the same process; bf16/fp32 = median latency ratio of '
          'interleaved pairs.')
    for r in rows:
        width, height = (int(v) for v in r['input'].split('x'))
        target = BF16_TARGETS.get((r['scale'], height, width))
        if target is not None:
            print(f'bf16/fp32 x{r["scale"]} {r["input"]} (malloc {r["malloc"]}, maps {r["maps"]}): '
                  f'{r["bf16_ratio"]:.3f}, target <= {target} (bf16 ran as {r["bf16_runs"]})')
    for retain in modes:
        step = run_case('training', arch='SSIU', scale=2, batch=8, size=64, threads=args.threads, runs=args.runs,
                        retain_memory=retain)
        print(f'training step x2, batch {step["batch"]} forward + backward: {step["train_step_ms"]:.1f} ms '
              f'(malloc {"retain" if retain else "default"})')
    print(f'load average at end: {load_average()}')


if __name__ == '__main__':
    main()
