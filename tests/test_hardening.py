"""Untrusted input: crafted pickles and YAML tags run no code, bad option files and weights give one line."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
import torch
import yaml
from basicsr.models import build_model

from ssiu_arch.archs.ssiu_arch import SSIU
from ssiu_arch.models.compat import ResumeStateError, load_resume_state
from ssiu_arch.tools.cli import basicsr_main, ssiu_main
from ssiu_arch.tools.export import ExportError, export_onnx
from ssiu_arch.tools.infer import NonFiniteOutputError, upscale_image

SET14_HR = Path(__file__).parent / 'data' / 'benchmark' / 'Set14' / 'HR'


class _Payload:
    """Unpickling this calls ``open(marker, 'w')``: the marker file appears if any loader runs pickled code."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), 'w')


@pytest.fixture
def crafted(tmp_path) -> tuple[Path, Path]:
    """A torch.save file whose unpickling would create ``marker``; returns (file, marker)."""
    marker = tmp_path / 'code_ran'
    path = tmp_path / 'crafted.pth'
    torch.save({'params': _Payload(marker), 'iter': 10}, path)
    return path, marker


def tiny_net(**kwargs) -> SSIU:
    torch.manual_seed(0)
    return SSIU(upscale=2, num_feat=8, num_block=1, num_heads=2, **kwargs).eval()


