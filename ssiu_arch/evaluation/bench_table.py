"""``ssiu bench --json`` rows: read, checked, and merged into the results table by model and scale."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable

from ssiu_arch.evaluation.errors import ResultsError
from ssiu_arch.evaluation.metrics_schema import is_number
from ssiu_arch.evaluation.table import Entry

BENCH_KEYS = ('model', 'scale', 'params', 'macs_g')


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
        if not isinstance(row['scale'], int) or not is_number(row['params']) or not (
                row['macs_g'] is None or is_number(row['macs_g'])):
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
