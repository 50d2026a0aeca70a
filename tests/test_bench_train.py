"""benchmarks/: the published formulation as a module, the training-step benchmark and the CUDA check's log reader."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from ssiu_arch.archs.ssiu_arch import SSIU

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / 'benchmarks'))
import bench_train  # noqa: E402
import cuda_check  # noqa: E402
from published_ssiu import PublishedSSIU  # noqa: E402

DATA = Path(__file__).parent / 'data'


@pytest.mark.parametrize('name', ['small_x2', 'x3', 'x4'])
def test_published_formulation_reproduces_the_reference_passes(name):
    ref = torch.load(DATA / f'ssiu_official_{name}.pt', weights_only=True)
    state = {k.removeprefix('module.'): v for k, v in ref['official_checkpoint']['model_state_dict'].items()}
    net = PublishedSSIU(**ref['config'])
    net.load_state_dict(state, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(net(ref['input']), ref['output'], rtol=0, atol=1e-5)
    config = ref['config']
    ours = SSIU(upscale=config['scale'], num_feat=config['n_feats'], num_block=config['n_blocks'])
    assert set(ours.state_dict()) == set(net.state_dict())


def test_bench_train_compares_one_state_dict_in_both_formulations(capsys):
    assert bench_train.main(['--runs', '1', '--variants', 'eager', '--num-feat', '16', '--num-block', '3',
                             '--batch', '2', '--size', '16']) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith('eager'))
    ours_ms, published_ms, speedup, loss_diff, grad_diff = row.split()[1:6]
    assert float(ours_ms) > 0 and float(published_ms) > 0 and speedup.endswith('x')
    assert float(loss_diff) <= 1e-5 and float(grad_diff) <= 1e-5
    assert re.search(r'worst relative difference \S+ \(within the 1e-5 target\)', out)


def test_bench_train_times_the_engine_training_path_beside_the_modules(capsys):
    # 64 features in 4 heads: heads of 16 channels, which the CPU engine's training path covers
    assert bench_train.main(['--runs', '1', '--variants', 'modules,recommended', '--num-feat', '64', '--num-block',
                             '3', '--batch', '2', '--size', '16']) == 0
    out = capsys.readouterr().out
    saved = {}
    for variant in ('modules', 'recommended'):
        row = next(line for line in out.splitlines() if line.startswith(variant + ' '))
        loss_diff, grad_diff = row.split()[4:6]
        assert float(loss_diff) <= 1e-5 and float(grad_diff) <= 1e-5
        saved[variant] = float(row.split()[-1].split('/')[0])  # SSIU's saved activations, MiB
    assert saved['recommended'] < saved['modules']  # the engine's kernels ran: they keep fewer maps for backward
    assert re.search(r'modules: SSIU with its own modules \S+x faster', out)
    assert re.search(r'recommended: SSIU as trained here \S+x faster', out)


def test_bench_train_names_a_bad_variant(capsys):
    with pytest.raises(SystemExit):
        bench_train.main(['--variants', 'eager,fused'])
    assert '--variants: unknown fused' in capsys.readouterr().err


def test_cuda_check_reads_basicsr_training_logs():
    log = '\n'.join([
        '2026-01-02 10:00:00,000 INFO: Resuming training from epoch: 0, iter: 50.',
        '2026-01-02 10:00:10,000 INFO: [cuda_..][epoch:  0, iter:     100, lr:(1.000e-03,)] '
        '[eta: 0:00:10, time (data): 0.100 (0.001)] l_pix: 2.0000e-02 l_fft: 1.0000e-01 l_total: 3.0000e-02 ',
        '2026-01-02 10:00:20,500 INFO: [cuda_..][epoch:  1, iter:   1,200, lr:(1.000e-06,)] '
        '[eta: 0:00:00, time (data): 0.100 (0.001)] l_pix: 1.0000e-02 l_fft: nan l_total: 1.5000e-02 ',
        '2026-01-02 10:00:21,000 INFO: Bicubic baseline Set5 (MATLAB bicubic of the LR): # psnr: 33.6700',
        '2026-01-02 10:00:21,000 INFO: Validation Set5',
        '\t # psnr: 35.1234\tBest: 35.1234 @ 1200 iter',
    ])
    info = cuda_check.parse_training(log)
    (it0, t0, first), (it1, t1, last) = info['points']
    assert (it0, it1) == (100, 1200) and t1 - t0 == pytest.approx(10.5)
    assert first == {'l_pix': 0.02, 'l_fft': 0.1, 'l_total': 0.03} and last['l_fft'] != last['l_fft']
    assert info['psnr'] == 35.1234 and info['bicubic'] == 33.67
    assert cuda_check.RESUMED.findall(log) == ['50']


@pytest.mark.parametrize('device', ['cpu', 'cuda'])
def test_cuda_check_runs_pass_the_option_check(device, monkeypatch):
    """The check's ``basicsr train`` command lines, overrides included, pass the option check on the device they
    are for (the CPU dry run forces ``num_gpu=0`` on the GPU option file)."""
    from ssiu_arch.models.options_check import check_options_file

    monkeypatch.setattr(torch.cuda, 'is_available', lambda: device == 'cuda')
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: int(device == 'cuda'))
    runs = cuda_check.Runs(device, iters=8)
    for cmd in (runs.command('cuda_check_fp32', 8, 4),
                runs.command('cuda_check_bf16', 8, 4, 'train:mixed_precision=bf16')):
        check_options_file(cmd[2:])  # after 'basicsr train'
