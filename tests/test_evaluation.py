"""``ssiu results``, the measured bicubic baseline, the published-SSIM check and the test option files."""
from __future__ import annotations

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from basicsr.data import build_dataset
from basicsr.metrics import calculate_ssim
from basicsr.utils.options import ordered_yaml

from ssiu_arch import SSIU
from ssiu_arch.tools.cli import ssiu_main
from ssiu_arch.tools.results import (
    DATASETS,
    ResultsError,
    benchmark_pairs,
    bicubic_upscale,
    entries_from_results,
    evaluate_bicubic,
    load_published,
    merge_bench,
    plot_tradeoff,
    published_ssim,
    read_bench,
    read_image,
)

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).parent / 'data' / 'benchmark'

# Bicubic baseline of the shipped images: the benchmark README (0.01 dB / 0.0005) and the literature's Set5
# figures (0.02 dB / 0.001).
README_FIGURES = {('Set5', 2): (33.67, 0.9303), ('Set5', 4): (28.43, 0.8111),
                  ('Set14', 2): (30.33, 0.8699), ('Set14', 4): (26.09, 0.7048)}
LITERATURE_FIGURES = {('Set5', 2): (33.66, 0.9299), ('Set5', 4): (28.42, 0.8104)}


@pytest.fixture(scope='module')
def bicubic() -> dict[int, dict[str, dict]]:
    return {s: evaluate_bicubic(BENCH, s, ('Set5', 'Set14'), with_published_ssim=True) for s in (2, 4)}


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


def test_bicubic_matches_benchmark_and_literature(bicubic):
    for (dataset, scale), (psnr, ssim) in README_FIGURES.items():
        mean = bicubic[scale][dataset]['mean']
        assert abs(mean['psnr'] - psnr) <= 0.01, (dataset, scale, mean)
        assert abs(mean['ssim'] - ssim) <= 0.0005, (dataset, scale, mean)
    for (dataset, scale), (psnr, ssim) in LITERATURE_FIGURES.items():
        mean = bicubic[scale][dataset]['mean']
        assert abs(mean['psnr'] - psnr) <= 0.02 and abs(mean['ssim'] - ssim) <= 0.001, (dataset, scale, mean)
    doc = bicubic[2]['Set14']
    assert [img['name'] for img in doc['images']] == sorted(p.stem for p in (BENCH / 'Set14' / 'HR').glob('*.png'))
    assert doc['mean']['psnr'] == pytest.approx(np.mean([img['psnr'] for img in doc['images']]))


def test_published_ssim_inflation_on_shipped_images(bicubic):
    inflation = {(d, s): bicubic[s][d]['mean']['ssim_ssiu_code'] - bicubic[s][d]['mean']['ssim']
                 for s in (2, 4) for d in ('Set5', 'Set14')}
    assert all(0 < value < 0.01 for value in inflation.values()), inflation
    assert all(0.0005 < inflation[(d, 2)] < inflation[(d, 4)] for d in ('Set5', 'Set14')), inflation
    assert 0.002 < inflation[('Set5', 4)] < 0.005, inflation
    # In float64 only the Y offset acts: smaller, still an inflation.
    offset_only = []
    for _, hr_path, lr_path in benchmark_pairs(BENCH, 'Set5', 4):
        lr = read_image(lr_path)
        hr = read_image(hr_path)[:lr.shape[0] * 4, :lr.shape[1] * 4]
        offset_only.append(published_ssim(bicubic_upscale(lr, 4), hr, crop_border=4, dtype=np.float64))
    offset_inflation = np.mean(offset_only) - bicubic[4]['Set5']['mean']['ssim']
    assert 0.0002 < offset_inflation < inflation[('Set5', 4)], offset_inflation


def test_published_ssim_ignores_luminance():
    """The Y offset makes SSIM blind to a brightness shift that BasicSR's SSIM sees."""
    hr = read_image(BENCH / 'Set5' / 'HR' / 'bird.png')
    brighter = np.clip(hr.astype(np.int16) + 40, 0, 255).astype(np.uint8)
    assert published_ssim(hr, hr, crop_border=4) == pytest.approx(1.0, abs=1e-6)
    basicsr_value = calculate_ssim(brighter, hr, crop_border=4, test_y_channel=True)
    published_value = published_ssim(brighter, hr, crop_border=4, dtype=np.float64)
    assert basicsr_value < 0.97 and published_value > 0.99


