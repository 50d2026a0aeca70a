"""``ssiu results``: the metrics-JSON schema, table rows, bench merging and the command line with its output safety."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ssiu_arch.evaluation.bench_table import merge_bench, read_bench
from ssiu_arch.evaluation.errors import ResultsError
from ssiu_arch.evaluation.metrics_schema import KEYS, make_metrics, read_metrics, write_metrics
from ssiu_arch.evaluation.render import plot_tradeoff
from ssiu_arch.evaluation.table import entries_from_results
from ssiu_arch.tools.cli import ssiu_main

BENCH = Path(__file__).parent / 'data' / 'benchmark'


def _result(name: str = 'my_SSIU', scale: int = 4, dataset: str = 'Set5', psnr: float = 32.7, ssim: float = 0.9,
            iter_: object = 1000, model: str = 'SSIU') -> dict:
    images = [{'name': 'a', 'psnr': psnr - 0.5, 'ssim': ssim - 0.01},
              {'name': 'b', 'psnr': psnr + 0.5, 'ssim': ssim + 0.01}]
    return {'name': name, 'model': model, 'scale': scale, 'dataset': dataset, 'crop_border': scale,
            'test_y_channel': True, 'iter': iter_, 'metrics': ['psnr', 'ssim'], 'images': images,
            'mean': {'psnr': psnr, 'ssim': ssim}}


def _write(path: Path, obj: object) -> str:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding='utf-8')
    return str(path)


def _exit_message(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as err:
        ssiu_main(argv)
    return str(err.value.code)



def test_written_metrics_read_back_with_csv(tmp_path):
    doc = make_metrics(**{key: _result()[key] for key in KEYS})
    path = write_metrics(tmp_path / 'log', {**doc, 'dataset': 'Set14'})
    assert path == tmp_path / 'log' / 'metrics_Set14.json'
    assert read_metrics(path, scale=4, required_metrics=('psnr', 'ssim')) == {**doc, 'dataset': 'Set14'}
    assert list(json.loads(path.read_text(encoding='utf-8'))) == list(KEYS)
    with open(path.with_suffix('.csv'), newline='', encoding='utf-8') as f:
        assert [(r['name'], float(r['psnr'])) for r in csv.DictReader(f)] == [('a', 32.2), ('b', 33.2)]
    assert sorted(p.name for p in path.parent.iterdir()) == ['metrics_Set14.csv', 'metrics_Set14.json']


@pytest.mark.parametrize('change, key', [
    ({'images': [{'name': 'a', 'psnr': 30.0}]}, '"images"'),
    ({'mean': {'psnr': 30.0}}, '"mean"'),
    ({'crop_border': 4.5}, '"crop_border"'),
    ({'iter': [1]}, '"iter"'),
    ({'metrics': []}, '"metrics"'),
])
def test_writer_refuses_malformed_document_and_writes_nothing(tmp_path, change, key):
    with pytest.raises(ResultsError) as err:
        write_metrics(tmp_path, {**_result(), **change})
    assert str(err.value).startswith(f'{tmp_path / "metrics_Set5.json"}: {key}')
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize('content, expected', [
    ('{"name": ', 'not valid JSON'),
    ([1, 2], 'expected a JSON object'),
    ({k: v for k, v in _result().items() if k != 'mean'}, 'not a metrics file, missing key(s) mean'),
    ({**_result(), 'scale': '4'}, '"scale" must be a positive integer'),
    ({**_result(), 'test_y_channel': 1}, '"test_y_channel" must be true or false'),
    ({**_result(), 'mean': {'psnr': 'high', 'ssim': 0.9}}, '"mean" must give a number'),
    ({**_result(), 'images': [{'psnr': 30.0, 'ssim': 0.9}]}, '"images" must be a non-empty list'),
    ({**_result(), 'metrics': ['ssim'], 'mean': {'ssim': 0.9}}, '"metrics" must include psnr'),
])
def test_malformed_results_file_is_named(tmp_path, content, expected):
    path = _write(tmp_path / 'metrics_bad.json', content)
    message = _exit_message(['results', '--results', path])
    assert message.startswith(f'ssiu results: {path}: ') and expected in message and '\n' not in message


def test_missing_results_file_is_named(tmp_path):
    path = str(tmp_path / 'results' / 'metrics_Set5.json')
    assert f'{path}: no such results file' in _exit_message(['results', '--results', path])


def test_results_cli_table_csv_plot(tmp_path, capsys):
    files = [_write(tmp_path / 'metrics_Set5.json', _result(dataset='Set5', psnr=32.71, ssim=0.9001)),
             _write(tmp_path / 'metrics_Set14.json', _result(dataset='set14', psnr=28.99, ssim=0.7901))]
    bench = _write(tmp_path / 'bench.json', [
        {'model': 'SSIU', 'scale': 4, 'params': 794_000, 'macs_g': 48.9, 'input': '1x3x180x320', 'latency_ms': 123.4,
         'peak_mem_mb': 456.7, 'efficiency': 0.5, 'threads': 2, 'machine': 'cpu-box'},
        {'model': 'SSIU', 'scale': 2, 'params': 778_000, 'macs_g': 167.2, 'input': '1x3x360x640',
         'latency_ms': 300.0, 'peak_mem_mb': 900.0, 'efficiency': 0.5, 'threads': 2, 'machine': 'cpu-box'}])
    md, table, png = tmp_path / 'out' / 'table.md', tmp_path / 'table.csv', tmp_path / 'x4.png'
    code = ssiu_main(['results', '--results', *files, '--scale', '4', '--bench', bench, '--bicubic-root', str(BENCH),
                      '--datasets', 'Set5', 'B100', '--md', str(md), '--csv', str(table), '--plot', str(png),
                      '--plot-set', 'Set5'])
    assert code == 0
    out, err = capsys.readouterr()
    assert out == md.read_text(encoding='utf-8')
    assert str(BENCH / 'B100') in err and 'not found' in err
    rows = {line.split(' | ')[0].lstrip('| '): line for line in out.splitlines() if line.startswith('| ')}
    assert out.splitlines()[2].startswith('| Method | Train set | Params (K) | Multi-adds (G) | Set5 | B100 | Set14 |')
    assert '| 794 | 48.9 | **32.71** / 0.9001 | – | **28.99** / 0.7901 | 123.4 | 456.7 |' in rows['my_SSIU']
    assert '| 28.43 / 0.8111 | – | – |' in rows['Bicubic']
    assert '| 32.64 / 0.9032† | **27.82** / 0.7472† | 28.96 / 0.7939† |' in rows['SSIU']
    assert 'IDSA-Net' in rows and not any('x2' in line for line in out.splitlines() if line.startswith('###'))
    assert re.search(r'bicubic outputs under .*: Set5 \+0\.00\d\d\.', out)
    with open(table, newline='', encoding='utf-8') as f:
        by_method = {row['method']: row for row in csv.DictReader(f)}
    assert float(by_method['my_SSIU']['params_k']) == 794 and by_method['my_SSIU']['latency_ms'] == '123.4'
    assert by_method['my_SSIU']['source'].startswith(files[0])
    assert by_method['Bicubic']['kind'] == 'bicubic' and by_method['Bicubic']['b100_psnr'] == ''
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['bench.json', 'metrics_Set14.json', 'metrics_Set5.json',
                                                          'out', 'table.csv', 'x4.png']


def test_results_without_scale_shows_each_scale_found(tmp_path, capsys):
    files = [_write(tmp_path / 'a.json', _result(scale=2, psnr=38.3)), _write(tmp_path / 'b.json', _result(scale=3))]
    assert ssiu_main(['results', '--results', *files, '--no-published']) == 0
    out = capsys.readouterr().out
    assert re.findall(r'^### x(\d)', out, flags=re.M) == ['2', '3']
    assert '**38.30** / 0.9000' in out and 'CARN' not in out


def test_results_file_of_other_scale_is_named(tmp_path):
    path = _write(tmp_path / 'metrics_Set5.json', _result(scale=2))
    message = _exit_message(['results', '--results', path, '--scale', '4'])
    assert path in message and 'x2' in message and '--scale 4' in message


def test_same_run_twice_names_both_files_and_iterations_get_rows(tmp_path):
    first = _write(tmp_path / 'a.json', _result(iter_=1000))
    again = _write(tmp_path / 'b.json', _result(iter_=1000))
    message = _exit_message(['results', '--results', first, again])
    assert first in message and again in message
    later = _write(tmp_path / 'c.json', _result(iter_=2000, psnr=32.9))
    entries = entries_from_results([(first, _result(iter_=1000)), (later, _result(iter_=2000, psnr=32.9))])
    assert sorted((e.method, e.psnr['Set5']) for e in entries) == [('my_SSIU @1000', 32.7), ('my_SSIU @2000', 32.9)]


def test_bench_rows_merge_and_bad_bench_is_named(tmp_path):
    measured = entries_from_results([('m.json', _result(model='SSIU'))])
    rows = [{'model': 'ssiu', 'scale': 4, 'params': 794_000, 'macs_g': 48.9},
            {'model': 'IDSANet', 'scale': 4, 'params': 752_000, 'macs_g': 40.0, 'latency_ms': 80.0}]
    merged = merge_bench(measured, rows, 'bench.json')
    assert (merged[0].params_k, merged[0].macs_g) == (794, 48.9)
    assert [(e.method, e.kind, e.latency_ms) for e in merged[1:]] == [('IDSANet', 'bench', 80.0)]
    for content, expected in [('[', 'not a readable JSON bench file'), ([{'model': 'SSIU'}], 'row 0 must be'),
                              ([rows[0], rows[0]], 'two rows for ssiu x4')]:
        path = _write(tmp_path / 'bench.json', content)
        with pytest.raises(ResultsError, match=re.escape(path)) as err:
            read_bench(path)
        assert expected in str(err.value)


def test_plot_failure_keeps_previous_file(tmp_path):
    png = tmp_path / 'plot.png'
    png.write_bytes(b'previous')
    with pytest.raises(ResultsError, match='Manga109 x4'):
        plot_tradeoff(entries_from_results([('m.json', _result())]), png, dataset='Manga109', scale=4)
    assert png.read_bytes() == b'previous' and [p.name for p in tmp_path.iterdir()] == ['plot.png']


def test_bicubic_root_without_any_set_is_named(tmp_path):
    message = _exit_message(['results', '--scale', '2', '--bicubic-root', str(tmp_path / 'nothing')])
    assert str(tmp_path / 'nothing') in message and 'none of Set5' in message


@pytest.mark.parametrize('option, name', [('--md', 'table.md'), ('--csv', 'table.csv'), ('--plot', 'plot.png')])
def test_existing_output_is_kept_unless_overwrite(tmp_path, option, name):
    results = _write(tmp_path / 'metrics_Set5.json', _result())
    out = tmp_path / name
    out.write_bytes(b'previous')
    argv = ['results', '--results', results, '--plot-set', 'Set5', option, str(out)]
    assert _exit_message(argv) == f'ssiu results: {option} {out}: exists (use --overwrite to replace it)'
    assert out.read_bytes() == b'previous'
    assert ssiu_main([*argv, '--overwrite']) == 0
    assert out.read_bytes() != b'previous'
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(['metrics_Set5.json', name])


@pytest.mark.parametrize('option, name, expected', [
    ('--md', 'p.png', 'must end in .md'), ('--csv', 'table.md', 'must end in .csv'),
    ('--plot', 'plot.md', 'must end in one of '), ('--plot', 'plot', '.pdf, '),
])
def test_output_of_the_wrong_kind_is_refused(tmp_path, option, name, expected):
    out = tmp_path / name
    out.write_bytes(b'previous')
    message = _exit_message(['results', '--no-published', '--scale', '4', option, str(out), '--overwrite'])
    assert message.startswith(f'ssiu results: {option} {out}: ') and expected in message and '\n' not in message
    assert out.read_bytes() == b'previous'


@pytest.mark.parametrize('name, magic', [('plot.pdf', b'%PDF'), ('plot.svg', b'<?xml'), ('plot.JPG', b'\xff\xd8')])
def test_plot_format_follows_the_extension(tmp_path, name, magic):
    assert ssiu_main(['results', '--scale', '4', '--plot', str(tmp_path / name)]) == 0
    assert (tmp_path / name).read_bytes().startswith(magic)


@pytest.mark.parametrize('args, expected', [
    (['--scale', '0'], '--scale 0: not a scale of the published table or of --results; valid: 2, 3, 4'),
    (['--scale', '7'], '--scale 7: not a scale of the published table or of --results; valid: 2, 3, 4'),
    (['--plot-scale', '8'], '--plot-scale 8: not a scale of the published table or of --results; valid: 2, 3, 4'),
    (['--datasets', 'Set5', 'Set99'], '--datasets Set99: unknown benchmark; valid: Set5, Set14, B100, Urban100, '
                                      'Manga109 (or a dataset of a --results file)'),
    (['--plot-set', 'div2k'], '--plot-set div2k: unknown benchmark; valid: Set5, Set14, B100, Urban100, Manga109'),
])
def test_unknown_scale_or_benchmark_is_refused(args, expected):
    message = _exit_message(['results', *args])
    assert message.startswith(f'ssiu results: {expected}') and '\n' not in message


def test_scales_and_sets_of_results_files_are_accepted(tmp_path, capsys):
    path = _write(tmp_path / 'metrics_DIV2K.json', _result(scale=8, dataset='DIV2K_val'))
    assert ssiu_main(['results', '--results', path, '--scale', '8', '--datasets', 'Set5', 'BSD100', 'DIV2K_val',
                      '--plot-set', 'DIV2K_val']) == 0
    out = capsys.readouterr().out
    assert '### x8' in out and '| Set5 | B100 | DIV2K_val |' in out and '**32.70** / 0.9000' in out


def test_schema_table_and_cli_modules_import_without_basicsr():
    code = ('import sys\n'
            'import ssiu_arch.evaluation.metrics_schema, ssiu_arch.evaluation.published, ssiu_arch.tools.results\n'
            'import ssiu_arch.evaluation.bicubic\n'
            'assert "basicsr" not in sys.modules, "basicsr imported"\n')
    subprocess.run([sys.executable, '-c', code], check=True, timeout=120)
