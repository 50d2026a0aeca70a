"""SSIUModel: losses from YAML, optimizers, scheduler, CPU DDP, atomic checkpoints, per-image metrics."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import pytest
import torch
import torch.distributed as dist
import yaml
from basicsr.data.paired_image_dataset import PairedImageDataset
from basicsr.metrics import calculate_psnr, calculate_ssim
from basicsr.models import build_model
from basicsr.utils import scandir, tensor2img
from basicsr.utils.registry import MODEL_REGISTRY
from conftest import training_batch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ssiu_arch.archs.ssiu_arch import SSIU
from ssiu_arch.evaluation.metrics_schema import read_metrics
from ssiu_arch.models.ssiu_model import SSIUModel

BENCHMARK = Path(__file__).parent / 'data' / 'benchmark'

OPTIONS = """
name: tiny_ssiu_x2
model_type: SSIUModel
scale: 2
num_gpu: 0
network_g: {type: SSIU, upscale: 2, num_feat: 16, num_block: 3}
path: {pretrain_network_g: ~, strict_load_g: true, resume_state: ~}
train:
  ema_decay: 0
  optim_g: {type: AdamW, lr: !!float 2e-3, betas: [0.9, 0.99], weight_decay: !!float 1e-4}
  scheduler: {type: CosineAnnealingRestartLR, periods: [20], restart_weights: [1], eta_min: !!float 1e-6}
  total_iter: 20
  warmup_iter: -1
  pixel_opt: {type: L1Loss, loss_weight: 1.0, reduction: mean}
  fft_opt: {type: FFTLoss, loss_weight: 0.01}
  ssim_opt: {type: SSIMUnfoldingLoss, loss_weight: 0.1, step_weights: [0.1, 0.1, 0.1], y_channel: true}
  moe_opt: {type: MoELoadBalancingLoss, loss_weight: 0.01}
val:
  val_freq: 10
  save_img: false
  metrics:
    psnr: {type: calculate_psnr, crop_border: 2, test_y_channel: true}
    ssim: {type: calculate_ssim, crop_border: 2, test_y_channel: true}
