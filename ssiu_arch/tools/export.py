"""``ssiu export --onnx``: an SSIU checkpoint as an ONNX model with dynamic batch, height and width.

The graph is traced with PyTorch's TorchScript-based exporter (``dynamo=False``; the ``torch.export``-based
exporter needs ``onnxscript``). Tracing records the network's standard-operator formulation (the fused
oneDNN kernels are CPU inference-only), and every size-dependent step of the network is written with
symbolic sizes: the mirror padding to a multiple of 16 (an index gather, exact for any side, tiny sides
included), the ESAM block windows and the final crop. The remaining Python branches on sizes hold for every
input, so the tracer's warnings about them are silenced here.

``--precision fp16`` converts the traced float32 graph with onnxruntime's float16 converter: weights and
activations in float16, with float32 input ``lr`` and output ``sr`` and float32 LayerNorm and softmax (as
PyTorch's autocast keeps them). It is checked against the float32 PyTorch output with :data:`FP16_ATOL`.
"""
from __future__ import annotations

import argparse
import math
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from ssiu_arch.tools.common import load_weights_or_exit, one_line
from ssiu_arch.utils.fileio import replace_atomic
from ssiu_arch.utils.weights import infer_config

# (height, width) inputs on which the written model is compared with PyTorch: odd, unequal, not multiples of 16.
VERIFY_SIZES = ((17, 23), (31, 40))
# The attention's scaled_dot_product_attention has an ONNX form from opset 14 on.
MIN_OPSET = 14
# Largest |onnxruntime - PyTorch float32| accepted for a float16 model: five 8-bit levels. float16 keeps 11
# significant bits, and the error of a deep network's features grows over its layers.
FP16_ATOL = 2e-2
# Operators left in float32 by the float16 conversion, besides the converter's own list: the statistics of
# LayerNorm and the softmax of the attention, as in PyTorch's autocast.
FP16_FLOAT32_OPS = ('LayerNormalization', 'Softmax')
EXPORT_PRECISIONS = ('fp32', 'fp16')


class ExportError(RuntimeError):
    """An exported model that onnxruntime cannot reproduce; nothing is written."""


def export_onnx(net: nn.Module, path: str | os.PathLike, opset: int = 17, sample_hw: tuple[int, int] = (32, 48),
                in_ch: int = 3, verify_sizes: tuple[tuple[int, int], ...] | None = VERIFY_SIZES,
                atol: float | None = None, precision: str = 'fp32') -> float | None:
    """Trace ``net`` on a (1, in_ch, *sample_hw) input and write ``path``; returns the verification error.

    Input ``lr`` (N, in_ch, H, W) and output ``sr`` (N, out_ch, sH, sW) have dynamic N, H and W. With
    ``verify_sizes``, the model is run by onnxruntime on those (height, width) sizes before it is moved into
    place, and :class:`ExportError` is raised (leaving no file) if it differs from PyTorch by more than ``atol``.
    ``atol`` defaults to 1e-4 for fp32 and :data:`FP16_ATOL` for fp16 (``precision``, see the module notes).
    A network whose output is not finite (NaN/Inf weights), an opset the exporter or the network cannot use,
    and any exporter failure also raise :class:`ExportError` and write nothing.
    """
    path = Path(path)
    if precision not in EXPORT_PRECISIONS:
        raise ExportError(f'precision {precision!r}: expected one of {", ".join(EXPORT_PRECISIONS)}')
    if atol is None:
        atol = FP16_ATOL if precision == 'fp16' else 1e-4
    if opset < MIN_OPSET:
        raise ExportError(f'opset {opset}: SSIU needs opset {MIN_OPSET} or later (its attention)')
    sample = torch.rand(1, in_ch, *sample_hw)
    with torch.inference_mode():
        _check_finite(net.eval()(sample), 'PyTorch')
    errors = []

    def write(tmp: Path) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter('ignore', torch.jit.TracerWarning)
            warnings.filterwarnings('ignore', category=DeprecationWarning, module=r'torch\.onnx')
            warnings.filterwarnings('ignore', message='.*legacy TorchScript-based ONNX export')
            warnings.filterwarnings('ignore', message='Constant folding - Only steps=1')
            try:
                torch.onnx.export(
                    net.eval(), (sample,), str(tmp), dynamo=False, opset_version=opset,
                    input_names=['lr'], output_names=['sr'],
                    dynamic_axes={'lr': {0: 'batch', 2: 'height', 3: 'width'},
                                  'sr': {0: 'batch', 2: 'sr_height', 3: 'sr_width'}})
            except (torch.onnx.OnnxExporterError, RuntimeError, ValueError) as err:
                raise ExportError(f'opset {opset}: the ONNX exporter failed: {one_line(err)}') from None
        if precision == 'fp16':
            _convert_to_float16(tmp)
        if verify_sizes:
            errors.append(onnx_max_error(net, tmp, verify_sizes, in_ch=in_ch))
            if errors[-1] > atol:
                raise ExportError(f'{path}: onnxruntime differs from PyTorch by {errors[-1]:.2e} (> {atol:g})')

    replace_atomic(path, write)
    return errors[-1] if errors else None


