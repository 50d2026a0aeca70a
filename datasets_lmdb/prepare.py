"""Training-set preparation as BasicSR's ``scripts/data_preparation`` does it: sub-images and bicubic LR.

* :func:`extract_subimages`: crop HR images (and their LR) into overlapping sub-images, BasicSR's
  ``extract_subimages.py`` convention (480 crop, 240 step, threshold 0 for HR; LR divided by the scale).
* :func:`make_lr`: MATLAB-exact bicubic LR (``imresize(HR, 1/s, 'bicubic')`` on the HR cropped to a
  multiple of ``s``), named ``<name>x{s}.png`` like the DIV2K and benchmark LR folders.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
from ssiu_arch.datasets_lmdb.files import (
    DataPrepError,
    check_compress_level,
    encode_png,
    list_images,
    parallel_map,
    read_image,
    split_scale_suffix,
    write_atomic,
)
from ssiu_arch.datasets_lmdb.imresize import imresize

from ssiu_arch.utils.fileio import remove_stale_temporaries


def crop_positions(length: int, crop_size: int, step: int, thresh_size: int = 0) -> list[int]:
    """Start offsets of crops along one axis: every ``step``, plus one flush with the end if the remainder
    exceeds ``thresh_size`` (BasicSR's rule). Empty if ``length < crop_size``."""
    if length < crop_size:
        return []
    positions = list(range(0, length - crop_size + 1, step))
    if length - (positions[-1] + crop_size) > thresh_size:
        positions.append(length - crop_size)
    return positions


def mod_crop(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop the bottom/right so that height and width are multiples of ``scale`` (BasicSR's ``mod_crop``)."""
    h, w = img.shape[:2]
    return img[:h - h % scale, :w - w % scale]


def find_lq_files(lq_folder: str | os.PathLike, scale: int) -> dict[str, Path]:
    """LR files of ``lq_folder`` by HR name: ``0001x2.png`` and ``0001.png`` both stand for HR ``0001``."""
    found: dict[str, Path] = {}
    for path in list_images(lq_folder):
        name = split_scale_suffix(path.name.split('.')[0], scale)
        if name in found:
            raise DataPrepError(f'{path}: same image name as {found[name].name} once the x{scale} suffix is dropped')
        found[name] = path
    return found


def _extract_one(job: tuple[Path, Path | None], out_hr: Path, out_lq: Path | None, scale: int, crop_size: int,
                 step: int, thresh_size: int, compress_level: int) -> int:
    hr_path, lq_path = job
    name = hr_path.name.split('.')[0]
    hr = read_image(hr_path)
    lq = None
    if lq_path is not None:
        lq = read_image(lq_path)
        h, w = hr.shape[:2]
        if lq.shape[:2] != (h // scale, w // scale):
            raise DataPrepError(f'{lq_path}: size {lq.shape[1]}x{lq.shape[0]} is not that of {hr_path.name} '
                                f'({w}x{h}) divided by {scale}; was it made at another scale?')
        hr = mod_crop(hr, scale)  # the LR of an HR that is not a multiple of the scale covers its mod-crop
    rows = crop_positions(hr.shape[0], crop_size, step, thresh_size)
    cols = crop_positions(hr.shape[1], crop_size, step, thresh_size)
    if not rows or not cols:
        raise DataPrepError(f'{hr_path}: {hr.shape[1]}x{hr.shape[0]} is smaller than the {crop_size}x{crop_size} '
                            'crop (lower --crop-size or remove the image)')
    index = 0
    for top in rows:
        for left in cols:
            index += 1
            sub_name = f'{name}_s{index:03d}.png'
            patch = hr[top:top + crop_size, left:left + crop_size]
            write_atomic(out_hr / sub_name, encode_png(patch, compress_level, str(hr_path)))
            if lq is not None:
                t, lft, size = top // scale, left // scale, crop_size // scale
                patch = lq[t:t + size, lft:lft + size]
                write_atomic(out_lq / sub_name, encode_png(patch, compress_level, str(lq_path)))
    return index


def extract_subimages(hr_folder: str | os.PathLike, out_hr: str | os.PathLike,
                      lq_folder: str | os.PathLike | None = None, out_lq: str | os.PathLike | None = None,
                      scale: int = 1, crop_size: int = 480, step: int = 240, thresh_size: int = 0,
                      compress_level: int = 3, workers: int = 1, progress: bool = True) -> int:
    """Crop every HR image of ``hr_folder`` into ``crop_size`` sub-images every ``step`` pixels.

    Sub-images are PNGs named ``<name>_s001.png``, ``_s002``... row by row. With ``lq_folder`` (LR named
    ``<name>x{scale}.png`` or ``<name>.png``), the matching LR sub-images go to ``out_lq`` under the same names
    (so that LR and HR LMDB keys agree), cropped at the HR positions divided by ``scale``; an HR image whose
    size is not a multiple of ``scale`` is cropped at the bottom/right to ``scale`` times its LR first.
    Existing files of the same name are replaced, and temporary files that killed runs left in the output
    folders are removed. Returns the number of HR sub-images written.
    """
    if (lq_folder is None) != (out_lq is None):
        raise DataPrepError('give both the LR input folder and the LR output folder, or neither')
    for option, value in (('crop_size', crop_size), ('step', step)):
        if value <= 0 or value % scale:
            raise DataPrepError(f'--{option.replace("_", "-")} {value} must be a positive multiple of the '
                                f'scale {scale} so that LR crops fall on whole pixels')
    if thresh_size < 0:
        raise DataPrepError(f'--thresh-size {thresh_size} must be >= 0')
    check_compress_level(compress_level)
    hr_paths = list_images(hr_folder)
    out_hr = Path(out_hr)
    jobs: list[tuple[Path, Path | None]] = [(p, None) for p in hr_paths]
    if lq_folder is not None:
        lq_files = find_lq_files(lq_folder, scale)
        missing = [p.name for p in hr_paths if p.name.split('.')[0] not in lq_files]
        if missing:
            raise DataPrepError(f'{lq_folder}: no LR image (<name>x{scale} or <name>) for {len(missing)} HR '
                                f'image(s) of {hr_folder}: {", ".join(missing[:5])}')
        jobs = [(p, lq_files[p.name.split('.')[0]]) for p in hr_paths]
        out_lq = Path(out_lq)
        out_lq.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_lq)
    out_hr.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_hr)
    worker = functools.partial(_extract_one, out_hr=out_hr, out_lq=out_lq, scale=scale, crop_size=crop_size,
                               step=step, thresh_size=thresh_size, compress_level=compress_level)
    return sum(parallel_map(worker, jobs, len(jobs), workers, desc='extract', progress=progress, ordered=False))


def _make_lr_one(hr_path: Path, out_dirs: dict[int, Path], compress_level: int) -> None:
    hr = read_image(hr_path)
    name = hr_path.name.split('.')[0]
    for scale, out_dir in out_dirs.items():
        hr_crop = mod_crop(hr, scale)
        if min(hr_crop.shape[:2]) == 0:
            raise DataPrepError(f'{hr_path}: {hr.shape[1]}x{hr.shape[0]} is smaller than the scale {scale}')
        lr = imresize(hr_crop, 1 / scale)
        write_atomic(out_dir / f'{name}x{scale}.png', encode_png(lr, compress_level, str(hr_path)))


def make_lr(hr_folder: str | os.PathLike, out_folder: str | os.PathLike, scales: tuple[int, ...] = (2, 3, 4),
            compress_level: int = 3, workers: int = 1, progress: bool = True) -> int:
    """Write ``out_folder/X{s}/<name>x{s}.png`` = MATLAB ``imresize(modcrop(HR, s), 1/s, 'bicubic')`` per scale.

    8- and 16-bit, grayscale, colour and alpha images keep their type and channels. Existing files of the
    same name are replaced, and temporary files that killed runs left in the output folders are removed.
    Returns the number of HR images processed.
    """
    if not scales or any(int(s) != s or s < 2 for s in scales):
        raise DataPrepError(f'--scale {list(scales)}: scales must be integers >= 2')
    check_compress_level(compress_level)
    hr_paths = list_images(hr_folder)
    out_dirs = {int(s): Path(out_folder) / f'X{int(s)}' for s in scales}
    for out_dir in out_dirs.values():
        out_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_dir)
    worker = functools.partial(_make_lr_one, out_dirs=out_dirs, compress_level=compress_level)
    for _ in parallel_map(worker, hr_paths, len(hr_paths), workers, desc='make-lr', progress=progress,
                          ordered=False):
        pass
    return len(hr_paths)
