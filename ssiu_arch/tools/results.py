"""Leaderboard tables: ``ssiu results``, the measured bicubic baseline and the published-SSIM check.

Every figure measured here is computed as BasicSR computes it during validation: 8-bit BGR images read
with ``imfrombytes`` (grayscale expanded to three channels, as ``PairedImageDataset`` reads them), HR
cropped to LR size x s, ``basicsr.metrics.calculate_psnr`` / ``calculate_ssim`` on the Y channel
(BT.601, 16-235) with ``crop_border = s``.

Published numbers live in ``ssiu_arch/data/published_results.csv``: the SSIU paper's comparison table
(method, training set, scale, parameters in K, multiply-adds in G for a 1280x720 output, which that
table calls FLOPs, and PSNR/SSIM per benchmark), IDSA-Net's x4 figures, a ``source`` citation per row
and ``ssim_protocol`` (``ssiu-y-offset`` marks SSIM computed by the published SSIU evaluation, see
:func:`published_ssim`; ``reported`` is each paper's own protocol). Empty cells were not published.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.utils import imfrombytes

from ssiu_arch.datasets_lmdb.imresize import imresize
from ssiu_arch.utils.fileio import replace_atomic, write_text_atomic

DATASETS = ('Set5', 'Set14', 'B100', 'Urban100', 'Manga109')
PUBLISHED_CSV = Path(__file__).parents[1] / 'data' / 'published_results.csv'
IMAGE_SUFFIXES = ('.png', '.bmp', '.jpg', '.jpeg', '.tif', '.tiff')
RESULT_KEYS = ('name', 'model', 'scale', 'dataset', 'crop_border', 'test_y_channel', 'iter', 'metrics', 'images',
               'mean')
BENCH_KEYS = ('model', 'scale', 'params', 'macs_g')

# Folder names under which the benchmarks circulate (EDSR-style roots use the first).
_FOLDER_ALIASES = {'B100': ('B100', 'BSD100', 'BSDS100'), 'Urban100': ('Urban100', 'urban100'),
                   'Manga109': ('Manga109', 'manga109'), 'Set5': ('Set5', 'set5'), 'Set14': ('Set14', 'set14')}
_NAME_ALIASES = {alias.casefold(): name for name, aliases in _FOLDER_ALIASES.items() for alias in aliases}
_NAME_ALIASES.update({'u100': 'Urban100', 'bsd100': 'B100', 'bsds100': 'B100'})

#: Size of the published-SSIM inflation measured by :func:`published_ssim` against BasicSR's
#: ``calculate_ssim`` on MATLAB-bicubic outputs of Set5 / Set14 (tests/data/benchmark).
SSIM_INFLATION_NOTE = (
    'it converts [0, 1] RGB to Y with the formula for [0, 255] input (Y/255 + 16, then x255, so Y lies in '
    '4080..4299), which keeps PSNR but inflates SSIM: its luminance term becomes ~1, and its float32 Gaussian '
    'window (sum 1 - 3e-8) and float32 variances around 4300 add a bias. Re-implemented here (published_ssim) and '
    "measured against BasicSR's calculate_ssim on bicubic outputs of Set5 / Set14: +0.0014 / +0.0019 at x2, "
    '+0.0024 / +0.0030 at x3, +0.0033 / +0.0041 at x4 (the luminance term alone: +0.00003 / +0.00007, '
    '+0.0002 / +0.0003, +0.0007 / +0.0008). It also rounds averages up (+0.005 dB / +0.00005 before rounding) '
    'and its benchmark copy crops HR to a multiple of 12'
)


class ResultsError(ValueError):
    """A results, bench or image file that cannot be used; the message names it."""


@dataclass
class Entry:
    """One table row: a method at one scale."""

    method: str
    scale: int
    kind: str  # 'bicubic', 'published', 'measured' or 'bench'
    train_set: str = ''
    params_k: float | None = None
    macs_g: float | None = None
    psnr: dict[str, float] = field(default_factory=dict)
    ssim: dict[str, float] = field(default_factory=dict)
    ssim_protocol: str = 'basicsr'
    source: str = ''
    model: str = ''
    latency_ms: float | None = None
    peak_mem_mb: float | None = None
    marks: dict[tuple[str, str], str] = field(default_factory=dict)  # (dataset, metric) -> footnote mark


def canonical_dataset(name: str) -> str:
    """``Set5``, ``B100`` ... for the usual spellings (``set5``, ``BSD100``, ``u100``); other names unchanged."""
    return _NAME_ALIASES.get(str(name).casefold(), str(name))


def _number(value: str) -> float | None:
    return float(value) if value.strip() else None


def load_published(path: str | os.PathLike = PUBLISHED_CSV) -> list[Entry]:
    """Rows of the published-results CSV (see the module docstring for its columns)."""
    entries = []
    with open(path, encoding='utf-8', newline='') as f:
        for row in csv.DictReader(f):
            entry = Entry(method=row['method'], scale=int(row['scale']), kind='published',
                          train_set=row['train_set'], params_k=_number(row['params_k']),
                          macs_g=_number(row['macs_g']), ssim_protocol=row['ssim_protocol'],
                          source=row['source'], model=row['method'])
            for dataset in DATASETS:
                for metric, values in (('psnr', entry.psnr), ('ssim', entry.ssim)):
                    value = _number(row[f'{dataset.lower()}_{metric}'])
                    if value is not None:
                        values[dataset] = value
                        if metric == 'ssim' and entry.ssim_protocol == 'ssiu-y-offset':
                            entry.marks[(dataset, 'ssim')] = '†'
            entries.append(entry)
    return entries


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_result(result: object, origin: str, scale: int | None = None) -> dict:
    """Check one ``metrics_<dataset>.json`` document; raise :class:`ResultsError` naming ``origin``."""
    if not isinstance(result, dict):
        raise ResultsError(f'{origin}: expected a JSON object, got {type(result).__name__}')
    missing = [key for key in RESULT_KEYS if key not in result]
    if missing:
        raise ResultsError(f'{origin}: not a metrics file, missing key(s) {", ".join(missing)}')
    if not isinstance(result['scale'], int) or isinstance(result['scale'], bool) or result['scale'] < 1:
        raise ResultsError(f'{origin}: "scale" must be a positive integer, got {result["scale"]!r}')
    if scale is not None and result['scale'] != scale:
        raise ResultsError(f'{origin}: results for x{result["scale"]}, but --scale {scale} was requested')
    for key in ('name', 'model', 'dataset'):
        if not isinstance(result[key], str) or not result[key]:
            raise ResultsError(f'{origin}: "{key}" must be a non-empty string, got {result[key]!r}')
    if not _is_number(result['crop_border']) or not isinstance(result['test_y_channel'], bool):
        raise ResultsError(f'{origin}: "crop_border" must be a number and "test_y_channel" true or false')
    metrics = result['metrics']
    if not isinstance(metrics, list) or 'psnr' not in metrics:
        raise ResultsError(f'{origin}: "metrics" must be a list that includes "psnr", got {metrics!r}')
    mean = result['mean']
    if not isinstance(mean, dict) or any(not _is_number(mean.get(m)) for m in metrics if m in ('psnr', 'ssim')):
        raise ResultsError(f'{origin}: "mean" must give a number for each of {metrics}, got {mean!r}')
    images = result['images']
    if not isinstance(images, list) or not all(
            isinstance(img, dict) and isinstance(img.get('name'), str) and _is_number(img.get('psnr'))
            for img in images):
        raise ResultsError(f'{origin}: "images" must be a list of {{"name", "psnr", "ssim"}} objects')
    return result


def read_result_file(path: str | os.PathLike, scale: int | None = None) -> dict:
    """Load and check a ``metrics_<dataset>.json`` written by SSIUModel's validation."""
    try:
        with open(path, encoding='utf-8') as f:
            result = json.load(f)
    except FileNotFoundError:
        raise ResultsError(f'{path}: no such results file') from None
    except (OSError, UnicodeDecodeError) as err:
        raise ResultsError(f'{path}: cannot be read ({err})') from None
    except json.JSONDecodeError as err:
        raise ResultsError(f'{path}: not valid JSON ({err})') from None
    return validate_result(result, str(path), scale)