def options(tmp_path: Path, name: str = 'hardening', **changes) -> dict:
    """A tiny valid training option dict (HR-only Set14, SSIU x2)."""
    opt = {
        'name': name, 'model_type': 'SSIUModel', 'scale': 2, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {'train': {'name': 'Set14', 'type': 'HROnlyBicubicDataset', 'dataroot_gt': str(SET14_HR),
                               'io_backend': {'type': 'disk'}, 'gt_size': 32, 'use_hflip': True, 'use_rot': True,
                               'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2, 'dataset_enlarge_ratio': 1}},
        'network_g': {'type': 'SSIU', 'upscale': 2, 'num_feat': 8, 'num_block': 1, 'num_heads': 2},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {'ema_decay': 0, 'optim_g': {'type': 'Adam', 'lr': 1e-3},
                  'scheduler': {'type': 'MultiStepLR', 'milestones': [100], 'gamma': 0.5},
                  'total_iter': 2, 'warmup_iter': -1, 'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}},
        'val': {'val_freq': 10, 'save_img': False,
                'metrics': {'psnr': {'type': 'calculate_psnr', 'crop_border': 2, 'test_y_channel': True}}},
        'logger': {'print_freq': 1, 'save_checkpoint_freq': 10, 'use_tb_logger': False},
    }
    opt.update(changes)
    return opt


def write_yaml(tmp_path: Path, opt: object, name: str = 'opt.yml') -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(opt, sort_keys=False) if opt is not None else '')
    return path


def train(tmp_path: Path, monkeypatch, yml: Path, *flags: str) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, 'argv', list(sys.argv))  # basicsr_main hands its arguments to BasicSR via sys.argv
    basicsr_main(['train', '-opt', str(yml), *flags])


# ------------------------------------------------------------------------------------------ crafted pickles


@pytest.mark.parametrize('command', ['infer', 'convert', 'export'])
def test_crafted_pickle_refused_by_commands(command, crafted, tmp_path):
    path, marker = crafted
    if command == 'infer':
        image = tmp_path / 'in.png'
        cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
        argv = ['infer', str(image), '-w', str(path), '-o', str(tmp_path / 'out')]
    elif command == 'convert':
        argv = ['convert', str(path), str(tmp_path / 'out.pth')]
    else:
        argv = ['export', str(path), '--onnx', str(tmp_path / 'out.onnx')]
    with pytest.raises(SystemExit) as exc:
        ssiu_main(argv)
    message = str(exc.value.code)
    assert f'ssiu {command}: ' in message and 'crafted.pth' in message and '\n' not in message
    assert not marker.exists()
    assert not any(p.name.startswith('out') for p in tmp_path.iterdir())


def test_crafted_pretrain_network_g_refused_by_ssiu_model(crafted, tmp_path):
    path, marker = crafted
    opt = options(tmp_path)
    opt['path'].update(pretrain_network_g=str(path))
    opt.update(is_train=True, dist=False, rank=0, world_size=1)
    with pytest.raises(Exception, match='(?i)weights.only|unpickl'):
        build_model(opt)
    assert not marker.exists()


@pytest.mark.parametrize('key', ['pretrain_network_g', 'resume_state'])
def test_crafted_file_in_options_refused_before_training(key, crafted, tmp_path, monkeypatch):
    path, marker = crafted
    opt = options(tmp_path)
    opt['path'][key] = str(path)
    with pytest.raises(SystemExit, match=rf'path\.{key}: .*crafted\.pth does not load as tensors only'):
        train(tmp_path, monkeypatch, write_yaml(tmp_path, opt))
    assert not marker.exists() and not (tmp_path / 'experiments').exists()


def test_crafted_state_refused_by_auto_resume(crafted, tmp_path, monkeypatch):
    path, marker = crafted
    states = tmp_path / 'experiments' / 'hardening' / 'training_states'
    states.mkdir(parents=True)
    path.rename(states / '10.state')
    with pytest.raises(SystemExit, match=r'10\.state: not a training state that loads as tensors only'):
        train(tmp_path, monkeypatch, write_yaml(tmp_path, options(tmp_path)), '--auto_resume')
    assert not marker.exists()
    assert sorted(p.name for p in states.parent.iterdir()) == ['training_states']  # nothing else was started


def test_resume_loader_reads_real_states_and_refuses_crafted_ones(crafted, tmp_path, monkeypatch):
    from basicsr.models.lr_scheduler import MultiStepRestartLR

    param = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    param.grad = torch.ones(3)
    optimizer.step()
    scheduler = MultiStepRestartLR(optimizer, milestones=[5, 9])  # milestones are a collections.Counter
    good = tmp_path / '4.state'
    torch.save({'epoch': 0, 'iter': 4, 'optimizers': [optimizer.state_dict()],
                'schedulers': [scheduler.state_dict()]}, good)
    monkeypatch.chdir(tmp_path)
    opt = {'name': 'x', 'auto_resume': False, 'path': {'resume_state': str(good), 'models': str(tmp_path)}}
    assert load_resume_state(opt)['iter'] == 4
    path, marker = crafted
    opt['path']['resume_state'] = str(path)
    with pytest.raises(ResumeStateError, match='crafted.pth'):
        load_resume_state(opt)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------- YAML tags


def test_python_yaml_tag_refused_before_basicsr_parses(tmp_path, monkeypatch):
    marker = tmp_path / 'code_ran'
    text = yaml.safe_dump(options(tmp_path), sort_keys=False)
    text = text.replace('manual_seed: 0', f"manual_seed: !!python/object/apply:builtins.open ['{marker}', 'w']")
    yml = tmp_path / 'evil.yml'
    yml.write_text(text)
    with pytest.raises(SystemExit, match=r"evil\.yml: line \d+, column \d+: tag 'tag:yaml.org,2002:python/object/apply"
                                         r":builtins.open' refused") as exc:
        train(tmp_path, monkeypatch, yml)
    assert str(exc.value.code).count('evil.yml') == 1
    assert not marker.exists()
    # BasicSR's own parser gets the safe loader too.
    from basicsr.utils.options import ordered_yaml

    with pytest.raises(yaml.constructor.ConstructorError), open(yml) as f:
        yaml.load(f, Loader=ordered_yaml()[0])  # noqa: S506 (the point: this loader is now safe)
    assert not marker.exists()


# ------------------------------------------------------------------------------------ option file problems


@pytest.mark.parametrize('change, message', [
    (lambda o, tmp: o.update(num_gpu=2), r'num_gpu: 2 but no CUDA device is available'),
    (lambda o, tmp: o.update(num_gpu=-1), r"num_gpu: -1; must be 'auto' or a whole number >= 0"),
    (lambda o, tmp: o['datasets']['train'].pop('dataroot_gt'), r'datasets\.train\.dataroot_gt: missing'),
    (lambda o, tmp: o['datasets'].update(val={'name': 'v', 'type': 'PairedImageDataset', 'dataroot_gt': str(tmp),
                                              'io_backend': {'type': 'disk'}}),
     r'datasets\.val\.dataroot_lq: missing; PairedImageDataset needs it'),
    (lambda o, tmp: o['val'].update(val_freq=0), r'val\.val_freq: 0; must be a whole number >= 1'),
    (lambda o, tmp: o['logger'].update(save_checkpoint_freq=0), r'logger\.save_checkpoint_freq: 0'),
    (lambda o, tmp: o.update(datasets={}), r'datasets: empty'),
    (lambda o, tmp: o.update(datasets={'val': {'name': 'v', 'type': 'PairedImageDataset', 'dataroot_gt': str(tmp),
                                               'dataroot_lq': str(tmp), 'io_backend': {'type': 'disk'}}}),
     r'datasets: no train set'),
    (lambda o, tmp: o['val']['metrics']['psnr'].update(type='calculate_psnrr'),
     r"val\.metrics\.psnr\.type: unknown metric type 'calculate_psnrr'"),
    (lambda o, tmp: o['train'].update(total_iter=0), r'train\.total_iter: 0; must be a whole number >= 1'),
    (lambda o, tmp: o['train'].update(total_iter=-5), r'train\.total_iter: -5'),
    (lambda o, tmp: o.update(name='../escape'), r"name: '\.\./escape'; must be a plain folder name"),
    (lambda o, tmp: o.update(name='a/b'), r"name: 'a/b'; must be a plain folder name"),
])
def test_bad_option_files_refused_before_any_work(change, message, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 0)
    opt = options(tmp_path)
    change(opt, tmp_path)
    yml = write_yaml(tmp_path, opt)
    with pytest.raises(SystemExit, match=message) as exc:
        train(tmp_path, monkeypatch, yml)
    text = str(exc.value.code)
    assert text.startswith(f'{yml}: ') and text.count('opt.yml') == 1 and '\n' not in text
    assert not (tmp_path / 'experiments').exists()


def test_force_yml_overrides_are_checked_as_basicsr_applies_them(tmp_path, monkeypatch):
    from ssiu_arch.models.options_check import check_options_file

    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 0)
    yml = str(write_yaml(tmp_path, options(tmp_path, num_gpu=1)))  # a GPU file, run on the CPU by an override
    with pytest.raises(SystemExit, match='num_gpu: 1 but no CUDA device is available'):
        check_options_file(['-opt', yml])
    check_options_file(['-opt', yml, '--force_yml', 'num_gpu=0', 'train:total_iter=8', 'train:scheduler:milestones=[4]',
                        'logger:use_tb_logger=false', 'name=forced'])
    for forced, message in [('train:total_iter=0', r'train\.total_iter: 0; must be a whole number >= 1'),
                            ('name=../up', r"name: '\.\./up'; must be a plain folder name"),
                            ('nosuch:key=1', r"--force_yml 'nosuch:key=1': nosuch is not a section"),
                            ('train:optim_g:lr:x=1', r"train\.optim_g\.lr is not a section"),
                            ('num_gpu', 'expected KEY'), ('a=b=c', 'expected KEY'),
                            ('val:val_freq=[1, oops]', 'not a list of plain values')]:
        with pytest.raises(SystemExit, match=message) as exc:
            check_options_file(['-opt', yml, '--force_yml', 'num_gpu=0', forced])
        assert str(exc.value.code).startswith(f'{yml}: ') and '\n' not in str(exc.value.code)