def test_published_table_data():
    entries = load_published()
    by_key = {(e.method, e.scale): e for e in entries}
    assert [sum(e.scale == s for e in entries) for s in (2, 3, 4)] == [15, 14, 16]
    ssiu = by_key[('SSIU', 2)]
    assert (ssiu.params_k, ssiu.macs_g, ssiu.psnr['Urban100'], ssiu.ssim['Manga109']) == (778, 164, 33.25, 0.9822)
    assert all(e.marks.get((d, 'ssim')) == '†' for e in entries if e.method == 'SSIU' for d in DATASETS)
    assert by_key[('ECBSR-M', 4)].psnr.keys() == {'Set5', 'Set14', 'B100', 'Urban100'}
    idsa = by_key[('IDSA-Net', 4)]
    assert (idsa.params_k, idsa.macs_g, idsa.ssim) == (752, None, {})
    assert [idsa.psnr[d] for d in DATASETS[:4]] == [32.47, 28.84, 27.72, 26.57]
    assert '10.13374/j.issn2095-9389.2025.10.24.003' in idsa.source
    for e in entries:
        assert re.search(r'20[0-2]\d', e.source), e
        if e.method not in ('SSIU', 'IDSA-Net'):
            assert e.ssim_protocol == 'reported' and "as reported in the SSIU paper's" in e.source, e


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


@pytest.mark.parametrize('content, expected', [
    ('{"name": ', 'not valid JSON'),
    ([1, 2], 'expected a JSON object'),
    ({k: v for k, v in _result().items() if k != 'mean'}, "missing key(s) mean"),
    ({**_result(), 'scale': '4'}, '"scale" must be a positive integer'),
    ({**_result(), 'mean': {'psnr': 'high', 'ssim': 0.9}}, '"mean" must give a number'),
    ({**_result(), 'images': [{'psnr': 30.0}]}, '"images" must be a list'),
])
def test_malformed_results_file_is_named(tmp_path, content, expected):
    path = _write(tmp_path / 'metrics_bad.json', content)
    message = _exit_message(['results', '--results', path])
    assert message.startswith(f'ssiu results: {path}: ') and expected in message


def test_missing_results_file_is_named(tmp_path):
    path = str(tmp_path / 'results' / 'metrics_Set5.json')
    assert f'{path}: no such results file' in _exit_message(['results', '--results', path])


def test_same_run_twice_names_both_files_and_iterations_get_rows(tmp_path):
    first = _write(tmp_path / 'a.json', _result(iter_=1000))
    again = _write(tmp_path / 'b.json', _result(iter_=1000))
    message = _exit_message(['results', '--results', first, again])
    assert first in message and again in message
    later = _write(tmp_path / 'c.json', _result(iter_=2000, psnr=32.9))
    entries = entries_from_results([(first, _result(iter_=1000)), (later, _result(iter_=2000, psnr=32.9))])
    assert sorted((e.method, e.psnr['Set5']) for e in entries) == [('my_SSIU @1000', 32.7), ('my_SSIU @2000', 32.9)]