def entries_from_results(results: Sequence[tuple[str, dict]], kind: str = 'measured') -> list[Entry]:
    """One row per run (name, iter, scale) from validated result documents ``(origin, result)``.

    A run evaluated at several iterations gets one row per iteration, labelled ``name @iter``; two documents
    for the same run and dataset are an error naming both.
    """
    groups: dict[tuple, dict[str, tuple[str, dict]]] = {}
    for origin, result in results:
        key = (result['name'], json.dumps(result['iter']), result['scale'])
        datasets = groups.setdefault(key, {})
        dataset = canonical_dataset(result['dataset'])
        if dataset in datasets:
            raise ResultsError(f'{datasets[dataset][0]} and {origin} both hold {result["name"]} '
                               f'{dataset} x{result["scale"]} (iter {result["iter"]}); pass only one')
        datasets[dataset] = (origin, result)
    iters_per_name: dict[tuple[str, int], int] = {}
    for name, _, scale in groups:
        iters_per_name[(name, scale)] = iters_per_name.get((name, scale), 0) + 1
    entries = []
    for (name, iter_json, scale), datasets in groups.items():
        first = next(iter(datasets.values()))[1]
        label = name if iters_per_name[(name, scale)] == 1 else f'{name} @{json.loads(iter_json)}'
        entry = Entry(method=label, scale=scale, kind=kind, model=first['model'],
                      source='; '.join(origin for origin, _ in datasets.values()))
        for dataset, (_, result) in datasets.items():
            entry.psnr[dataset] = float(result['mean']['psnr'])
            if 'ssim' in result['metrics']:
                entry.ssim[dataset] = float(result['mean']['ssim'])
            if result['crop_border'] != scale or not result['test_y_channel']:
                entry.ssim_protocol = 'basicsr, non-standard crop_border/test_y_channel'
                for metric in ('psnr', 'ssim'):
                    entry.marks[(dataset, metric)] = '*'
        entries.append(entry)
    return entries


