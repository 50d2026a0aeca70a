"""Inference precision: ``fp32``, ``bf16`` or ``fp16``, and which one actually runs on a device.

Lower precisions run the network under :func:`torch.autocast`: convolutions and matrix products take the low
precision, while autocast's op lists keep LayerNorm, softmax and reductions in float32. The input and the
final image stay float32 (callers blend tiles in float32).
"""
from __future__ import annotations

import contextlib

import torch

from ssiu_arch.cpu import engine, kernels
from ssiu_arch.utils.cpu_features import BF16_MIN_SPEEDUP, native_bf16

PRECISIONS = {'fp32': torch.float32, 'bf16': torch.bfloat16, 'fp16': torch.float16}

# On the CPU, bf16 runs only through the engine's bfloat16 path (bfloat16 operands in its matrix products,
# AVX512_BF16), which benchmarks/bench_speed.py times against float32 (about 0.6 of its latency on a 2-vCPU AMD
# EPYC). Where the CPU lacks native bfloat16, where the compiled bfloat16 kernels cannot run, or where their products
# are not faster than the float32 kernels' (measured at run time: an Intel Xeon ran them at 0.62x the float32 rate,
# and a bf16 pass 1.45x slower), bf16 requests run float32 with a notice: bfloat16 autocast of the reference
# network measured 1.1 to 5.9 times slower than the float32 engine.


class PrecisionError(ValueError):
    """A precision the device cannot run."""


def check_precision(precision: str) -> str:
    """``precision`` if it is one of :data:`PRECISIONS`, else :class:`PrecisionError`."""
    if precision not in PRECISIONS:
        raise PrecisionError(f'precision {precision!r}: expected one of {", ".join(PRECISIONS)}')
    return precision


def resolve_precision(precision: str, device: str | torch.device) -> tuple[str, str | None]:
    """The precision to run for a request on ``device``, and a one-line notice when it differs.

    CPU: fp16 is refused (:class:`PrecisionError`; CPU float16 autocast runs 15-20x slower than float32);
    bf16 runs where the CPU has native bfloat16, the CPU engine's bfloat16 kernels can run
    (:func:`ssiu_arch.cpu.kernels.bf16_available`) and they beat its float32 kernels by
    :data:`~ssiu_arch.utils.cpu_features.BF16_MIN_SPEEDUP` (:func:`ssiu_arch.cpu.engine.bf16_speedup`), else as fp32
    with a notice. CUDA: fp16 always, bf16 where the GPU supports it.
    """
    check_precision(precision)
    device_type = torch.device(device).type
    if precision == 'fp32':
        return precision, None
    if device_type == 'cpu':
        if precision == 'fp16':
            raise PrecisionError('precision fp16 needs a CUDA device (float16 on the CPU is many times slower '
                                 'than float32); use bf16 or fp32')
        if not native_bf16():
            return 'fp32', 'precision bf16: this CPU has no native bfloat16 (avx512_bf16/amx_bf16), running fp32'
        if not kernels.bf16_available():
            return 'fp32', 'precision bf16: the compiled bfloat16 CPU kernels cannot run here, running fp32'
        speedup = engine.bf16_speedup()
        if speedup < BF16_MIN_SPEEDUP:
            return 'fp32', (f'precision bf16: the CPU engine\'s bfloat16 products run at {speedup:.2f}x its float32 '
                            'rate on this CPU (avx512_bf16 slower than its float32 FMAs), running fp32')
        return precision, None
    if device_type == 'cuda' and precision == 'bf16' and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise PrecisionError('precision bf16: this GPU has no native bfloat16; use fp16 or fp32')
    return precision, None


def autocast(precision: str, device: str | torch.device) -> contextlib.AbstractContextManager:
    """A context that runs a network in ``precision`` on ``device``: nothing for fp32, else autocast."""
    if check_precision(precision) == 'fp32':
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=PRECISIONS[precision])
