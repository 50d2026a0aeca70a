"""Inference precision: --precision parsing, bf16 autocast accuracy, CPU fallbacks, fp16 ONNX export."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from ssiu_arch.archs.ssiu_arch import SSIU
from ssiu_arch.cpu import engine, kernels
from ssiu_arch.tools import precision
from ssiu_arch.tools.cli import ssiu_main
from ssiu_arch.tools.export import FP16_ATOL, ExportError, export_onnx
from ssiu_arch.tools.infer import upscale_image
from ssiu_arch.tools.precision import PrecisionError, resolve_precision
from ssiu_arch.utils import cpu_features

BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'


def tiny(scale: int = 2) -> SSIU:
    torch.manual_seed(scale)
    return SSIU(upscale=scale, num_feat=16, num_block=2, num_heads=4).eval()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(-10 * np.log10(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


@pytest.fixture
def weights(tmp_path):
    path = tmp_path / 'net_g.pth'
    torch.save({'params': tiny().state_dict()}, path)
    return path


@pytest.fixture
def image(tmp_path):
    import cv2
    path = tmp_path / 'in.png'
    cv2.imwrite(str(path), (np.random.default_rng(0).random((20, 28, 3)) * 255).astype(np.uint8))
    return path


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / 'cpuinfo'
    info.write_text('processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16\n\nprocessor\t: 1\nflags\t: fpu\n')
    assert cpu_features.cpu_flags(info) == {'fpu', 'sse', 'avx512f', 'avx512_bf16'}
    assert cpu_features.cpu_flags(tmp_path / 'missing') is None  # not Linux: unknown
    assert 'native bf16: ' in cpu_features.describe_cpu()


def test_bf16_product_speedup_is_measured_where_the_cpu_has_bf16():
    cpu_features.bf16_product_speedup.cache_clear()
    state = torch.get_rng_state()
    speedup = cpu_features.bf16_product_speedup()
    assert torch.equal(torch.get_rng_state(), state)  # the measurement leaves the caller's random stream alone
    assert (speedup is None) == (not cpu_features.native_bf16())
    if speedup is not None:
        assert 0.05 < speedup < 50  # a ratio of two timings of the same product, not a flag
        assert f'bf16 products {speedup:.2f}x the float32 rate' in cpu_features.describe_cpu()
        assert cpu_features.bf16_pays() == (speedup >= cpu_features.BF16_MIN_SPEEDUP)


def test_engine_bf16_speedup_times_its_own_kernels():
    """The engine's bf16 rule times its fused MSGM kernel both ways: a ratio of two timings, once per process, where
    the bfloat16 kernels can run."""
    engine.bf16_speedup.cache_clear()
    state = torch.get_rng_state()
    speedup = engine.bf16_speedup()
    assert torch.equal(torch.get_rng_state(), state)
    assert (speedup is None) == (not kernels.bf16_available())
    if speedup is not None:
        assert 0.05 < speedup < 50
        assert engine.bf16_speedup() == speedup


@pytest.mark.parametrize('requested, native, speedup, engine, expected, notice', [
    ('fp32', False, None, False, 'fp32', None),
    ('bf16', False, None, True, 'fp32', 'no native bfloat16'),
    ('bf16', None, None, True, 'fp32', 'no native bfloat16'),  # unknown CPU: never risk running slower
    ('bf16', True, 0.62, True, 'fp32', "engine's bfloat16 products run at 0.62x its float32 rate"),  # Intel Xeon
    ('bf16', True, 2.1, False, 'fp32', 'bfloat16 CPU kernels cannot run'),
    ('bf16', True, 2.1, True, 'bf16', None),
])
def test_cpu_bf16_falls_back_unless_it_pays(monkeypatch, requested, native, speedup, engine, expected, notice):
    monkeypatch.setattr(precision, 'native_bf16', lambda: native)
    monkeypatch.setattr(precision.engine, 'bf16_speedup', lambda: speedup)
    monkeypatch.setattr(precision.kernels, 'bf16_available', lambda: engine)
    got, message = resolve_precision(requested, 'cpu')
    assert got == expected
    assert (message is None) if notice is None else (notice in message)


def test_cpu_bf16_follows_the_engine_kernels(monkeypatch):
    """On this machine: bf16 runs exactly where the engine's bfloat16 kernels can run and beat its float32 ones;
    SSIU_NO_BF16 turns them off, and bf16 then runs float32 with a notice."""
    got, message = resolve_precision('bf16', 'cpu')
    speedup = precision.engine.bf16_speedup()
    assert (got == 'bf16') == (speedup is not None and speedup >= cpu_features.BF16_MIN_SPEEDUP)
    monkeypatch.setenv('SSIU_NO_BF16', '1')
    got, message = resolve_precision('bf16', 'cpu')
    assert got == 'fp32' and message


def test_fp16_refused_on_cpu_and_unknown_precision_refused():
    with pytest.raises(PrecisionError, match='fp16 needs a CUDA device'):
        resolve_precision('fp16', 'cpu')
    with pytest.raises(PrecisionError, match="'fp8'"):
        resolve_precision('fp8', 'cpu')
    with pytest.raises(ValueError, match="'half'"):
        upscale_image(tiny(), np.zeros((8, 8, 3), np.float32), 2, precision='half')


def test_bf16_autocast_close_to_fp32():
    """bf16 runs under autocast (the output differs from fp32) and stays close: PSNR > 40 dB on random weights."""
    net = tiny()
    img = np.random.default_rng(1).random((40, 56, 3)).astype(np.float32)
    full = upscale_image(net, img, 2, tile=0)
    low = upscale_image(net, img, 2, tile=0, precision='bf16')
    tiled = upscale_image(net, img, 2, tile=32, tile_overlap=8, precision='bf16')
    assert low.dtype == np.float32 and np.isfinite(low).all()
    assert not np.array_equal(full, low)
    assert psnr(full, low) > 40 and psnr(full, tiled) > 40


def test_precision_option_parsing(weights, image, tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        ssiu_main(['infer', str(image), '-w', str(weights), '-o', str(tmp_path / 'x'), '--precision', 'fp8'])
    assert exit_info.value.code == 2 and "invalid choice: 'fp8'" in capsys.readouterr().err
    monkeypatch.setattr(precision, 'native_bf16', lambda: False)
    for name, extra in (('a', []), ('b', ['--precision', 'bf16'])):
        assert ssiu_main(['infer', str(image), '-w', str(weights), '-o', str(tmp_path / name), '--device', 'cpu',
                          *extra]) == 0
    assert 'ssiu infer: --precision bf16: this CPU has no native bfloat16' in capsys.readouterr().err
    a, b = ((tmp_path / d / 'in_SSIUx2.png').read_bytes() for d in 'ab')
    assert a == b  # the fallback really ran float32


def test_fp16_onnx_checked_by_onnxruntime(tmp_path):
    net = tiny(4)
    path = tmp_path / 'ssiu16.onnx'
    error = export_onnx(net, path, precision='fp16')
    assert 0 < error <= FP16_ATOL
    model = onnx.load(str(path))
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in model.graph.initializer)
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    assert session.get_inputs()[0].type == 'tensor(float)' and session.get_outputs()[0].type == 'tensor(float)'
    x = torch.rand(1, 3, 21, 30)
    with torch.inference_mode():
        expected = net(x).numpy()
    got = session.run(['sr'], {'lr': x.numpy()})[0]
    assert got.shape == expected.shape and np.abs(got - expected).max() <= FP16_ATOL


def test_fp16_onnx_refuses_overflow(tmp_path):
    net = tiny()
    with torch.no_grad():
        next(net.parameters()).mul_(1e6)  # finite in float32, beyond float16's 65504
    with pytest.raises(ExportError, match='NaN or Inf|differs'):
        export_onnx(net, tmp_path / 'bad.onnx', precision='fp16')
    assert not (tmp_path / 'bad.onnx').exists()


def test_export_cli_fp16(weights, tmp_path, capsys):
    out = tmp_path / 'ssiu16.onnx'
    assert ssiu_main(['export', str(weights), '--onnx', str(out), '--precision', 'fp16']) == 0
    assert out.exists() and 'float16 weights, float32 input and output' in capsys.readouterr().out


def load_benchmark(name: str):
    """A script of benchmarks/, imported as the scripts import each other (their folder on sys.path)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    return importlib.import_module(name)


def test_quality_script_scores_each_precision():
    quality = load_benchmark('bench_precision_quality')
    results = quality.compare_precisions(tiny(), 2, datasets=('Set5',), limit=1)  # random weights: loose bounds
    fp32, bf16 = results['Set5']['fp32'], results['Set5']['bf16']
    assert fp32['beyond_one_level'] == 0 and 0 <= bf16['beyond_one_level'] < 0.01
    assert abs(bf16['psnr'] - fp32['psnr']) < 0.05 and abs(bf16['ssim'] - fp32['ssim']) < 5e-3
    assert 'Set5   bf16' in quality.format_rows('w.pth', 2, results)[1]


def test_gpu_script_helpers_and_clear_refusal_without_cuda(monkeypatch):
    gpu = load_benchmark('gpu_precision')
    assert gpu.lr_size(2) == (360, 640) and gpu.lr_size(4) == (180, 320)
    assert gpu.sample_input(4).shape == (1, 3, 180, 320)
    a = torch.rand(1, 3, 8, 8)
    assert gpu.psnr(a, a) == float('inf') and 19 < gpu.psnr(a, a + 0.1) < 21
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit, match='needs a CUDA GPU'):
        gpu.main([])
