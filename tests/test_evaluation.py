"""The measured bicubic baseline, the published-SSIM check, the published table and the test option files."""
from __future__ import annotations

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
from ssiu_arch.evaluation.bicubic import bicubic_upscale, evaluate_bicubic, read_image
from ssiu_arch.evaluation.datasets import DATASETS, benchmark_pairs
from ssiu_arch.evaluation.errors import ResultsError
from ssiu_arch.evaluation.metrics_schema import read_metrics
from ssiu_arch.evaluation.published import load_published
from ssiu_arch.evaluation.published_ssim import published_ssim
from ssiu_arch.tools.cli import ssiu_main

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
    doc = read_metrics(results / 'metrics_Set5.json', scale=4, required_metrics=('psnr', 'ssim'))
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith('| test_SSIU_x4 '))
    assert f'{doc["mean"]["psnr"]:.2f} / {doc["mean"]["ssim"]:.4f}' in row and len(doc['images']) == 5


def test_evaluation_reads_images_as_basicsr_validation_does(tmp_path):
    import cv2
    import numpy as np
    from basicsr.utils import imfrombytes

    import ssiu_arch.models  # noqa: F401  (compatibility fixes before basicsr is imported)

    rng = np.random.default_rng(0)
    made = {'gray.png': rng.integers(0, 256, (7, 9), dtype=np.uint8),
            'rgba.png': rng.integers(0, 256, (7, 9, 4), dtype=np.uint8),
            'deep.png': rng.integers(0, 65536, (7, 9, 3), dtype=np.uint16)}
    for name, img in made.items():
        cv2.imwrite(str(tmp_path / name), img)
    paths = [*(tmp_path / name for name in made), *sorted((BENCH / 'Set14' / 'HR').glob('*.png'))]
    for path in paths:
        assert np.array_equal(read_image(path), imfrombytes(path.read_bytes(), flag='color')), path.name
