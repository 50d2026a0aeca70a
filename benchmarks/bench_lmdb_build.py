"""Speed of ``ssiu lmdb build`` on 480x480 sub-images, and of the HR-only dataset that downscales on the fly.

Sub-images are cut (random positions and flips) from the Set5/Set14 HR images upscaled x2 (x3 if needed)
with the MATLAB bicubic and written as PNG level 3 like ``ssiu lmdb extract``, into a temporary folder.
Prints wall-clock images/s for each worker count, and the CPU time per image (this process and its
workers): on a shared machine the wall clock depends on the other jobs, the CPU time does not. PNG
compression levels are compared on the first ``--level-count`` images.

    python benchmarks/bench_lmdb_build.py [--count 1000] [--workers 1 2] [--levels 1 3 9]
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import random
import resource
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from ssiu_arch.datasets_lmdb import HROnlyBicubicDataset, build_lmdb, imresize, scan_image_set
from ssiu_arch.datasets_lmdb.files import worker_cpu_seconds

import ssiu_arch.models  # noqa: F401  (registers the datasets)

BENCHMARK = Path(__file__).resolve().parents[1] / 'tests' / 'data' / 'benchmark'


def make_subimages(folder: Path, count: int, size: int = 480, seed: int = 0) -> None:
    rng = random.Random(seed)
    sources = []
    for path in sorted(BENCHMARK.glob('*/HR/*.png')):
        img = cv2.imread(str(path), cv2.IMREAD_COLOR)
        sources.append(imresize(img, max(2, math.ceil(size / min(img.shape[:2])))))
    for index in range(count):
        img = sources[index % len(sources)]
        top, left = rng.randint(0, img.shape[0] - size), rng.randint(0, img.shape[1] - size)
        patch = img[top:top + size, left:left + size]
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        cv2.imwrite(str(folder / f'{index:05d}_s001.png'), np.ascontiguousarray(patch),
                    [cv2.IMWRITE_PNG_COMPRESSION, 3])


def _cpu_seconds() -> float:
    """CPU time of this process, of its finished children and of the build's worker processes (forkserver
    children, counted by the tool itself)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime + worker_cpu_seconds()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--count', type=int, default=1000, help='sub-images to build (default 1000)')
    parser.add_argument('--workers', type=int, nargs='+', default=[1, 2], help='worker counts (default 1 2)')
    parser.add_argument('--levels', type=int, nargs='+', default=[1, 3, 9],
                        help='PNG compression levels to compare at the largest worker count (default 1 3 9)')
    parser.add_argument('--level-count', type=int, default=200, help='images for the level comparison (default 200)')
    parser.add_argument('--samples', type=int, default=200, help='HR-only dataset samples to time (default 200)')
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder = tmp / 'sub'
        folder.mkdir()
        start = time.perf_counter()
        make_subimages(folder, args.count)
        source_mb = sum(p.stat().st_size for p in folder.iterdir()) / 2 ** 20
        print(f'{args.count} sub-images 480x480 (PNG level 3, {source_mb:.0f} MB) generated in '
              f'{time.perf_counter() - start:.1f} s')

        subset = tmp / 'subset'
        subset.mkdir()
        for path in sorted(folder.iterdir())[:args.level_count]:
            os.link(path, subset / path.name)
        runs = [(folder, w, 1) for w in args.workers] + [(subset, max(args.workers), lvl) for lvl in args.levels]
        for source, workers, level in runs:
            count = len(list(source.iterdir()))
            out = tmp / f'{source.name}_w{workers}_l{level}.lmdb'
            cpu = _cpu_seconds()
            start = time.perf_counter()
            build_lmdb(source, out, compress_level=level, workers=workers, progress=False)
            elapsed = time.perf_counter() - start
            cpu = _cpu_seconds() - cpu
            size_mb = (out / 'data.mdb').stat().st_size / 2 ** 20
            print(f'build {count:5d} images workers={workers} level={level}: {elapsed:6.1f} s  '
                  f'{count / elapsed:6.1f} images/s  {1000 * cpu / count:5.1f} CPU-ms/image  '
                  f'data.mdb {size_mb:4.0f} MB')
            if source is subset:
                shutil.rmtree(out)

        out = tmp / f'sub_w{max(args.workers)}_l1.lmdb'
        cpu = _cpu_seconds()
        start = time.perf_counter()
        scanned = scan_image_set(out, workers=max(args.workers), progress=False)
        elapsed = time.perf_counter() - start
        cpu = _cpu_seconds() - cpu
        assert not scanned.problems, scanned.problems[:3]
        print(f'verify {args.count} images workers={max(args.workers)}: {elapsed:6.1f} s  '
              f'{args.count / elapsed:6.1f} images/s  {1000 * cpu / args.count:5.1f} CPU-ms/image')

        for scale in (2, 4):
            dataset = HROnlyBicubicDataset({'dataroot_gt': str(out), 'io_backend': {'type': 'lmdb'}, 'scale': scale,
                                            'phase': 'train', 'gt_size': 48 * scale, 'use_hflip': True,
                                            'use_rot': True})
            cpu = time.process_time()
            start = time.perf_counter()
            for index in range(args.samples):
                dataset[index % len(dataset)]
            elapsed = time.perf_counter() - start
            cpu = time.process_time() - cpu
            print(f'HROnlyBicubicDataset x{scale} gt_size {48 * scale}: {args.samples / elapsed:6.1f} samples/s  '
                  f'{1000 * cpu / args.samples:5.1f} CPU-ms/sample (one loader worker)')
            del dataset
            gc.collect()  # closes the LMDB: py-lmdb opens a path once per process


if __name__ == '__main__':
    main()
