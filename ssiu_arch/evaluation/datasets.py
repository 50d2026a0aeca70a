"""Benchmark sets: their canonical names and their EDSR-style folders (``<Set>/HR``, ``<Set>/LR_bicubic/X<s>``)."""
from __future__ import annotations

import os
from pathlib import Path

from ssiu_arch.evaluation.errors import ResultsError

DATASETS = ('Set5', 'Set14', 'B100', 'Urban100', 'Manga109')
IMAGE_SUFFIXES = ('.png', '.bmp', '.jpg', '.jpeg', '.tif', '.tiff')

# Folder names under which the benchmarks circulate (EDSR-style roots use the first).
FOLDER_ALIASES = {'B100': ('B100', 'BSD100', 'BSDS100'), 'Urban100': ('Urban100', 'urban100'),
                  'Manga109': ('Manga109', 'manga109'), 'Set5': ('Set5', 'set5'), 'Set14': ('Set14', 'set14')}
_NAME_ALIASES = {alias.casefold(): name for name, aliases in FOLDER_ALIASES.items() for alias in aliases}
_NAME_ALIASES.update({'u100': 'Urban100', 'bsd100': 'B100', 'bsds100': 'B100'})


def canonical_dataset(name: str) -> str:
    """``Set5``, ``B100`` ... for the usual spellings (``set5``, ``BSD100``, ``u100``); other names unchanged."""
    return _NAME_ALIASES.get(str(name).casefold(), str(name))


def dataset_dir(root: str | os.PathLike, dataset: str) -> Path:
    """``root/<dataset>`` under any of its usual folder names; raise :class:`ResultsError` naming the path."""
    root = Path(root)
    for name in FOLDER_ALIASES.get(dataset, (dataset,)):
        if (root / name).is_dir():
            return root / name
    raise ResultsError(f'{root / dataset}: dataset folder not found')


def has_dataset(root: str | os.PathLike, dataset: str) -> bool:
    """Whether :func:`dataset_dir` finds ``dataset`` under ``root``."""
    try:
        dataset_dir(root, dataset)
    except ResultsError:
        return False
    return True


def benchmark_pairs(root: str | os.PathLike, dataset: str, scale: int) -> list[tuple[str, Path, Path]]:
    """``(name, hr_path, lr_path)`` of an EDSR-style set: ``HR/<name>.png``, ``LR_bicubic/X{s}/<name>x{s}.png``."""
    folder = dataset_dir(root, dataset)
    hr_dir, lr_dir = folder / 'HR', folder / 'LR_bicubic' / f'X{scale}'
    for path in (hr_dir, lr_dir):
        if not path.is_dir():
            raise ResultsError(f'{path}: folder not found (expected <Set>/HR and <Set>/LR_bicubic/X{scale})')
    hr_paths = sorted(p for p in hr_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not hr_paths:
        raise ResultsError(f'{hr_dir}: no images')
    pairs, missing = [], []
    for hr_path in hr_paths:
        lr_path = lr_dir / f'{hr_path.stem}x{scale}{hr_path.suffix}'
        (pairs if lr_path.is_file() else missing).append((hr_path.stem, hr_path, lr_path))
    if missing:
        listed = ', '.join(f'{hr.name} (expected {lr})' for _, hr, lr in missing)
        raise ResultsError(f'{lr_dir}: no LR image for {len(missing)} HR image(s): {listed}')
    return pairs
