"""SSIUModel training-step options: ``network_g_compile`` and ``train.mixed_precision``."""
from __future__ import annotations

import math
from pathlib import Path

import cv2
import pytest
import torch
import torch.distributed as dist
from basicsr.data.paired_image_dataset import PairedImageDataset
from basicsr.models import build_model
from conftest import SET5, read_rgb, training_batch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from ssiu_arch.archs.ssiu_arch import SSIU
from ssiu_arch.utils.weights import read_checkpoint

NETWORK = {'type': 'SSIU', 'upscale': 2, 'num_feat': 16, 'num_block': 1}  # one step keeps compiling quick


def make_opt(tmp_path: Path, network_g_compile=False, **train) -> dict:
    """Options of a tiny SSIU trained with the published recipe (AdamW, L1 + 0.01 FFT) on the CPU."""
    opt = {
        'name': 'tiny', 'model_type': 'SSIUModel', 'scale': 2, 'num_gpu': 0, 'is_train': True, 'dist': False,
        'rank': 0, 'world_size': 1, 'network_g': dict(NETWORK), 'network_g_compile': network_g_compile,
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {
            'ema_decay': 0,
            'optim_g': {'type': 'AdamW', 'lr': 1e-3, 'betas': [0.9, 0.99], 'weight_decay': 1e-4},
            'scheduler': {'type': 'CosineAnnealingRestartLR', 'periods': [10], 'restart_weights': [1],
                          'eta_min': 1e-6},
            'total_iter': 10, 'warmup_iter': -1,
            'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0},
            'fft_opt': {'type': 'FFTLoss', 'loss_weight': 0.01},
            **train,
        },
        'val': {'save_img': False, 'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 2,
                                                        'test_y_channel': True}}},
    }
    for key in ('models', 'training_states', 'log', 'visualization'):
        opt['path'][key] = str(tmp_path / key)
        (tmp_path / key).mkdir(exist_ok=True)
    return opt


def odd_size_val_loader(tmp_path: Path) -> DataLoader:
    """A validation set of one 19x23 LR image (38x46 HR): sides that are neither even nor multiples of 16."""
    for folder, img, scale in (('lq', 'LR_bicubic/X2/babyx2.png', 1), ('gt', 'HR/baby.png', 2)):
        (tmp_path / folder).mkdir()
        full = cv2.imread(str(SET5 / img), cv2.IMREAD_COLOR)
        cv2.imwrite(str(tmp_path / folder / 'baby.png'), full[40 * scale:59 * scale, 30 * scale:53 * scale])
    dataset = PairedImageDataset({'name': 'Odd', 'dataroot_gt': str(tmp_path / 'gt'), 'dataroot_lq': str(tmp_path /
                                  'lq'), 'filename_tmpl': '{}', 'io_backend': {'type': 'disk'}, 'phase': 'val',
                                  'scale': 2})
    return DataLoader(dataset, batch_size=1)


def step_losses_and_grads(model) -> tuple[dict, dict]:
    model.feed_data(training_batch(16))
    model.optimize_parameters(1)
    grads = {name: p.grad.clone() for name, p in model.get_bare_model(model.net_g).named_parameters()}
    return dict(model.get_current_log()), grads


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@pytest.mark.slow
def test_compiled_training_validates_at_odd_size_and_saves_plain_keys(tmp_path):
    model = build_model(make_opt(tmp_path, network_g_compile={'dynamic': False}, ema_decay=0.9))
    assert model.net_g_train is not model.net_g and isinstance(model.net_g, SSIU)
    before = {k: v.clone() for k, v in model.net_g.state_dict().items()}
    model.feed_data(training_batch(16))
    for it in (1, 2):
        model.update_learning_rate(it)
        model.optimize_parameters(it)
        assert all(math.isfinite(v) for v in model.get_current_log().values())
    assert any(not torch.equal(v, before[k]) for k, v in model.net_g.state_dict().items())
    # EMA follows the plain module: 0.9 of its start plus 0.1 of the trained weights, step after step
    assert not torch.equal(model.net_g_ema.head.weight, before['head.weight'])

    model.validation(odd_size_val_loader(tmp_path), current_iter=2, tb_logger=None, save_img=False)
    assert math.isfinite(model.metric_results['psnr']) and model.metric_results['psnr'] > 20
    with torch.no_grad():
        lq = read_rgb(tmp_path / 'lq' / 'baby.png')[None]
        assert model.net_g_ema(lq).shape[-2:] == (38, 46)

    model.save(epoch=0, current_iter=2)
    (path,) = (tmp_path / 'models').glob('net_g_2.*')
    for key in ('params', 'params_ema'):
        state = read_checkpoint(path, key)[0]
        assert not any('_orig_mod' in k for k in state)
        SSIU(upscale=2, num_feat=16, num_block=1).load_state_dict(state, strict=True)
    assert all(torch.equal(v, model.net_g.state_dict()[k]) for k, v in read_checkpoint(path, 'params')[0].items())


@pytest.mark.slow
def test_compiled_step_matches_eager(tmp_path):
    eager = build_model(make_opt(tmp_path))
    compiled = build_model(make_opt(tmp_path, network_g_compile=True))
    compiled.net_g.load_state_dict(eager.net_g.state_dict())
    eager_log, eager_grads = step_losses_and_grads(eager)
    compiled_log, compiled_grads = step_losses_and_grads(compiled)
    for name, value in eager_log.items():
        assert compiled_log[name] == pytest.approx(value, rel=1e-5), name
    for name, grad in eager_grads.items():
        assert relative(compiled_grads[name], grad) <= 1e-5, name


