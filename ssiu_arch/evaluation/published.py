"""The published-results table, ``ssiu_arch/data/published_results.csv``.

Its rows: the SSIU paper's comparison table (method, training set, scale, parameters in K, multiply-adds in G
for a 1280x720 output, which that table calls FLOPs, and PSNR/SSIM per benchmark), IDSA-Net's x4 figures, a
``source`` citation per row and ``ssim_protocol`` (``ssiu-y-offset`` marks SSIM computed by the published SSIU
evaluation, see :mod:`ssiu_arch.evaluation.published_ssim`; ``reported`` is each paper's own protocol).
Empty cells were not published.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from ssiu_arch.evaluation.datasets import DATASETS
from ssiu_arch.evaluation.table import Entry

PUBLISHED_CSV = Path(__file__).parents[1] / 'data' / 'published_results.csv'


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


def published_scales() -> list[int]:
    """The scales the published table covers (2, 3 and 4)."""
    return sorted({e.scale for e in load_published()})