def test_empty_option_file(tmp_path, monkeypatch):
    yml = write_yaml(tmp_path, None)
    with pytest.raises(SystemExit, match=r'opt\.yml: empty option file'):
        train(tmp_path, monkeypatch, yml)


def test_valid_options_pass_the_checker(tmp_path):
    from ssiu_arch.models.options_check import check_options

    check_options(options(tmp_path))
    check_options(yaml.safe_load((Path(__file__).parents[1] / 'options' / 'demo_SSIU_x2.yml').read_text()))


# ----------------------------------------------------------------------------------------- malformed weights


@pytest.mark.parametrize('content', [
    {'params': {'head.weight': torch.zeros(8, 3, 3, 3), 'moe.fuse.weight': torch.zeros(8, 8, 1, 1)}},
    {'params': {**tiny_net().state_dict(), 'body.0.s3.rel_h': torch.zeros(2)}},
    {'params': {k: v for k, v in tiny_net().state_dict().items() if not k.startswith('tail.')}},
])
@pytest.mark.parametrize('command', ['infer', 'convert', 'export'])
def test_malformed_state_dicts_give_one_line(command, content, tmp_path):
    path = tmp_path / 'odd.pth'
    torch.save(content, path)
    image = tmp_path / 'in.png'
    cv2.imwrite(str(image), np.zeros((8, 8, 3), np.uint8))
    argv = {'infer': ['infer', str(image), '-w', str(path), '-o', str(tmp_path / 'out')],
            'convert': ['convert', str(path), str(tmp_path / 'out.pth')],
            'export': ['export', str(path), '--onnx', str(tmp_path / 'out.onnx')]}[command]
    with pytest.raises(SystemExit) as exc:
        ssiu_main(argv)
    message = str(exc.value.code)
    assert message.startswith(f'ssiu {command}: ') and 'odd.pth' in message and '\n' not in message


