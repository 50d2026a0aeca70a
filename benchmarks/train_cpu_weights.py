"""Train the CPU model-zoo weights on the CPU and package them with their sha256.

``--run x2`` / ``x4``: full-width SSIU (64 features, 9 steps), 1,000 iterations
(``options/train_SSIU_x{2,4}_cpu1k.yml``); ``--run demo``: the embedded demo (``options/demo_SSIU_x2.yml``).
Each is ``basicsr train -opt <option file>``, run as a user runs it: the 14 Set14 HR images shipped in
``tests/data`` (LR made on the fly by MATLAB bicubic), validated on Set5, never trained on. The last checkpoint
is then written to ``benchmarks/weights/`` (``params`` and the ``network_g`` options, BasicSR's layout), its
sha256 recorded in ``benchmarks/weights/SHA256SUMS``, and its Set5/Set14 PSNR/SSIM (Y channel, crop border =
scale) printed. Set14 is the training set: its figures are not a held-out result.

These weights are far from the published DF2K training (hundreds of GPU hours); they exist so that
low-precision inference, export and outside tools are measured on trained weights rather than random ones.

    python benchmarks/train_cpu_weights.py --run x2 [--threads 2] [--package-only]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT / 'benchmarks' / 'weights'
SUMS = WEIGHTS / 'SHA256SUMS'
# run -> (option file, experiment name, scale, zoo file)
RUNS = {'x2': ('train_SSIU_x2_cpu1k.yml', 'SSIU_x2_cpu1k', 2, 'SSIU_x2_cpu1k.pth'),
        'x4': ('train_SSIU_x4_cpu1k.yml', 'SSIU_x4_cpu1k', 4, 'SSIU_x4_cpu1k.pth'),
        'demo': ('demo_SSIU_x2.yml', 'demo_SSIU_x2', 2, 'SSIU_x2_demo.pth')}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


def record_sum(path: Path) -> str:
    """Write ``path``'s sha256 into SHA256SUMS (``sha256sum -c`` format), replacing its earlier line."""
    from ssiu_arch.utils.fileio import write_text_atomic

    digest = sha256(path)
    lines = [line for line in (SUMS.read_text().splitlines() if SUMS.exists() else [])
             if not line.endswith(f'  {path.name}')]
    write_text_atomic(SUMS, '\n'.join(sorted([*lines, f'{digest}  {path.name}'], key=lambda s: s[66:])) + '\n')
    return digest


def train(run: str, threads: int) -> Path:
    """Run the option file's training; returns its last checkpoint."""
    option = ROOT / 'options' / RUNS[run][0]
    env = {**os.environ, 'OMP_NUM_THREADS': str(threads)}
    subprocess.run([sys.executable, '-m', 'ssiu_arch.tools.train', '-opt', str(option)], cwd=ROOT, env=env,
                   check=True)
    return checkpoint(run)


def checkpoint(run: str) -> Path:
    path = ROOT / 'experiments' / RUNS[run][1] / 'models' / 'net_g_latest.pth'
    if not path.is_file():
        sys.exit(f'{path}: no such checkpoint; train first (without --package-only)')
    return path


def package(run: str, source: Path) -> Path:
    """The checkpoint as a zoo file (params + network_g options), its sha256 recorded."""
    from ssiu_arch.utils.weights import read_checkpoint, save_weights

    state, options = read_checkpoint(source)
    out = WEIGHTS / RUNS[run][3]
    out.parent.mkdir(parents=True, exist_ok=True)
    save_weights(out, state, options)
    print(f'{out.relative_to(ROOT)}: sha256 {record_sum(out)}, {out.stat().st_size / 2 ** 20:.2f} MiB')
    return out


def evaluate(path: Path, scale: int) -> None:
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    from bench_precision_quality import compare_precisions

    from ssiu_arch.utils.weights import load_ssiu

    figures = compare_precisions(load_ssiu(path), scale, precisions=('fp32',))
    for dataset, by_precision in figures.items():
        row = by_precision['fp32']
        note = ' (the training images)' if dataset == 'Set14' else ''
        print(f'{dataset} x{scale}: {row["psnr"]:.2f} dB / {row["ssim"]:.4f}{note}')


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--run', choices=sorted(RUNS), required=True)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--package-only', action='store_true', help='package the finished run without training')
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    source = checkpoint(args.run) if args.package_only else train(args.run, args.threads)
    evaluate(package(args.run, source), RUNS[args.run][2])


if __name__ == '__main__':
    main()
