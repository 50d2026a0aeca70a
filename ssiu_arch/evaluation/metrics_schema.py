"""The metrics-JSON schema: ``metrics_<dataset>.json``, written by SSIUModel at validation, read by ``ssiu results``.

One document per run, dataset and evaluation, keys in this order::

    {"name": str, "model": str, "scale": int >= 1, "dataset": str, "crop_border": int >= 0,
     "test_y_channel": bool, "iter": int | str | null, "metrics": [str, ...],
     "images": [{"name": str, <metric>: number, ...}, ...], "mean": {<metric>: number, ...}}

``name`` is the run (option ``name``), ``model`` the network class, ``crop_border`` and ``test_y_channel``
the options of the first metric. ``iter`` is the training iteration, the option name under ``basicsr test``
(as BasicSR passes it), or null for a baseline. ``images`` and ``mean`` give a number for each name in
``metrics`` and may carry more keys (the bicubic baseline adds ``ssim_ssiu_code``). Beside the JSON,
``metrics_<dataset>.csv`` holds one row per image: ``name`` and the metrics.

:func:`make_metrics` builds a document, :func:`write_metrics` writes both files and :func:`read_metrics`
reads one back; all of them pass through :func:`validate_metrics`, so writer and reader cannot drift.
"""
from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path

from ssiu_arch.evaluation.errors import ResultsError
from ssiu_arch.utils.fileio import write_text_atomic

KEYS = ('name', 'model', 'scale', 'dataset', 'crop_border', 'test_y_channel', 'iter', 'metrics', 'images', 'mean')


def is_number(value: object) -> bool:
    """An int or float, not a bool (JSON numbers as ``json`` loads them)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_metrics(doc: object, origin: str, scale: int | None = None,
                     required_metrics: Sequence[str] = ()) -> dict:
    """Check one metrics document; raise :class:`ResultsError` naming ``origin`` and the offending key.

    ``scale``: the scale the caller expects; ``required_metrics``: metric names the caller needs.
    """
    if not isinstance(doc, dict):
        raise ResultsError(f'{origin}: expected a JSON object, got {type(doc).__name__}')
    missing = [key for key in KEYS if key not in doc]
    if missing:
        raise ResultsError(f'{origin}: not a metrics file, missing key(s) {", ".join(missing)}')
    for key in ('name', 'model', 'dataset'):
        if not isinstance(doc[key], str) or not doc[key]:
            raise ResultsError(f'{origin}: "{key}" must be a non-empty string, got {doc[key]!r}')
    if not _is_int(doc['scale']) or doc['scale'] < 1:
        raise ResultsError(f'{origin}: "scale" must be a positive integer, got {doc["scale"]!r}')
    if scale is not None and doc['scale'] != scale:
        raise ResultsError(f'{origin}: results for x{doc["scale"]}, but --scale {scale} was requested')
    if not _is_int(doc['crop_border']) or doc['crop_border'] < 0:
        raise ResultsError(f'{origin}: "crop_border" must be a non-negative integer, got {doc["crop_border"]!r}')
    if not isinstance(doc['test_y_channel'], bool):
        raise ResultsError(f'{origin}: "test_y_channel" must be true or false, got {doc["test_y_channel"]!r}')
    if not (doc['iter'] is None or _is_int(doc['iter']) or isinstance(doc['iter'], str)):
        raise ResultsError(f'{origin}: "iter" must be an integer, a string or null, got {doc["iter"]!r}')
    metrics = doc['metrics']
    if (not isinstance(metrics, list) or not metrics or len(set(map(str, metrics))) != len(metrics)
            or not all(isinstance(m, str) and m and m != 'name' for m in metrics)):
        raise ResultsError(f'{origin}: "metrics" must be a non-empty list of distinct metric names, got {metrics!r}')
    absent = [m for m in required_metrics if m not in metrics]
    if absent:
        raise ResultsError(f'{origin}: "metrics" must include {", ".join(absent)}, got {metrics!r}')
    mean = doc['mean']
    if not isinstance(mean, dict) or not all(is_number(mean.get(m)) for m in metrics):
        raise ResultsError(f'{origin}: "mean" must give a number for each of {metrics}, got {mean!r}')
    images = doc['images']
    if not isinstance(images, list) or not images or not all(
            isinstance(img, dict) and isinstance(img.get('name'), str) and all(is_number(img.get(m)) for m in metrics)
            for img in images):
        fields = ', '.join(f'"{key}"' for key in ('name', *metrics))
        raise ResultsError(f'{origin}: "images" must be a non-empty list of {{{fields}}} objects')
    return doc


def make_metrics(*, name: str, model: str, scale: int, dataset: str, crop_border: int, test_y_channel: bool,
                 iter: int | str | None, metrics: Sequence[str], images: list[dict], mean: dict[str, float],
                 origin: str = 'metrics') -> dict:
    """A checked metrics document with the keys in schema order."""
    doc = {'name': name, 'model': model, 'scale': scale, 'dataset': dataset, 'crop_border': crop_border,
           'test_y_channel': test_y_channel, 'iter': iter, 'metrics': list(metrics), 'images': images,
           'mean': mean}
    return validate_metrics(doc, origin)


def metrics_path(folder: str | os.PathLike, dataset: str) -> Path:
    """``folder/metrics_<dataset>.json``."""
    return Path(folder) / f'metrics_{dataset}.json'


def write_metrics(folder: str | os.PathLike, doc: dict) -> Path:
    """Check ``doc``, then write ``metrics_<dataset>.json`` and ``.csv`` into ``folder`` atomically; return the JSON."""
    path = metrics_path(folder, doc.get('dataset', '') if isinstance(doc, dict) else '')
    validate_metrics(doc, str(path))
    write_text_atomic(path, json.dumps(doc, indent=2) + '\n')
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=['name', *doc['metrics']], lineterminator='\n', extrasaction='ignore')
    writer.writeheader()
    writer.writerows(doc['images'])
    write_text_atomic(path.with_suffix('.csv'), table.getvalue())
    return path


def read_metrics(path: str | os.PathLike, scale: int | None = None, required_metrics: Sequence[str] = ()) -> dict:
    """Load and check a metrics document (see :func:`validate_metrics` for ``scale`` and ``required_metrics``)."""
    try:
        with open(path, encoding='utf-8') as f:
            doc = json.load(f)
    except FileNotFoundError:
        raise ResultsError(f'{path}: no such results file') from None
    except IsADirectoryError:
        raise ResultsError(f'{path}: is a folder, not a results file') from None
    except (OSError, UnicodeDecodeError) as err:
        raise ResultsError(f'{path}: cannot be read ({err})') from None
    except json.JSONDecodeError as err:
        raise ResultsError(f'{path}: not valid JSON ({err})') from None
    return validate_metrics(doc, str(path), scale, required_metrics)