"""


def make_opt(tmp_path: Path, is_train: bool = True, **train_overrides) -> dict:
    opt = yaml.safe_load(OPTIONS)
    opt['train'].update(train_overrides)
    opt['train'] = {k: v for k, v in opt['train'].items() if v is not None}
    opt.update(is_train=is_train, dist=False, rank=0, world_size=1)
    for key in ('models', 'training_states', 'log', 'visualization'):
        opt['path'][key] = str(tmp_path / key)
        (tmp_path / key).mkdir(exist_ok=True)
    return opt


def test_all_four_losses_logged_finite_and_decreasing(tmp_path):
    model = build_model(make_opt(tmp_path))
    assert isinstance(model, SSIUModel) and MODEL_REGISTRY.get('SSIUModel') is SSIUModel
    assert model.use_aux
    model.feed_data(training_batch())
    totals = []
    for it in range(1, 7):
        model.update_learning_rate(it)
        model.optimize_parameters(it)
        log = model.get_current_log()
        assert list(log) == ['l_pix', 'l_fft', 'l_ssim', 'l_moe', 'l_total']
        assert all(math.isfinite(v) for v in log.values()), log
        assert log['l_total'] == pytest.approx(log['l_pix'] + log['l_fft'] + log['l_ssim'] + log['l_moe'], rel=1e-5)
        totals.append(log['l_total'])
    assert totals[-1] < totals[0], totals


def test_published_recipe_calls_network_without_aux(tmp_path, monkeypatch):
    model = build_model(make_opt(tmp_path, ssim_opt=None, moe_opt=None))
    assert not model.use_aux and model.cri_ssim is None and model.cri_moe is None
    calls = []
    forward = SSIU.forward
    monkeypatch.setattr(SSIU, 'forward', lambda self, x, **kw: calls.append(kw) or forward(self, x, **kw))
    model.feed_data(training_batch(16))
    model.optimize_parameters(1)
    assert calls == [{}] and list(model.get_current_log()) == ['l_pix', 'l_fft', 'l_total']
    # SSIM on the final output only: still no aux outputs needed
    model = build_model(make_opt(tmp_path, pixel_opt=None, fft_opt=None, moe_opt=None,
                                 ssim_opt={'type': 'SSIMUnfoldingLoss'}))
    assert not model.use_aux


def test_the_first_step_records_whether_the_cpu_engine_trains(tmp_path):
    model = build_model(make_opt(tmp_path))  # 16 features in 4 heads: heads the engine's training path lacks
    model.feed_data(training_batch(16))
    model.optimize_parameters(1)
    assert model.training_forward == "the network's own modules"
    opt = make_opt(tmp_path)
    opt['network_g'].update(num_feat=64, num_block=1)  # heads of 16 channels
    model = build_model(opt)
    model.feed_data(training_batch(16))
    model.optimize_parameters(1)
    assert model.training_forward == "the CPU engine's training path (ssiu_arch/cpu/training.py)"
    opt['train']['mixed_precision'] = 'bf16'  # autocast training: the modules, as autocast has them
    model = build_model(opt)
    model.feed_data(training_batch(16))
    model.optimize_parameters(1)
    assert model.training_forward == "the network's own modules"


@pytest.mark.parametrize('optim, cls, expected', [
    ({'type': 'AdamW', 'lr': 1e-3, 'betas': [0.9, 0.99], 'weight_decay': 1e-4}, torch.optim.AdamW,
     {'betas': (0.9, 0.99), 'weight_decay': 1e-4}),
    ({'type': 'Adam', 'lr': 2e-4, 'betas': [0.9, 0.999]}, torch.optim.Adam, {'betas': (0.9, 0.999)}),
    ({'type': 'SGD', 'lr': 0.1, 'momentum': 0.9}, torch.optim.SGD, {'momentum': 0.9}),
])
def test_optimizers_from_options(tmp_path, optim, cls, expected):
    model = build_model(make_opt(tmp_path, optim_g=optim))
    assert type(model.optimizer_g) is cls
    group = model.optimizer_g.param_groups[0]
    assert group['initial_lr'] == optim['lr']
    for key, value in expected.items():
        assert tuple(group[key]) == value if isinstance(value, tuple) else group[key] == value


def test_bad_optimizer_and_missing_losses_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"train.optim_g.type: unknown optimizer 'AdamX'.*AdamW"):
        build_model(make_opt(tmp_path, optim_g={'type': 'AdamX', 'lr': 1e-3}))
    with pytest.raises(ValueError, match=r'train.optim_g: cannot build torch.optim.AdamW.*bogus'):
        build_model(make_opt(tmp_path, optim_g={'type': 'AdamW', 'lr': 1e-3, 'bogus': 1}))
    with pytest.raises(ValueError, match='no loss configured.*train.pixel_opt, train.fft_opt, train.ssim_opt, '
                                         'train.moe_opt'):
        build_model(make_opt(tmp_path, pixel_opt=None, fft_opt=None, ssim_opt=None, moe_opt=None))
    with pytest.raises(ValueError, match='train.perceptual_opt: SSIUModel does not use this loss'):
        build_model(make_opt(tmp_path, perceptual_opt={'type': 'PerceptualLoss'}))
    with pytest.raises(ValueError, match="train.fft_opt.reduction: 'none'"):
        build_model(make_opt(tmp_path, fft_opt={'type': 'FFTLoss', 'reduction': 'none'}))


def test_single_period_cosine_restart_is_the_published_cosine_schedule(tmp_path):
    total = 20
    model = build_model(make_opt(tmp_path, optim_g={'type': 'AdamW', 'lr': 1e-3}))
    reference_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(reference_opt, T_max=total, eta_min=1e-6)
    for it in range(1, total + 1):
        model.update_learning_rate(it)
        if it > 1:
            reference_opt.step()
            reference.step()
        assert model.get_current_learning_rate()[0] == pytest.approx(reference.get_last_lr()[0], rel=1e-9, abs=1e-15)
    closed_form = 1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * (total - 1) / total))
    assert model.get_current_learning_rate()[0] == pytest.approx(closed_form)
    model.schedulers[0].step()
    assert model.get_current_learning_rate()[0] == pytest.approx(1e-6)  # eta_min at the end of the period


def test_save_network_atomic_and_loadable(tmp_path, monkeypatch):
    model = build_model(make_opt(tmp_path))
    model.save(epoch=0, current_iter=7)
    models, states = tmp_path / 'models', tmp_path / 'training_states'
    assert sorted(p.name for p in models.iterdir()) == ['net_g_7.pth']
    assert sorted(p.name for p in states.iterdir()) == ['7.state']
    ckpt = torch.load(models / 'net_g_7.pth', weights_only=True)
    net = SSIU(upscale=2, num_feat=16, num_block=3)
    net.load_state_dict(ckpt['params'], strict=True)
    state = torch.load(states / '7.state', weights_only=True)  # states hold tensors and plain values only
    assert state['iter'] == 7 and len(state['optimizers']) == len(state['schedulers']) == 1

    # a save that dies half-way leaves the previous files as they were and no temporary file
    before = {p: p.read_bytes() for p in (models / 'net_g_7.pth', states / '7.state')}

    def broken_save(obj, f, *args, **kwargs):
        Path(f).write_bytes(b'half-written')
        raise OSError('disk full')

    monkeypatch.setattr(torch, 'save', broken_save)
    monkeypatch.setattr('ssiu_arch.models.ssiu_model.time.sleep', lambda s: None)
    model.save(epoch=0, current_iter=7)
    assert {p: p.read_bytes() for p in before} == before
    assert sorted(p.name for p in models.iterdir()) == ['net_g_7.pth']
    assert list(scandir(str(states), suffix='.state')) == ['7.state']


def test_cpu_distributed_wraps_without_device_ids(tmp_path):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        opt = make_opt(tmp_path)
        opt['dist'] = True
        model = build_model(opt)
        assert isinstance(model.net_g, DistributedDataParallel) and model.net_g.device_ids is None
        model.feed_data(training_batch(16))
        model.optimize_parameters(1)
        assert all(math.isfinite(v) for v in model.get_current_log().values())
        model.save(epoch=0, current_iter=1)
        assert (tmp_path / 'models' / 'net_g_1.pth').is_file()
    finally:
        dist.destroy_process_group()


@pytest.fixture
def val_loader(tmp_path):
    """Three real X2 pairs cropped to an LR size that is not a multiple of the network's 16."""
    (tmp_path / 'val' / 'HR').mkdir(parents=True)
    (tmp_path / 'val' / 'LR').mkdir()
    for name in ('baby', 'bird', 'woman'):
        lr = cv2.imread(str(BENCHMARK / 'Set5' / 'LR_bicubic' / 'X2' / f'{name}x2.png'))[20:60, 30:66]
        hr = cv2.imread(str(BENCHMARK / 'Set5' / 'HR' / f'{name}.png'))[40:120, 60:132]
        cv2.imwrite(str(tmp_path / 'val' / 'LR' / f'{name}x2.png'), lr)
        cv2.imwrite(str(tmp_path / 'val' / 'HR' / f'{name}.png'), hr)
    dataset = PairedImageDataset({
        'name': 'TinySet5', 'type': 'PairedImageDataset', 'phase': 'val', 'scale': 2,
        'dataroot_gt': str(tmp_path / 'val' / 'HR'), 'dataroot_lq': str(tmp_path / 'val' / 'LR'),
        'filename_tmpl': '{}x2', 'io_backend': {'type': 'disk'}})
    return DataLoader(dataset, batch_size=1, shuffle=False)


