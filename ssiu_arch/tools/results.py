"""``ssiu results``: test results in a table beside the published numbers and a measured bicubic baseline.

The pieces live in :mod:`ssiu_arch.evaluation`; this module is the command line. It checks its options and
outputs before any work (an output of the wrong kind, an existing one without ``--overwrite``, an unknown
scale or benchmark are refused with one line naming them), then reads, merges, renders and writes, each
output atomically.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ssiu_arch.evaluation.bench_table import merge_bench, read_bench
from ssiu_arch.evaluation.datasets import DATASETS, canonical_dataset, has_dataset
from ssiu_arch.evaluation.errors import ResultsError
from ssiu_arch.evaluation.metrics_schema import read_metrics, validate_metrics
from ssiu_arch.evaluation.published import load_published, published_scales
from ssiu_arch.evaluation.render import plot_formats, plot_tradeoff, render_markdown, table_csv
from ssiu_arch.evaluation.table import entries_from_results
from ssiu_arch.utils.fileio import write_text_atomic


def _run(args: argparse.Namespace) -> int:
    try:
        return _results(args)
    except ResultsError as err:
        raise SystemExit(f'ssiu results: {err}') from None


def _check_outputs(args: argparse.Namespace) -> None:
    """Refuse an output whose extension is not of its kind, a folder, or an existing file without --overwrite."""
    for option, path in (('--md', args.md), ('--csv', args.csv), ('--plot', args.plot)):
        if path is None:
            continue
        path = Path(path)
        extensions = plot_formats() if option == '--plot' else [option[2:]]
        if path.suffix[1:].lower() not in extensions:
            endings = ', '.join(f'.{e}' for e in extensions)
            raise ResultsError(f'{option} {path}: the file name must end in {"one of " if len(extensions) > 1 else ""}'
                               f'{endings}')
        if path.is_dir():
            raise ResultsError(f'{option} {path}: is a folder')
        if (path.exists() or path.is_symlink()) and not args.overwrite:
            raise ResultsError(f'{option} {path}: exists (use --overwrite to replace it)')


def _check_choices(args: argparse.Namespace, results: list[tuple[str, dict]]) -> None:
    """Refuse scales and benchmarks that neither the published table nor a --results file has."""
    scales = sorted(set(published_scales()) | {doc['scale'] for _, doc in results})
    for option, scale in (('--scale', args.scale), ('--plot-scale', args.plot_scale)):
        if scale is not None and scale not in scales:
            raise ResultsError(f'{option} {scale}: not a scale of the published table or of --results; '
                               f'valid: {", ".join(map(str, scales))}')
    names = list(DATASETS) + sorted({canonical_dataset(doc['dataset']) for _, doc in results} - set(DATASETS))
    for option, datasets in (('--datasets', args.datasets), ('--plot-set', [args.plot_set])):
        unknown = [d for d in datasets if d not in names]
        if unknown:
            raise ResultsError(f'{option} {" ".join(unknown)}: unknown benchmark; valid: {", ".join(names)} '
                               '(or a dataset of a --results file)')
    for origin, doc in results:
        validate_metrics(doc, origin, args.scale)


def _results(args: argparse.Namespace) -> int:
    _check_outputs(args)
    results = [(str(path), read_metrics(path, required_metrics=('psnr',))) for path in args.results]
    _check_choices(args, results)
    if args.scale is not None:
        scales = [args.scale]
    else:
        scales = sorted({doc['scale'] for _, doc in results}) or published_scales()
    requested = list(dict.fromkeys(args.datasets))
    datasets = requested + sorted({canonical_dataset(doc['dataset']) for _, doc in results} - set(requested))
    entries = [] if args.no_published else [e for e in load_published() if e.scale in scales]
    entries += entries_from_results(results)
    notes: dict[int, list[str]] = {s: [] for s in scales}
    if args.bicubic_root is not None:
        from ssiu_arch.evaluation.bicubic import entry_from_bicubic, evaluate_bicubic  # imports basicsr

        root = Path(args.bicubic_root)
        present = [d for d in requested if has_dataset(root, d)]
        if not present:
            raise ResultsError(f'{root}: none of {", ".join(requested)} found (expected <Set>/HR and '
                               '<Set>/LR_bicubic/X<s>)')
        for dataset in requested:
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
        plot_tradeoff(entries, args.plot, args.plot_set, plot_scale)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'results', help='tabulate test results next to published numbers and a measured bicubic baseline',
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description='Print a markdown table (PSNR/SSIM per benchmark, parameters, multi-adds) of the\n'
                    'metrics_<set>.json files that SSIUModel writes under\n'
                    '"basicsr test -opt options/test_SSIU_x<s>.yml", beside the SSIU paper\'s table and\n'
                    "IDSA-Net's x4 figures. Optionally: a bicubic row measured\n"
                    'with the same BasicSR metrics (--bicubic-root), efficiency columns from "ssiu bench --json",\n'
                    'a CSV and a PSNR-vs-cost plot. Existing output files are kept unless --overwrite; outputs are\n'
                    'written atomically.',
        epilog='examples:\n'
               '  ssiu results --results results/test_SSIU_x4/metrics_*.json --scale 4\n'
               '  ssiu results --scale 2 --bicubic-root datasets/benchmark --md table.md --csv table.csv\n'
               '  ssiu results --results results/*/metrics_*.json --bench bench.json --plot x4.png --plot-set Urban100')
    parser.add_argument('--results', nargs='*', default=[], metavar='JSON',
                        help='metrics_<dataset>.json files (one row per run name and iteration)')
    parser.add_argument('--scale', type=int, default=None, metavar='S',
                        help='only this scale: 2, 3 or 4 (those of the published table) or a scale of --results; a '
                             'results file of another scale is an error (default: scales found in --results, else '
                             '2, 3 and 4)')
    parser.add_argument('--bicubic-root', default=None, metavar='DIR',
                        help='EDSR-style benchmark root (<Set>/HR/<name>.png, <Set>/LR_bicubic/X<s>/<name>x<s>.png): '
                             'add a bicubic row computed from these images with the same metrics, and the '
                             'published-SSIM inflation measured on them')
    parser.add_argument('--datasets', nargs='+', type=canonical_dataset, default=list(DATASETS), metavar='SET',
                        help=f'benchmark columns, also the sets evaluated under --bicubic-root: any of '
                             f'{" ".join(DATASETS)} (usual spellings such as BSD100 accepted) or a dataset of '
                             f'--results (default: all five)')
    parser.add_argument('--bench', default=None, metavar='JSON',
                        help='"ssiu bench --json" output: params, multi-adds, latency and memory of the measured rows '
                             '(matched by model and scale)')
    parser.add_argument('--no-published', action='store_true', help='leave out the published rows')
    parser.add_argument('--md', default=None, metavar='FILE.md', help='also write the markdown table here')
    parser.add_argument('--csv', default=None, metavar='FILE.csv', help='write all rows, unrounded, as CSV here')
    parser.add_argument('--plot', default=None, metavar='IMAGE',
                        help='write a PSNR vs multi-adds / parameters plot; its extension picks the format (.png, '
                             '.pdf, .svg, .jpg, ... as matplotlib writes them)')
    parser.add_argument('--plot-set', type=canonical_dataset, default='Urban100', metavar='SET',
                        help='benchmark of the plot (default: Urban100)')
    parser.add_argument('--plot-scale', type=int, default=None, metavar='S',
                        help='scale of the plot (default: --scale, else the largest scale shown)')
    parser.add_argument('--overwrite', action='store_true', help='replace existing --md, --csv and --plot files')
    parser.set_defaults(func=_run)
