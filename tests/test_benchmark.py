"""ssiu bench: rows measured in fresh processes, readable by ``ssiu results``; bad options are named."""
from __future__ import annotations

import json

import pytest
import torch

from ssiu_arch.archs.ssiu_arch import SSIU
from ssiu_arch.evaluation.bench_table import read_bench
from ssiu_arch.tools.bench import BenchError, build_net, matmul_rate, measure_inference, run_case
from ssiu_arch.tools.cli import ssiu_main
from ssiu_arch.utils.profiling import count_macs, count_params, lr_size_for

TINY = {'num_feat': 16, 'num_block': 3}
ROW_KEYS = {'model', 'scale', 'params', 'macs_g', 'input', 'latency_ms', 'peak_mem_mb', 'efficiency', 'threads',
            'machine'}


def test_build_net_finds_the_scale_argument_of_any_registered_arch():
    net = build_net('SSIU', 3, **TINY)
    assert isinstance(net, SSIU) and net.upscale == 3 and not net.training
    edsr = build_net('EDSR', 2, num_in_ch=3, num_out_ch=3, num_feat=8, num_block=1)
    assert edsr(torch.rand(1, 3, 8, 8)).shape == (1, 3, 16, 16)
    with pytest.raises(BenchError, match='NoSuchNet'):
        build_net('NoSuchNet', 2)
    with pytest.raises(BenchError, match='SSIU x2'):
        build_net('SSIU', 2, num_feat=30)  # 30 channels do not split into 4 heads of even width


def test_inference_row_in_process():
    threads = torch.get_num_threads()
    try:
        row = measure_inference('SSIU', 2, (24, 40), threads=1, runs=2, net_opt=TINY, retain_memory=False)
    finally:
        torch.set_num_threads(threads)
    net = SSIU(upscale=2, **TINY)
    assert ROW_KEYS <= set(row) and row['malloc'] == 'default'
    assert (row['model'], row['scale'], row['input'], row['threads']) == ('SSIU', 2, '40x24', 1)
    assert row['params'] == count_params(net)
    assert row['macs_g'] == round(count_macs(net, lr_size_for((720, 1280), 2)) / 1e9, 2)
    assert row['latency_ms'] > 0 and row['peak_mem_mb'] >= 0 and 0 < row['efficiency'] < 2
    assert matmul_rate(256, repeats=1) > 0


def test_inference_row_times_bf16_side_by_side():
    from ssiu_arch.tools.bench import format_rows
    from ssiu_arch.tools.precision import resolve_precision

    threads = torch.get_num_threads()
    try:
        row = measure_inference('SSIU', 2, (24, 40), threads=1, runs=2, net_opt=TINY, retain_memory=False, bf16=True)
    finally:
        torch.set_num_threads(threads)
    assert row['bf16_runs'] == resolve_precision('bf16', 'cpu')[0]  # the fallback where bf16 cannot run
    assert row['bf16_latency_ms'] > 0 and row['bf16_ratio'] > 0
    table = format_rows([row]).splitlines()
    assert 'bf16/fp32' in table[0] and f'{row["bf16_ratio"]:.3f}' in table[1]


@pytest.mark.parametrize('maps', ['whole', 'bands'])
def test_inference_row_with_whole_maps_or_row_bands(monkeypatch, maps):
    from ssiu_arch.cpu.engine import ENGINE

    settings = ENGINE.band_bytes, ENGINE.whole_map_bytes
    band_rows, seen = ENGINE.band_rows, []
    monkeypatch.setattr(ENGINE, 'band_rows', lambda net, x: seen.append(band_rows(net, x)) or seen[-1])
    threads = torch.get_num_threads()
    try:
        row = measure_inference('SSIU', 2, (20, 24), threads=1, runs=1, net_opt=TINY, retain_memory=False, maps=maps)
    finally:
        torch.set_num_threads(threads)
    assert row['maps'] == maps and row['latency_ms'] > 0
    assert seen and all((rows is None) == (maps == 'whole') for rows in seen)
    assert (ENGINE.band_bytes, ENGINE.whole_map_bytes) == settings  # restored
    with pytest.raises(BenchError, match='IDSANet has no row bands'):
        measure_inference('IDSANet', 2, (8, 8), threads=1, runs=1, retain_memory=False, maps='bands')


def test_cases_run_in_fresh_processes():
    row = run_case('inference', arch='SSIU', scale=4, input_hw=(16, 24), threads=1, runs=1, net_opt=TINY)
    assert row['malloc'] == 'retain' and row['input'] == '24x16' and row['peak_mem_mb'] >= 0
    step = run_case('training', arch='SSIU', scale=2, batch=2, size=16, threads=1, runs=1, net_opt=TINY)
    assert step['batch'] == '2x3x16x16' and step['train_step_ms'] > 0
    with pytest.raises(BenchError, match='num_feat'):
        run_case('inference', arch='SSIU', scale=2, input_hw=(16, 16), threads=1, runs=1, net_opt={'num_feat': 30})


def test_cli_writes_rows_that_ssiu_results_reads(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    args = ['bench', '--scale', '2', '4', '--input', '40x24', '--threads', '1', '--runs', '1', '--json', str(out),
            '--net-opt', 'num_feat=16', 'num_block=3']
    assert ssiu_main(args) == 0
    rows = json.loads(out.read_text())
    assert [(r['model'], r['scale'], r['input']) for r in rows] == [('SSIU', 2, '40x24'), ('SSIU', 4, '40x24')]
    assert all(ROW_KEYS <= set(r) for r in rows)
    assert read_bench(out) == rows
    printed = capsys.readouterr().out
    assert 'efficiency' in printed and f'wrote {out}' in printed


def test_cli_names_bad_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        ssiu_main(['bench', '--input', '40by24'])
    assert '40by24' in capsys.readouterr().err
    with pytest.raises(SystemExit, match='NoSuchNet'):
        ssiu_main(['bench', '--arch', 'NoSuchNet', '--scale', '2', '--runs', '1'])
    with pytest.raises(SystemExit, match='nowhere'):
        ssiu_main(['bench', '--json', str(tmp_path / 'nowhere' / 'bench.json')])
    with pytest.raises(SystemExit, match='KEY=VALUE'):
        ssiu_main(['bench', '--net-opt', 'num_feat'])
    assert not any(tmp_path.iterdir())
