"""Output of ``ssiu results``: the markdown table, the CSV of all rows and the PSNR-against-cost plot."""
from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ssiu_arch.evaluation.datasets import DATASETS
from ssiu_arch.evaluation.errors import ResultsError
from ssiu_arch.evaluation.published_ssim import SSIM_INFLATION_NOTE
from ssiu_arch.evaluation.table import Entry
from ssiu_arch.utils.fileio import replace_atomic


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


def plot_formats() -> list[str]:
    """File extensions, without the dot, that matplotlib writes a figure as (png, pdf, svg, jpg, ...)."""
    from matplotlib.backend_bases import FigureCanvasBase

    return sorted(FigureCanvasBase.get_supported_filetypes())


def plot_tradeoff(entries: Sequence[Entry], path: str | os.PathLike, dataset: str = 'Urban100', scale: int = 4,
                  dpi: int = 150) -> None:
    """Plot ``dataset`` x``scale`` PSNR against multiply-adds and against parameters, written atomically.

    The format follows the extension of ``path`` (any of :func:`plot_formats`). Rows without the PSNR or
    without the x-axis quantity (such as bicubic) are left out.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fmt = Path(path).suffix[1:].lower()
    if fmt not in plot_formats():
        raise ResultsError(f'{path}: a plot is written as one of {", ".join(plot_formats())}; '
                           f'"{Path(path).suffix}" is none of them')
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
    replace_atomic(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi))
