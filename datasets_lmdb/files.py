"""Image files for the data preparation tools: listing, keys, decoding with clear errors, atomic writes."""
from __future__ import annotations

import itertools
import multiprocessing
import os
import re
import signal
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from ssiu_arch.utils import images
from ssiu_arch.utils.fileio import write_bytes_atomic

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp', '.ppm', '.pgm')
_SCALE_SUFFIX = re.compile(r'^(.*)x(\d+)$')
_worker_cpu_seconds = 0.0  # see worker_cpu_seconds()


class DataPrepError(ValueError):
    """Bad input or output of a data preparation step; the message names the file or option at fault."""


def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files directly inside ``folder`` (hidden files skipped), sorted by name.

    Entries with an image extension that are not regular files (broken symbolic links, FIFOs) are listed
    too, so that reading them fails with their name instead of their being left out without a word.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataPrepError(f'{folder}: no such folder')
    paths = sorted(p for p in folder.iterdir()
                   if not p.is_dir() and not p.name.startswith('.') and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not paths:
        raise DataPrepError(f'{folder}: no image files ({", ".join(IMAGE_EXTENSIONS)})')
    return paths


def image_key(path: str | os.PathLike, strip_suffix: str = '') -> str:
    """BasicSR's LMDB key of an image file: its name up to the first dot, minus ``strip_suffix`` if it ends so.

    Keys must be ASCII without whitespace: BasicSR encodes them as ASCII and splits ``meta_info.txt`` lines
    on spaces and on the first dot.
    """
    name = Path(path).name
    key = name.split('.')[0]
    if strip_suffix and key.endswith(strip_suffix) and len(key) > len(strip_suffix):
        key = key[:-len(strip_suffix)]
    if not key or not key.isascii() or any(ch.isspace() for ch in key):
        raise DataPrepError(f'{path}: file name gives the key {key!r}; LMDB keys must be non-empty ASCII '
                            'without spaces (rename the file)')
    return key


def split_scale_suffix(stem: str, scale: int | None = None) -> str:
    """``'0001x2'`` -> ``'0001'`` (the benchmark / DIV2K LR naming); other names are returned unchanged."""
    match = _SCALE_SUFFIX.match(stem)
    if match and (scale is None or int(match.group(2)) == scale):
        return match.group(1)
    return stem


def decode_image(data: bytes, source: str) -> np.ndarray:
    """Decode encoded image bytes with the package's reader (:mod:`ssiu_arch.utils.images`); ``source`` (file
    name or key) names the culprit. Only 8/16-bit gray, colour and colour+alpha images pass: anything PNG
    would store lossily (float or 32-bit samples) is refused rather than rounded."""
    try:
        return images.decode_image(data, source)
    except images.ImageError as err:
        raise DataPrepError(str(err)) from None


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as :func:`decode_image` does (EXIF orientation applied, grayscale kept HxW)."""
    try:
        return images.read_image(path)
    except images.ImageError as err:
        raise DataPrepError(str(err)) from None


def check_compress_level(level: int) -> None:
    """Reject a PNG compression level outside zlib's 0-9 before any work is done."""
    if not 0 <= level <= 9:
        raise DataPrepError(f'--compress-level {level}: must be 0-9')


def encode_png(img: np.ndarray, compress_level: int, source: str = 'image') -> bytes:
    """PNG bytes of ``img`` at zlib ``compress_level`` (0-9: 1 is BasicSR's LMDB default, fast to write)."""
    ok, buf = cv2.imencode('.png', img, [cv2.IMWRITE_PNG_COMPRESSION, compress_level])
    if not ok:
        raise DataPrepError(f'{source}: OpenCV could not encode a {img.dtype} image of shape {img.shape} as PNG')
    return buf.tobytes()


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a hidden temporary file beside ``path``, then rename it: never a half-written file."""
    try:
        write_bytes_atomic(path, data)
    except OSError as err:
        raise DataPrepError(f'{path}: cannot write ({err.strerror or err})') from None


def image_shape(img: np.ndarray) -> tuple[int, int, int]:
    """(h, w, c) with c = 1 for a grayscale HxW image, as written in ``meta_info.txt``."""
    return (img.shape[0], img.shape[1], 1 if img.ndim == 2 else img.shape[2])


def default_workers() -> int:
    """Worker processes used when none are given: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def _worker_context() -> multiprocessing.context.BaseContext:
    """Start method of the worker processes: forkserver where the platform has it, else spawn.

    Never a plain fork: this process runs torch's OpenMP and OpenCV's thread pools, and a child forked while
    one of their threads holds a lock can hang. The server preloads this package once, so each worker starts
    at the cost of a fork, not of importing torch again.
    """
    if 'forkserver' in multiprocessing.get_all_start_methods():
        context = multiprocessing.get_context('forkserver')
        context.set_forkserver_preload(['ssiu_arch.datasets_lmdb'])
        return context
    return multiprocessing.get_context('spawn')


def parallel_map(func: Callable, items: Iterable, total: int, workers: int = 1, desc: str = '',
                 progress: bool = True, ordered: bool = True) -> Iterator:
    """``map(func, items)`` in ``workers`` processes (in this one if 1) behind a tqdm progress bar.

    Items go to the workers in chunks (of 4 when there are many), at most ``4 * workers`` chunks in flight, so
    results wait in memory only as long as the caller takes to use them. An error in a worker is raised here
    once its item's turn comes; the items not yet started are dropped and the workers shut down before it
    propagates. ``ordered=False`` yields results as they finish.
    Workers do not fork this process (see :func:`_worker_context`), so a script that calls this with
    ``workers > 1`` needs the usual ``if __name__ == '__main__':`` guard.
    """
    bar = tqdm(total=total, desc=desc, unit='img', disable=not progress, dynamic_ncols=True)
    try:
        if workers <= 1:
            for result in map(func, items):
                bar.update()
                yield result
            return
        for result in _pooled(func, items, workers, ordered, chunk=max(1, min(4, total // (16 * workers)))):
            bar.update()
            yield result
    finally:
        bar.close()


def _pooled(func: Callable, items: Iterable, workers: int, ordered: bool, chunk: int) -> Iterator:
    # concurrent.futures rather than multiprocessing.Pool: Pool.terminate(), which leaving a ``with Pool`` block
    # on an error runs, can hang for good when it stops a worker that holds the task queue's lock.
    global _worker_cpu_seconds
    pool = ProcessPoolExecutor(workers, mp_context=_worker_context(), initializer=_ignore_interrupts)
    pending: deque[Future] = deque()
    items = iter(items)

    def submit_next() -> None:
        batch = list(itertools.islice(items, chunk))
        if batch:
            pending.append(pool.submit(_apply, func, batch))

    try:
        for _ in range(4 * workers):
            submit_next()
        while pending:
            if ordered:
                future = pending.popleft()
            else:
                future = next(iter(wait(pending, return_when=FIRST_COMPLETED).done))
                pending.remove(future)
            try:
                results, cpu = future.result()
            except BrokenProcessPool:
                raise DataPrepError('a worker process ended abruptly (killed, out of memory?); '
                                    'rerun with fewer --workers') from None
            _worker_cpu_seconds += cpu
            submit_next()
            yield from results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ignore_interrupts() -> None:
    """Workers leave Ctrl-C to the parent, which stops the pool: they would each print a traceback."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _apply(func: Callable, batch: list) -> tuple[list, float]:
    start = time.process_time()
    results = [func(item) for item in batch]
    return results, time.process_time() - start


def worker_cpu_seconds() -> float:
    """CPU seconds that :func:`parallel_map`'s worker processes have spent on items so far, in this process's
    lifetime. Forkserver children are not this process's, so its rusage does not count them."""
    return _worker_cpu_seconds
