"""Rows of the results table: :class:`Entry`, and the rows of validated metrics documents."""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field

from ssiu_arch.evaluation.datasets import canonical_dataset
from ssiu_arch.evaluation.errors import ResultsError


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


def entries_from_results(results: Sequence[tuple[str, dict]], kind: str = 'measured') -> list[Entry]:
    """One row per run (name, iter, scale) from validated metrics documents with PSNR, ``(origin, document)``.

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