def test_under_ddp_the_compiled_network_is_inside_ddp_and_validation_and_saving_stay_plain(tmp_path):
    dist.init_process_group('gloo', init_method=f'file://{tmp_path / "store"}', rank=0, world_size=1)
    try:
        opt = make_opt(tmp_path, network_g_compile=True)
        opt['dist'] = True
        model = build_model(opt)
        assert isinstance(model.net_g, DistributedDataParallel) and model.net_g_train is model.net_g
        assert model.net_g.module is not model.get_bare_model(model.net_g)
        assert isinstance(model.get_bare_model(model.net_g), SSIU)
        model.validation(odd_size_val_loader(tmp_path), current_iter=0, tb_logger=None, save_img=False)
        assert math.isfinite(model.metric_results['psnr'])
        model.save(epoch=0, current_iter=0)
        (path,) = (tmp_path / 'models').glob('net_g_0.*')
        SSIU(upscale=2, num_feat=16, num_block=1).load_state_dict(read_checkpoint(path, 'params')[0], strict=True)
    finally:
        dist.destroy_process_group()


def test_bf16_autocast_on_cpu_trains_with_finite_float32_losses(tmp_path):
    model = build_model(make_opt(tmp_path, mixed_precision='bf16'))
    assert model.amp_dtype == torch.bfloat16 and model.grad_scaler is None
    dtypes = []
    model.net_g.register_forward_pre_hook(
        lambda module, args: dtypes.append(torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu')))
    model.feed_data(training_batch(16))
    before = model.net_g.head.weight.clone()
    for it in (1, 2):
        model.optimize_parameters(it)
        log = model.get_current_log()
        assert list(log) == ['l_pix', 'l_fft', 'l_total'] and all(math.isfinite(v) for v in log.values()), log
        assert model.output.dtype == torch.float32
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    assert not torch.equal(model.net_g.head.weight, before)
    assert model.net_g.head.weight.dtype == torch.float32
    # validation stays float32
    model.feed_data(training_batch(16))
    model.test()
    assert model.output.dtype == torch.float32 and dtypes[-1] is False


@pytest.mark.parametrize('speedup, warned', [(0.57, True), (None, True), (2.1, False)])
def test_bf16_training_warns_where_bfloat16_does_not_pay_on_the_cpu(tmp_path, monkeypatch, speedup, warned):
    import logging

    from ssiu_arch.models import ssiu_model
    from ssiu_arch.utils.cpu_features import BF16_MIN_SPEEDUP
    monkeypatch.setattr(ssiu_model, 'bf16_product_speedup', lambda: speedup)
    monkeypatch.setattr(ssiu_model, 'bf16_pays', lambda: speedup is not None and speedup >= BF16_MIN_SPEEDUP)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger('basicsr').addHandler(handler)
    try:
        build_model(make_opt(tmp_path, mixed_precision='bf16'))
    finally:
        logging.getLogger('basicsr').removeHandler(handler)
    messages = [r.getMessage() for r in records if r.levelno == logging.WARNING]
    assert any('train.mixed_precision: bf16 on this CPU' in m for m in messages) == warned, messages
    if speedup == 0.57:
        assert any('0.57x the float32 rate' in m for m in messages)


def test_bf16_autocast_with_aux_losses(tmp_path):
    model = build_model(make_opt(tmp_path, mixed_precision='bf16',
                                 ssim_opt={'type': 'SSIMUnfoldingLoss', 'loss_weight': 0.1,
                                           'step_weights': [0.1, 0.1, 0.1]},
                                 moe_opt={'type': 'MoELoadBalancingLoss', 'loss_weight': 0.01}))
    model.feed_data(training_batch(16))
    model.optimize_parameters(1)
    assert all(math.isfinite(v) for v in model.get_current_log().values())


@pytest.mark.parametrize('train, compile_opt, message', [
    ({'mixed_precision': 'fp16'}, False, 'train.mixed_precision: fp16 needs a CUDA device'),
    ({'mixed_precision': 'fp8'}, False, "train.mixed_precision: expected false, bf16 or fp16, got 'fp8'"),
    ({}, 'yes', "network_g_compile: expected true, false or a dict of torch.compile keywords, got 'yes'"),
    ({}, {'fullgraf': True}, 'network_g_compile.fullgraf: not a torch.compile keyword'),
    ({'retain_freed_memory': 'yes'}, False, "train.retain_freed_memory: expected true or false, got 'yes'"),
])
def test_bad_training_step_options_name_the_key(tmp_path, train, compile_opt, message):
    with pytest.raises(ValueError, match=message.replace('.', r'\.')) as err:
        build_model(make_opt(tmp_path, network_g_compile=compile_opt, **train))
    assert '\n' not in str(err.value)


def test_options_off_keep_the_eager_float32_step(tmp_path):
    model = build_model(make_opt(tmp_path, network_g_compile=None, mixed_precision=False))
    assert model.net_g_train is model.net_g and model.amp_dtype is None and model.grad_scaler is None


def test_cpu_training_keeps_freed_memory_for_reuse(tmp_path, monkeypatch):
    from ssiu_arch.cpu import memory

    calls = []
    monkeypatch.setattr('ssiu_arch.models.ssiu_model.retain_freed_memory', lambda: calls.append(1) or True)
    build_model(make_opt(tmp_path, retain_freed_memory=False))
    assert calls == []
    build_model(make_opt(tmp_path))
    assert calls == [1]
    assert memory.retain_freed_memory() in (True, False)  # the real call works where glibc is (or is not)