def _convert_to_float16(path: Path) -> None:
    """Rewrite the float32 ONNX model at ``path`` in float16, keeping float32 input, output and
    :data:`FP16_FLOAT32_OPS`."""
    try:
        import onnx
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16
    except ImportError:
        raise ExportError('fp16 export needs onnx and onnxruntime (pip install onnx onnxruntime)') from None
    model = convert_float_to_float16(onnx.load(str(path)), keep_io_types=True,
                                     op_block_list=[*DEFAULT_OP_BLOCK_LIST, *FP16_FLOAT32_OPS])
    onnx.save(model, str(path))


def _check_finite(output: torch.Tensor, runtime: str) -> None:
    if not torch.isfinite(output).all():
        raise ExportError(f'{runtime} output holds NaN or Inf on a random input (non-finite weights?); '
                          'nothing written')


def onnx_max_error(net: nn.Module, path: str | os.PathLike, sizes: tuple[tuple[int, int], ...] = VERIFY_SIZES,
                   batch: int = 2, in_ch: int = 3) -> float:
    """Largest ``|onnxruntime - PyTorch|`` over random (batch, in_ch, h, w) inputs of the given sizes."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError('verifying needs onnxruntime (pip install onnxruntime, or skip with --no-verify)') from None
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    error = 0.0
    for h, w in sizes:
        x = torch.rand(batch, in_ch, h, w)
        with torch.inference_mode():
            expected = net.eval()(x)
        got = torch.from_numpy(session.run(['sr'], {'lr': x.numpy()})[0])
        if got.shape != expected.shape:
            raise ExportError(f'{path}: output {tuple(got.shape)} for input {tuple(x.shape)}, '
                              f'PyTorch gives {tuple(expected.shape)}')
        _check_finite(expected, 'PyTorch')
        _check_finite(got, 'onnxruntime')
        difference = (got - expected).abs().max().item()
        if not math.isfinite(difference):  # cannot happen after the checks; max() would drop a NaN
            raise ExportError(f'{path}: onnxruntime vs PyTorch difference is {difference}')
        error = max(error, difference)
    return error


def _run(args: argparse.Namespace) -> int:
    out = Path(args.onnx)
    if out.exists() and not args.overwrite:
        raise SystemExit(f'ssiu export: {out} exists (use --overwrite)')
    if not out.parent.is_dir():
        raise SystemExit(f'ssiu export: --onnx {out}: folder does not exist')
    net = load_weights_or_exit(args.checkpoint, 'export')
    in_ch = infer_config(net.state_dict())['num_in_ch']
    try:
        error = export_onnx(net, out, opset=args.opset, in_ch=in_ch, precision=args.precision,
                            verify_sizes=None if args.no_verify else VERIFY_SIZES)
    except ExportError as err:
        raise SystemExit(f'ssiu export: {args.checkpoint}: {err}') from None
    except OSError as err:
        raise SystemExit(f'ssiu export: --onnx {out}: cannot write ({err.strerror or err})') from None
    weights = 'float16 weights, float32 input and output' if args.precision == 'fp16' else 'float32'
    print(f'wrote {out} (opset {args.opset}, {weights}; dynamic batch, height and width)')
    if error is not None:
        sizes = ', '.join(f'{w}x{h}' for h, w in VERIFY_SIZES)
        print(f'onnxruntime vs PyTorch float32 on {sizes} inputs: max abs difference {error:.2e}')
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'export', help='export an SSIU checkpoint to ONNX (dynamic batch/height/width)',
        description='Trace an SSIU checkpoint (published or BasicSR layout) into an ONNX model whose input "lr" '
                    '(N, C, H, W) in [0, 1] (C = 3, or 1 for gray-input weights) has dynamic N, H and W (any '
                    'size), then check it with onnxruntime against PyTorch on two odd sizes. Weights that give '
                    'NaN or Inf are refused.')
    parser.add_argument('checkpoint', help='SSIU checkpoint (.pth / .pt)')
    parser.add_argument('--onnx', required=True, metavar='OUT.onnx', help='ONNX file to write')
    parser.add_argument('--opset', type=int, default=17, help=f'ONNX opset, {MIN_OPSET} or later (default 17)')
    parser.add_argument('--precision', choices=EXPORT_PRECISIONS, default='fp32',
                        help='fp16: float16 weights and activations (LayerNorm, softmax, input and output stay '
                             f'float32), checked against float32 PyTorch within {FP16_ATOL:g} (default: %(default)s)')
    parser.add_argument('--no-verify', action='store_true', help='skip the onnxruntime comparison')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output file')
    parser.set_defaults(func=_run)
