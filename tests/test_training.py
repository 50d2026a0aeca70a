"""``basicsr train`` through BasicSR's own loop: the demo options, resume after SIGKILL, DDP on CPU, bad options."""
from __future__ import annotations

import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ssiu_arch.models.options_check import OptionsError, check_options
from ssiu_arch.tools.cli import basicsr_main

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / 'tests' / 'data' / 'benchmark'


def tiny_options(name: str, total_iter: int = 6, **train) -> dict:
    """A training run of a tiny SSIU on Set14 patches, seconds per iteration on one core."""
    return {
        'name': name, 'model_type': 'SSIUModel', 'scale': 2, 'num_gpu': 0, 'manual_seed': 0,
        'datasets': {
            'train': {
                'name': 'Set14', 'type': 'HROnlyBicubicDataset', 'dataroot_gt': str(BENCH / 'Set14' / 'HR'),
                'io_backend': {'type': 'disk'}, 'gt_size': 32, 'use_hflip': True, 'use_rot': True,
                'num_worker_per_gpu': 0, 'batch_size_per_gpu': 2, 'dataset_enlarge_ratio': 1,
            },
        },
        'network_g': {'type': 'SSIU', 'upscale': 2, 'num_feat': 8, 'num_block': 3},
        'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None},
        'train': {
            'ema_decay': 0,
            'optim_g': {'type': 'AdamW', 'lr': 1e-3, 'weight_decay': 1e-4, 'betas': [0.9, 0.99]},
            'scheduler': {'type': 'CosineAnnealingRestartLR', 'periods': [100], 'restart_weights': [1],
                          'eta_min': 1e-6},
            'total_iter': total_iter, 'warmup_iter': -1,
            'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0},
            'fft_opt': {'type': 'FFTLoss', 'loss_weight': 0.01},
            **train,
        },
        'logger': {'print_freq': 1, 'save_checkpoint_freq': 2, 'use_tb_logger': False},
    }


def write_options(tmp_path: Path, opt: dict) -> Path:
    path = tmp_path / f'{opt["name"]}.yml'
    path.write_text(yaml.safe_dump(opt, sort_keys=False))
    return path


def child_env(**extra) -> dict:
    return {**os.environ, 'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1', **extra}


def train_command(options: Path, *flags: str) -> list[str]:
    return [sys.executable, '-m', 'ssiu_arch.tools.train', '-opt', str(options), *flags]


def states(exp: Path) -> list[int]:
    return sorted(int(p.name.split('.')[0]) for p in (exp / 'training_states').glob('*.state'))