def read_bench(path: str | os.PathLike) -> list[dict]:
    """Rows written by ``ssiu bench --json``: a list of rows, ``{"rows": [...]}`` or a single row."""
    try:
        with open(path, encoding='utf-8') as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ResultsError(f'{path}: no such bench file') from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ResultsError(f'{path}: not a readable JSON bench file ({err})') from None
    rows = data.get('rows', data) if isinstance(data, dict) else data
    rows = [rows] if isinstance(rows, dict) else rows
    if not isinstance(rows, list) or not rows:
        raise ResultsError(f'{path}: expected a non-empty list of bench rows')
    seen = set()
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or any(key not in row for key in BENCH_KEYS):
            raise ResultsError(f'{path}: row {i} must be an object with keys {", ".join(BENCH_KEYS)}')
        if not isinstance(row['scale'], int) or not _is_number(row['params']) or not (
                row['macs_g'] is None or _is_number(row['macs_g'])):
            raise ResultsError(f'{path}: row {i}: "scale" must be an integer, "params" and "macs_g" numbers')
        key = (str(row['model']).casefold(), row['scale'])
        if key in seen:
            raise ResultsError(f'{path}: two rows for {row["model"]} x{row["scale"]}; keep one')
        seen.add(key)
    return rows


def merge_bench(entries: list[Entry], rows: Iterable[dict], origin: str = 'bench') -> list[Entry]:
    """Put bench figures on the measured rows of the same model and scale; unmatched rows become new rows."""
    merged = list(entries)
    for row in rows:
        model = str(row['model'])
        targets = [e for e in entries if e.kind == 'measured' and e.scale == row['scale']
                   and model.casefold() in (e.model.casefold(), e.method.casefold())]
        if not targets:
            targets = [Entry(method=model, scale=row['scale'], kind='bench', model=model)]
            merged.extend(targets)
        details = ', '.join(f'{key} {row[key]}' for key in ('input', 'threads', 'machine') if row.get(key) is not None)
        for entry in targets:
            entry.params_k = row['params'] / 1e3
            entry.macs_g = row['macs_g']
            entry.latency_ms = row.get('latency_ms')
            entry.peak_mem_mb = row.get('peak_mem_mb')
            bench_source = f'ssiu bench ({origin}{": " + details if details else ""})'
            entry.source = f'{entry.source}; {bench_source}' if entry.source else bench_source
    return merged