def test_validation_writes_per_image_metrics(tmp_path, val_loader):
    model = build_model(make_opt(tmp_path))
    model.validation(val_loader, current_iter=10, tb_logger=None, save_img=False)
    record = json.loads((tmp_path / 'log' / 'metrics_TinySet5.json').read_text())
    assert read_metrics(tmp_path / 'log' / 'metrics_TinySet5.json', scale=2, required_metrics=('psnr',)) == record
    assert list(record) == ['name', 'model', 'scale', 'dataset', 'crop_border', 'test_y_channel', 'iter',
                            'metrics', 'images', 'mean']
    assert record['name'] == 'tiny_ssiu_x2' and record['model'] == 'SSIU' and record['scale'] == 2
    assert record['dataset'] == 'TinySet5' and record['crop_border'] == 2 and record['test_y_channel'] is True
    assert record['iter'] == 10 and record['metrics'] == ['psnr', 'ssim']
    assert sorted(row['name'] for row in record['images']) == ['babyx2', 'birdx2', 'womanx2']

    net = model.get_bare_model(model.net_g).eval()
    for row, data in zip(record['images'], val_loader.dataset):  # the loader does not shuffle
        assert row['name'] == Path(data['lq_path']).stem
        with torch.no_grad():
            sr = tensor2img([net(data['lq'][None])])
        gt = tensor2img([data['gt']])
        assert sr.shape == gt.shape == (80, 72, 3)
        assert row['psnr'] == calculate_psnr(sr, gt, crop_border=2, test_y_channel=True)
        assert row['ssim'] == calculate_ssim(sr, gt, crop_border=2, test_y_channel=True)
    for metric in ('psnr', 'ssim'):
        mean = sum(row[metric] for row in record['images']) / 3
        assert record['mean'][metric] == pytest.approx(mean, rel=1e-12)
        assert model.metric_results[metric] == record['mean'][metric]
        assert model.best_metric_results['TinySet5'][metric]['iter'] == 10

    with open(tmp_path / 'log' / 'metrics_TinySet5.csv', newline='') as f:
        rows = list(csv.DictReader(f))
    assert [r['name'] for r in rows] == [row['name'] for row in record['images']]
    assert [float(r['psnr']) for r in rows] == [row['psnr'] for row in record['images']]
    assert [float(r['ssim']) for r in rows] == [row['ssim'] for row in record['images']]

    # rewritten at the next validation, with no temporary file left beside it
    model.validation(val_loader, current_iter=20, tb_logger=None, save_img=False)
    assert json.loads((tmp_path / 'log' / 'metrics_TinySet5.json').read_text())['iter'] == 20
    assert sorted(p.name for p in (tmp_path / 'log').iterdir()) == ['metrics_TinySet5.csv', 'metrics_TinySet5.json']


class PlainUpsampler(torch.nn.Module):
    """A network that needs inputs whose sides are multiples of ``pad_multiple``."""

    pad_multiple = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 12, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2] % 8 or x.shape[-1] % 8:
            raise ValueError(f'input {tuple(x.shape)} not a multiple of 8')
        return torch.nn.functional.pixel_shuffle(self.conv(x), 2)


def test_test_pads_networks_with_pad_multiple(tmp_path):
    model = build_model(make_opt(tmp_path, is_train=False))
    model.net_g = PlainUpsampler()
    model.lq = torch.rand(1, 3, 13, 10)
    model.test()
    assert model.output.shape == (1, 3, 26, 20)
    torch.testing.assert_close(model.output, model.net_g(torch.nn.functional.pad(
        model.lq, (0, 6, 0, 3), mode='reflect'))[..., :26, :20])
    # SSIU pads itself: test() hands it the image as it is
    model = build_model(make_opt(tmp_path, is_train=False))
    model.lq = torch.rand(1, 3, 13, 10)
    model.test()
    with torch.no_grad():
        torch.testing.assert_close(model.output, model.net_g(model.lq))