def test_non_finite_network_output_is_an_error_not_a_black_image():
    net = tiny_net()
    with torch.no_grad():
        net.head.weight[0, 0, 0, 0] = float('nan')
    with pytest.raises(NonFiniteOutputError, match='NaN or Inf'):
        upscale_image(net, np.full((12, 12, 3), 128, np.uint8), 2, tile=0)


def test_export_refuses_non_finite_weights_and_writes_nothing(tmp_path):
    net = tiny_net()
    with torch.no_grad():
        net.head.bias.fill_(float('inf'))
    for verify in (None, ((17, 23),)):
        with pytest.raises(ExportError, match='NaN or Inf'):
            export_onnx(net, tmp_path / 'nan.onnx', verify_sizes=verify)
    assert list(tmp_path.iterdir()) == []


def test_export_gray_input_weights(tmp_path, capsys):
    ckpt, out = tmp_path / 'gray.pth', tmp_path / 'gray.onnx'
    torch.save({'params': tiny_net(num_in_ch=1, num_out_ch=1).state_dict()}, ckpt)
    assert ssiu_main(['export', str(ckpt), '--onnx', str(out)]) == 0
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(out)).graph.input[0].type.tensor_type.shape.dim]
    assert dims == ['batch', 1, 'height', 'width']


@pytest.mark.parametrize('opset, message', [('9', 'needs opset 14 or later'), ('99', 'the ONNX exporter failed')])
def test_export_unsupported_opset_is_one_line(opset, message, tmp_path):
    ckpt, out = tmp_path / 'net.pth', tmp_path / 'net.onnx'
    torch.save({'params': tiny_net().state_dict()}, ckpt)
    with pytest.raises(SystemExit, match=message) as exc:
        ssiu_main(['export', str(ckpt), '--onnx', str(out), '--opset', opset])
    assert '\n' not in str(exc.value.code) and not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ['net.pth']


@pytest.mark.parametrize('command', ['infer', 'export'])
def test_nan_weights_give_an_error_and_no_output(command, tmp_path, capsys):
    state = tiny_net().state_dict()
    state['head.weight'][0, 0, 0, 0] = float('nan')
    ckpt, image, out = tmp_path / 'nan.pth', tmp_path / 'in.png', tmp_path / 'out'
    torch.save({'params': state}, ckpt)
    cv2.imwrite(str(image), np.full((12, 12, 3), 128, np.uint8))
    argv = ['infer', str(image), '-w', str(ckpt), '-o', str(out)] if command == 'infer' else \
        ['export', str(ckpt), '--onnx', str(tmp_path / 'out.onnx')]
    try:  # refused when the weights are loaded, or when the output is checked
        code, message = ssiu_main(argv), capsys.readouterr().err
    except SystemExit as exc:
        code, message = 1, str(exc.code)
    assert code == 1 and 'nan' in message.lower()
    assert not list(out.glob('*.png')) and not (tmp_path / 'out.onnx').exists()