def dataset_dir(root: str | os.PathLike, dataset: str) -> Path:
    """``root/<dataset>`` under any of its usual folder names; raise :class:`ResultsError` naming the path."""
    root = Path(root)
    for name in _FOLDER_ALIASES.get(dataset, (dataset,)):
        if (root / name).is_dir():
            return root / name
    raise ResultsError(f'{root / dataset}: dataset folder not found')


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


def read_image(path: Path) -> np.ndarray:
    """8-bit BGR HxWx3 image, decoded as BasicSR's ``imfrombytes`` does."""
    img = imfrombytes(path.read_bytes(), flag='color')
    if img is None:
        raise ResultsError(f'{path}: not a readable image')
    return img


def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB ``imresize(lr, s, 'bicubic')`` of an 8-bit image (the resize of ``ssiu lmdb make-lr``)."""
    return imresize(lr, scale)


def evaluate_bicubic(root: str | os.PathLike, scale: int, datasets: Sequence[str] = DATASETS,
                     with_published_ssim: bool = False) -> dict[str, dict]:
    """Bicubic baseline of each set under an EDSR-style ``root``, as metrics documents (SSIUModel's schema).

    Each LR image is upscaled by :func:`bicubic_upscale` and compared with its HR image cropped to LR size x
    ``scale`` by BasicSR's ``calculate_psnr`` / ``calculate_ssim`` (Y channel, ``crop_border = scale``).
    ``with_published_ssim`` adds ``ssim_ssiu_code`` (:func:`published_ssim`) per image and to the mean.
    A missing dataset folder, HR or LR folder, or an HR image without its LR image raises
    :class:`ResultsError` naming the path.
    """
    pairs = {dataset: benchmark_pairs(root, dataset, scale) for dataset in datasets}
    out = {}
    for dataset, items in pairs.items():
        images = []
        for name, hr_path, lr_path in items:
            lr = read_image(lr_path)
            hr = read_image(hr_path)[:lr.shape[0] * scale, :lr.shape[1] * scale]
            sr = bicubic_upscale(lr, scale)
            if sr.shape != hr.shape:
                raise ResultsError(f'{hr_path}: HR {hr.shape[:2]} is smaller than {lr_path} x{scale}')
            image = {'name': name,
                     'psnr': float(calculate_psnr(sr, hr, crop_border=scale, test_y_channel=True)),
                     'ssim': float(calculate_ssim(sr, hr, crop_border=scale, test_y_channel=True))}
            if with_published_ssim:
                image['ssim_ssiu_code'] = published_ssim(sr, hr, crop_border=scale)
            images.append(image)
        keys = [k for k in images[0] if k != 'name']
        out[dataset] = {'name': 'Bicubic', 'model': 'bicubic', 'scale': scale, 'dataset': dataset,
                        'crop_border': scale, 'test_y_channel': True, 'iter': None, 'metrics': ['psnr', 'ssim'],
                        'images': images, 'mean': {k: float(np.mean([img[k] for img in images])) for k in keys}}
    return out


def published_ssim(img: np.ndarray, img2: np.ndarray, crop_border: int, dtype: type = np.float32,
                   win_size: int = 11, win_sigma: float = 1.5) -> float:
    """SSIM as the published SSIU code evaluates it: for comparison with its table, never for reporting.

    A re-implementation of that evaluation (``test.py`` with ``utils.rgb_to_ycbcr`` and
    ``pytorch_msssim.ssim`` 1.0.0): the 8-bit BGR HWC images (as BasicSR reads them) are taken to [0, 1]
    RGB, divided by 255 once more by a Y conversion meant for [0, 255] input (Y' = Y/255 + 16 with Y the
    usual 16-235 luma), cropped by ``crop_border`` and multiplied by 255, so Y lies in 4080..4299. SSIM
    then uses a ``win_size`` Gaussian window (sigma ``win_sigma``) applied by torch ``conv2d`` along H then
    W at valid positions, data range 255 and K = (0.01, 0.03), in ``dtype``: float32 as published, or
    float64, where the window is also normalised in float64. Element-wise steps run in numpy, which rounds
    them as torch does.

    The offset leaves PSNR unchanged but inflates SSIM. Against BasicSR's ``calculate_ssim`` on
    MATLAB-bicubic outputs of Set5 / Set14 it measures +0.0014 / +0.0019 at x2, +0.0024 / +0.0030 at x3 and
    +0.0033 / +0.0041 at x4 (float32, PyTorch CPU convolutions). Three causes add up: the luminance term
    becomes ~1 (alone, float64 with an exact window: +0.00003 / +0.00007, +0.0002 / +0.0003,
    +0.0007 / +0.0008); the float32 Gaussian window sums to 1 - 3e-8, which around 4300 raises every local
    variance by about 1 (with it, still float64: +0.0009 / +0.0014, +0.0018 / +0.0025, +0.0028 / +0.0036);
    float32 arithmetic adds the rest, which depends on how the convolution accumulates.
    """
    def to_y(image: np.ndarray) -> np.ndarray:
        image = np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image
        rgb = image[..., ::-1].transpose(2, 0, 1).astype(dtype) / dtype(255)
        rgb = rgb / dtype(255)  # the published conversion expects [0, 255] input
        y = dtype(65.481) * rgb[0] + dtype(128.553) * rgb[1] + dtype(24.966) * rgb[2] + dtype(16)
        if crop_border:
            y = y[crop_border:-crop_border, crop_border:-crop_border]
        return y * dtype(255)

    if img.shape != img2.shape:
        raise ValueError(f'image shapes differ: {img.shape} and {img2.shape}')
    x, y = to_y(img), to_y(img2)
    # The window as pytorch_msssim builds it: in float32 its sum is 1 - 3e-8, which around 4300 is not negligible.
    coords = torch.arange(win_size, dtype=torch.from_numpy(np.empty(0, dtype)).dtype) - win_size // 2
    window = torch.exp(-coords**2 / (2 * win_sigma**2))
    window = (window / window.sum()).view(1, 1, win_size, 1).expand(5, 1, win_size, 1)
    # The five filtered maps (one channel each) in one grouped pass, along H then W as pytorch_msssim.
    stats = torch.from_numpy(np.stack([x, y, x * x, y * y, x * y])[None])
    stats = F.conv2d(F.conv2d(stats, window, groups=5), window.transpose(2, 3), groups=5)
    mu1, mu2, xx, yy, xy = stats[0].numpy()
    c1, c2 = dtype((0.01 * 255)**2), dtype((0.03 * 255)**2)
    sigma1_sq = xx - mu1**2
    sigma2_sq = yy - mu2**2
    sigma12 = xy - mu1 * mu2
    cs_map = (2 * sigma12 + c2) / (sigma1_sq + sigma2_sq + c2)
    ssim_map = (2 * mu1 * mu2 + c1) / (mu1**2 + mu2**2 + c1) * cs_map
    return float(ssim_map.mean())


def entry_from_bicubic(results: dict[str, dict], root: str | os.PathLike) -> Entry:
    """The bicubic row of one scale from :func:`evaluate_bicubic` documents."""
    (scale,) = {doc['scale'] for doc in results.values()}
    entry = entries_from_results([(str(root), doc) for doc in results.values()], kind='bicubic')[0]
    entry.method = 'Bicubic'
    entry.scale = scale
    entry.source = (f'measured here: MATLAB-compatible bicubic upscaling of the LR images under {root}, '
                    "BasicSR's calculate_psnr/calculate_ssim (Y channel, crop_border = scale)")
    return entry


def _fmt(value: float | None, digits: int | None = None) -> str:
    if value is None:
        return '–'
    if digits is not None:
        return f'{value:.{digits}f}'
    return f'{value:.0f}' if value >= 100 or float(value).is_integer() else f'{value:.1f}'


def _ordered(entries: Iterable[Entry]) -> list[Entry]:
    order = {'bicubic': 0, 'published': 1, 'measured': 2, 'bench': 3}
    return sorted(entries, key=lambda e: order[e.kind])


def render_markdown(entries: Sequence[Entry], scale: int, datasets: Sequence[str] = DATASETS,
                    notes: Sequence[str] = ()) -> str:
    """A markdown table of the rows at ``scale``: PSNR/SSIM per set (best PSNR in bold) and references."""
    rows = _ordered(e for e in entries if e.scale == scale)
    bench = any(e.latency_ms is not None or e.peak_mem_mb is not None for e in rows)
    header = ['Method', 'Train set', 'Params (K)', 'Multi-adds (G)', *datasets]
    header += ['Latency (ms)', 'Peak mem (MB)'] if bench else []
    header.append('Ref')
    best = {d: max((round(e.psnr[d], 2) for e in rows if d in e.psnr), default=None) for d in datasets}
    refs: dict[str, int] = {}
    lines = [f'### x{scale}', '', '| ' + ' | '.join(header) + ' |',
             '|' + '|'.join([':--', ':--', '--:', '--:'] + [':-:'] * len(datasets) + ['--:'] * (2 * bench)
                            + [':-:']) + '|']
    for e in rows:
        cells = [e.method, e.train_set or '–', _fmt(e.params_k), _fmt(e.macs_g)]
        for d in datasets:
            if d not in e.psnr:
                cells.append('–')
                continue
            psnr = f'{e.psnr[d]:.2f}{e.marks.get((d, "psnr"), "")}'
            psnr = f'**{psnr}**' if round(e.psnr[d], 2) == best[d] and e.kind != 'bicubic' else psnr
            ssim = f'{e.ssim[d]:.4f}{e.marks.get((d, "ssim"), "")}' if d in e.ssim else '–'
            cells.append(f'{psnr} / {ssim}')
        if bench:
            cells += [_fmt(e.latency_ms, 1), _fmt(e.peak_mem_mb, 1)]
        cells.append(f'[{refs.setdefault(e.source, len(refs) + 1)}]' if e.source else '')
        lines.append('| ' + ' | '.join(cells) + ' |')
    lines += ['', 'PSNR (dB) / SSIM on the Y channel (BT.601), s border pixels removed; multi-adds for a 1280x720 '
              'output (the SSIU paper labels them FLOPs); rows from papers follow their own protocols.']
    if any(mark == '†' for e in rows for mark in e.marks.values()):
        lines.append(f'† SSIM computed by the published SSIU evaluation: {SSIM_INFLATION_NOTE}.')
    if any(mark == '*' for e in rows for mark in e.marks.values()):
        lines.append('* evaluated with crop_border other than the scale or without test_y_channel: '
                     'not comparable with the literature.')
    lines += [f'- {note}' for note in notes]
    lines += [''] + [f'[{n}] {source}  ' for source, n in refs.items()]
    return '\n'.join(lines).rstrip() + '\n'


def table_csv(entries: Sequence[Entry], datasets: Sequence[str] = DATASETS) -> str:
    """All rows as CSV (unrounded), one column per set and metric."""
    columns = ['method', 'kind', 'train_set', 'scale', 'params_k', 'macs_g']
    columns += [f'{d.lower()}_{m}' for d in datasets for m in ('psnr', 'ssim')]
    columns += ['ssim_protocol', 'latency_ms', 'peak_mem_mb', 'source']
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, lineterminator='\n')
    writer.writeheader()
    for e in sorted(_ordered(entries), key=lambda e: e.scale):
        row = {'method': e.method, 'kind': e.kind, 'train_set': e.train_set, 'scale': e.scale,
               'params_k': e.params_k, 'macs_g': e.macs_g, 'ssim_protocol': e.ssim_protocol,
               'latency_ms': e.latency_ms, 'peak_mem_mb': e.peak_mem_mb, 'source': e.source}
        for d in datasets:
            row[f'{d.lower()}_psnr'], row[f'{d.lower()}_ssim'] = e.psnr.get(d), e.ssim.get(d)
        writer.writerow({k: int(v) if isinstance(v, float) and v.is_integer() else v for k, v in row.items()})
    return buffer.getvalue()


def plot_tradeoff(entries: Sequence[Entry], path: str | os.PathLike, dataset: str = 'Urban100', scale: int = 4,
                  dpi: int = 150) -> None:
    """PNG of ``dataset`` x``scale`` PSNR against multiply-adds and against parameters, written atomically.

    Rows without the PSNR or without the x-axis quantity (such as bicubic) are left out.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [e for e in entries if e.scale == scale and dataset in e.psnr]
    if not any(e.params_k is not None or e.macs_g is not None for e in rows):
        raise ResultsError(f'no row has {dataset} x{scale} PSNR together with parameters or multi-adds to plot')
    fig = Figure(figsize=(11, 4.5), layout='constrained')
    FigureCanvasAgg(fig)
    styles = {'published': ('tab:blue', 'o', 40), 'measured': ('tab:red', '*', 160), 'bench': ('tab:red', '*', 160)}
    for ax, attr, label in zip(fig.subplots(1, 2), ('macs_g', 'params_k'), ('Multi-adds (G)', 'Parameters (K)')):
        for e in rows:
            x = getattr(e, attr)
            if x is None:
                continue
            color, marker, size = styles[e.kind]
            if e.kind == 'published' and e.method == 'SSIU':
                color, marker, size = 'tab:orange', '*', 160
            ax.scatter(x, e.psnr[dataset], c=color, marker=marker, s=size, zorder=3)
            ax.annotate(e.method, (x, e.psnr[dataset]), textcoords='offset points', xytext=(4, 4), fontsize=7)
        ax.set_xlabel(label)
        ax.set_ylabel(f'PSNR (dB), {dataset} x{scale}')
        ax.grid(True, alpha=0.3)
    fig.suptitle(f'PSNR against cost on {dataset} x{scale}')
    replace_atomic(path, lambda tmp: fig.savefig(tmp, format='png', dpi=dpi))


def _run(args: argparse.Namespace) -> int:
    try:
        return _results(args)
    except ResultsError as err:
        raise SystemExit(f'ssiu results: {err}') from None


def _results(args: argparse.Namespace) -> int:
    results = [(str(path), read_result_file(path, args.scale)) for path in args.results]
    if args.scale is not None:
        scales = [args.scale]
    else:
        scales = sorted({doc['scale'] for _, doc in results}) or [2, 3, 4]
    datasets = list(args.datasets)
    datasets += sorted({canonical_dataset(doc['dataset']) for _, doc in results} - set(datasets))
    entries = [] if args.no_published else [e for e in load_published() if e.scale in scales]
    entries += entries_from_results(results)
    notes: dict[int, list[str]] = {s: [] for s in scales}
    if args.bicubic_root is not None:
        root = Path(args.bicubic_root)
        present = [d for d in args.datasets if _has_dataset(root, d)]
        if not present:
            raise ResultsError(f'{root}: none of {", ".join(args.datasets)} found (expected <Set>/HR and '
                               '<Set>/LR_bicubic/X<s>)')
        for dataset in args.datasets:
            if dataset not in present:
                print(f'ssiu results: {root / dataset}: dataset folder not found; no bicubic {dataset}',
                      file=sys.stderr)
        for scale in scales:
            docs = evaluate_bicubic(root, scale, present, with_published_ssim=True)
            entries.append(entry_from_bicubic(docs, root))
            inflation = ', '.join(f'{d} {doc["mean"]["ssim_ssiu_code"] - doc["mean"]["ssim"]:+.4f}'
                                  for d, doc in docs.items())
            notes[scale].append(f'SSIM of the published SSIU evaluation minus BasicSR SSIM on the bicubic '
                                f'outputs under {root}: {inflation}.')
    if args.bench is not None:
        entries = merge_bench(entries, [r for r in read_bench(args.bench) if r['scale'] in scales], str(args.bench))
    markdown = '\n'.join(render_markdown(entries, s, datasets, notes[s]) for s in scales)
    print(markdown, end='')
    if args.md:
        write_text_atomic(args.md, markdown)
    if args.csv:
        write_text_atomic(args.csv, table_csv(entries, datasets))
    if args.plot:
        plot_scale = args.plot_scale or (scales[0] if len(scales) == 1 else max(scales))
        plot_tradeoff(entries, args.plot, canonical_dataset(args.plot_set), plot_scale)
    return 0


def _has_dataset(root: Path, dataset: str) -> bool:
    try:
        dataset_dir(root, dataset)
    except ResultsError:
        return False
    return True


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'results', help='tabulate test results next to published numbers and a measured bicubic baseline',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Print a markdown table (PSNR/SSIM per benchmark, parameters, multi-adds) of the\n'
                    'metrics_<set>.json files that SSIUModel writes under\n'
                    '"basicsr test -opt options/test_SSIU_x<s>.yml", beside the SSIU paper\'s table and\n'
                    "IDSA-Net's x4 figures. Optionally: a bicubic row measured\n"
                    'with the same BasicSR metrics (--bicubic-root), efficiency columns from "ssiu bench --json",\n'
                    'a CSV and a PSNR-vs-cost PNG. Output files are replaced atomically.',
        epilog='examples:\n'
               '  ssiu results --results results/test_SSIU_x4/metrics_*.json --scale 4\n'
               '  ssiu results --scale 2 --bicubic-root datasets/benchmark --md table.md --csv table.csv\n'
               '  ssiu results --results results/*/metrics_*.json --bench bench.json --plot x4.png --plot-set Urban100')
    parser.add_argument('--results', nargs='*', default=[], metavar='JSON',
                        help='metrics_<dataset>.json files (one row per run name and iteration)')
    parser.add_argument('--scale', type=int, default=None, metavar='S',
                        help='only this scale; a results file of another scale is an error (default: scales found '
                             'in --results, else 2, 3 and 4)')
    parser.add_argument('--bicubic-root', default=None, metavar='DIR',
                        help='EDSR-style benchmark root (<Set>/HR/<name>.png, <Set>/LR_bicubic/X<s>/<name>x<s>.png): '
                             'add a bicubic row computed from these images with the same metrics, and the '
                             'published-SSIM inflation measured on them')
    parser.add_argument('--datasets', nargs='+', type=canonical_dataset, default=list(DATASETS), metavar='SET',
                        help=f'benchmark columns, also the sets evaluated under --bicubic-root (default: '
                             f'{" ".join(DATASETS)})')
    parser.add_argument('--bench', default=None, metavar='JSON',
                        help='"ssiu bench --json" output: params, multi-adds, latency and memory of the measured rows '
                             '(matched by model and scale)')
    parser.add_argument('--no-published', action='store_true', help='leave out the published rows')
    parser.add_argument('--md', default=None, metavar='FILE', help='also write the markdown table here')
    parser.add_argument('--csv', default=None, metavar='FILE', help='write all rows, unrounded, as CSV here')
    parser.add_argument('--plot', default=None, metavar='PNG', help='write a PSNR vs multi-adds / parameters plot')
    parser.add_argument('--plot-set', default='Urban100', metavar='SET',
                        help='benchmark of the plot (default: Urban100)')
    parser.add_argument('--plot-scale', type=int, default=None, metavar='S',
                        help='scale of the plot (default: --scale, else the largest scale shown)')
    parser.set_defaults(func=_run)