@pytest.mark.parametrize('demo_file', ['demo_SSIU_x2.yml', 'demo_IDSANet_x2.yml'])
def test_demo_options_train_and_validate(tmp_path, demo_file):
    demo = yaml.safe_load((REPO / 'options' / demo_file).read_text())
    for phase in demo['datasets'].values():  # the demo's paths are relative to the repository
        for key in ('dataroot_gt', 'dataroot_lq'):
            if key in phase:
                phase[key] = str(REPO / phase[key])
    demo['name'] = 'demo_smoke'
    demo['train']['total_iter'] = 4
    demo['val']['val_freq'] = 4
    demo['datasets']['train']['num_worker_per_gpu'] = 0
    demo['logger']['save_checkpoint_freq'] = 4
    options = write_options(tmp_path, demo)
    run = subprocess.run(train_command(options), cwd=tmp_path, env=child_env(), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    exp = tmp_path / 'experiments' / 'demo_smoke'
    log = next(exp.glob('train_demo_smoke_*.log')).read_text()
    assert 'Validation Set5' in log and '# psnr' in log
    assert re.search(r'[Bb]icubic.*psnr', log), 'the demo log states the bicubic baseline'
    assert (exp / 'models' / 'net_g_latest.pth').is_file()


def test_resume_after_sigkill_continues_from_last_state(tmp_path):
    opt = tiny_options('resume_run', total_iter=100000)
    options = write_options(tmp_path, opt)
    exp = tmp_path / 'experiments' / 'resume_run'
    proc = subprocess.Popen(train_command(options), cwd=tmp_path, env=child_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and (not states(exp) or states(exp)[-1] < 6):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = states(exp)
    assert saved and saved[-1] >= 6
    last = saved[-1]
    for it in saved:  # whatever the kill interrupted, every visible file is complete
        torch.load(exp / 'training_states' / f'{it}.state', weights_only=True)
        torch.load(exp / 'models' / f'net_g_{it}.pth', weights_only=True)

    opt['train']['total_iter'] = last + 3
    write_options(tmp_path, opt)
    run = subprocess.run(train_command(options, '--auto_resume'), cwd=tmp_path, env=child_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    logs = sorted(exp.glob('train_resume_run_*.log'), key=lambda p: p.stat().st_mtime)
    log = logs[-1].read_text()
    assert 'Resuming training from epoch' in log and f'iter: {last}.' in log
    # the scheduler resumed too: iteration last + 1 runs at the cosine value after `last` scheduler steps
    lr = float(re.search(rf'iter:\s*{last + 1:,}, lr:\(([0-9.e+-]+),\)', log).group(1))
    expected = 1e-6 + 0.5 * (1e-3 - 1e-6) * (1 + math.cos(math.pi * last / 100))
    assert lr == pytest.approx(expected, rel=1e-3)
    assert (exp / 'models' / 'net_g_latest.pth').is_file()


def test_ddp_on_cpu_keeps_ranks_identical(tmp_path):
    opt = tiny_options('ddp_run', total_iter=4)
    opt['logger']['save_checkpoint_freq'] = 100
    options = write_options(tmp_path, opt)
    worker = REPO / 'tests' / 'ddp_worker.py'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2', '--master_port=29631', str(worker),
           '-opt', str(options), '--launcher', 'pytorch']
    run = subprocess.run(cmd, cwd=tmp_path, env=child_env(SSIU_TEST_RANK_WEIGHTS=str(tmp_path)),
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rank0 = torch.load(tmp_path / 'rank0.pth', weights_only=True)
    rank1 = torch.load(tmp_path / 'rank1.pth', weights_only=True)
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key
    log = next((tmp_path / 'experiments' / 'ddp_run').glob('train_ddp_run_*.log')).read_text()
    assert 'World size (gpu number): 2' in log


@pytest.mark.parametrize('change, message', [
    (lambda o: o['network_g'].update(type='SSUI'), r"network_g\.type: unknown arch type 'SSUI'"),
    (lambda o: o['network_g'].update(upscale=4), r'scale \(2\) does not match network_g\.upscale \(4\)'),
    (lambda o: o['datasets']['train'].update(dataroot_gt='no/such/folder'), r'datasets\.train\.dataroot_gt'),
    (lambda o: o['train']['fft_opt'].update(type='FFTLos'), r"train\.fft_opt\.type: unknown loss type 'FFTLos'"),
    (lambda o: o.update(model_type='SSIUModle'), r"model_type: unknown model type 'SSIUModle'"),
])
def test_bad_options_name_the_key(change, message):
    opt = tiny_options('bad')
    change(opt)
    with pytest.raises(OptionsError, match=message):
        check_options(opt)


def test_cli_fails_fast_on_bad_options(tmp_path, capsys):
    opt = tiny_options('bad_cli')
    opt['train']['pixel_opt']['type'] = 'NoSuchLoss'
    options = write_options(tmp_path, opt)
    with pytest.raises(SystemExit, match=r"train\.pixel_opt\.type: unknown loss type 'NoSuchLoss'"):
        basicsr_main(['train', '-opt', str(options)])
    assert not (tmp_path / 'experiments').exists()


def test_basicsr_help_and_unknown_command(capsys):
    assert basicsr_main(['--help']) == 0
    assert 'train' in capsys.readouterr().out
    assert basicsr_main(['evaluate']) == 2