def test_bicubic_reports_missing_folders_and_lr_images(tmp_path):
    root = tmp_path / 'benchmark'
    shutil.copytree(BENCH / 'Set5', root / 'Set5')
    (root / 'Set5' / 'LR_bicubic' / 'X3' / 'birdx3.png').unlink()
    with pytest.raises(ResultsError, match=r'no LR image for 1 HR image\(s\): bird\.png \(expected .*birdx3\.png\)'):
        benchmark_pairs(root, 'Set5', 3)
    assert len(benchmark_pairs(root, 'Set5', 2)) == 5
    with pytest.raises(ResultsError, match=re.escape(f'{root / "B100"}: dataset folder not found')):
        evaluate_bicubic(root, 2, ['B100'])
    shutil.rmtree(root / 'Set5' / 'LR_bicubic' / 'X4')
    with pytest.raises(ResultsError, match=re.escape(f'{root / "Set5" / "LR_bicubic" / "X4"}: folder not found')):
        evaluate_bicubic(root, 4, ['Set5'])
    message = _exit_message(['results', '--scale', '2', '--bicubic-root', str(tmp_path / 'nothing')])
    assert str(tmp_path / 'nothing') in message and 'none of Set5' in message


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


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_test_options_read_the_uncropped_benchmark(scale):
    with open(REPO / 'options' / f'test_SSIU_x{scale}.yml', encoding='utf-8') as f:
        opt = yaml.load(f, Loader=ordered_yaml()[0])
    assert (opt['model_type'], opt['scale'], opt['network_g']['type'], opt['network_g']['upscale']) == (
        'SSIUModel', scale, 'SSIU', scale)
    assert opt['path']['pretrain_network_g'] == f'experiments/pretrained_models/SSIU_x{scale}.pth'
    assert opt['path']['strict_load_g'] is True and opt['val']['save_img'] is True
    assert {k: (v['type'], v['crop_border'], v['test_y_channel']) for k, v in opt['val']['metrics'].items()} == {
        'psnr': ('calculate_psnr', scale, True), 'ssim': ('calculate_ssim', scale, True)}
    assert [d['name'] for d in opt['datasets'].values()] == list(DATASETS)
    for key, dataset in opt['datasets'].items():
        assert key.startswith('test_') and dataset['filename_tmpl'] == f'{{}}x{scale}'
        assert dataset['dataroot_lq'] == f'datasets/benchmark/{dataset["name"]}/LR_bicubic/X{scale}'
        if dataset['name'] not in ('Set5', 'Set14'):
            continue
        dataset = {**dataset, 'phase': 'test', 'scale': scale,
                   'dataroot_gt': str(BENCH / dataset['name'] / 'HR'),
                   'dataroot_lq': str(BENCH / dataset['name'] / 'LR_bicubic' / f'X{scale}')}
        for item in build_dataset(dataset):
            lq, gt = item['lq'], item['gt']
            assert gt.shape[1:] == (lq.shape[1] * scale, lq.shape[2] * scale), item['gt_path']
            hr = read_image(Path(item['gt_path']))
            assert hr.shape[0] >= gt.shape[1] and hr.shape[1] >= gt.shape[2]


def test_basicsr_test_writes_results_that_ssiu_results_reads(tmp_path, capsys):
    """``basicsr test`` with the x4 options (a small random SSIU, Set5 only) feeds ``ssiu results``."""
    with open(REPO / 'options' / 'test_SSIU_x4.yml', encoding='utf-8') as f:
        opt = yaml.load(f, Loader=ordered_yaml()[0])
    opt['network_g'].update(num_feat=8, num_block=1, num_heads=2)
    opt['datasets'] = {'test_1': {**opt['datasets']['test_1'], 'dataroot_gt': str(BENCH / 'Set5' / 'HR'),
                                  'dataroot_lq': str(BENCH / 'Set5' / 'LR_bicubic' / 'X4')}}
    weights = tmp_path / 'experiments' / 'pretrained_models' / 'SSIU_x4.pth'
    weights.parent.mkdir(parents=True)
    torch.save({'params': SSIU(upscale=4, num_feat=8, num_block=1, num_heads=2).state_dict()}, weights)
    options = tmp_path / 'test.yml'
    options.write_text(yaml.dump(json.loads(json.dumps(opt)), sort_keys=False), encoding='utf-8')
    subprocess.run([sys.executable, '-m', 'ssiu_arch.tools.test', '-opt', str(options)], cwd=tmp_path, check=True,
                   capture_output=True, timeout=600)
    results = tmp_path / 'results' / 'test_SSIU_x4'
    assert len(list((results / 'visualization' / 'Set5').glob('*.png'))) == 5
    assert ssiu_main(['results', '--results', str(results / 'metrics_Set5.json'), '--scale', '4']) == 0
    doc = json.loads((results / 'metrics_Set5.json').read_text(encoding='utf-8'))
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith('| test_SSIU_x4 '))
    assert f'{doc["mean"]["psnr"]:.2f} / {doc["mean"]["ssim"]:.4f}' in row and len(doc['images']) == 5
