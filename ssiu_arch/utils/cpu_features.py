"""What the CPU can do natively, detected at run time: bfloat16 dot products (AVX512_BF16 or AMX), and whether
they are actually faster than float32 here."""
from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

# /proc/cpuinfo flags of instructions that multiply bfloat16 natively: AVX512_BF16 (AMD Zen 4/5, Intel Cooper
# Lake, Sapphire Rapids and later) and AMX-BF16 (Intel Sapphire Rapids and later).
BF16_FLAGS = ('avx512_bf16', 'amx_bf16')
# bfloat16 runs where its products are at least this much faster than float32's (see bf16_product_speedup).
BF16_MIN_SPEEDUP = 1.25


def cpu_flags(cpuinfo: str | os.PathLike = '/proc/cpuinfo') -> set[str] | None:
    """The feature flags of the first CPU in ``cpuinfo``, or None where that file does not exist (not Linux)."""
    try:
        text = Path(cpuinfo).read_text(errors='replace')
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(':')
        if key.strip() in ('flags', 'Features'):  # x86 and ARM spellings
            return set(value.split())
    return None


@functools.cache
def native_bf16() -> bool | None:
    """True where the CPU multiplies bfloat16 natively, False where it does not, None where unknown (not Linux)."""
    flags = cpu_flags()
    if flags is None:
        return None
    return any(flag in flags for flag in BF16_FLAGS)


@functools.cache
def bf16_product_speedup() -> float | None:
    """float32 time / bfloat16 time of the network's main product on this CPU, measured once per process (~20 ms),
    or None where the CPU has no native bfloat16.

    The instruction set alone does not say whether bfloat16 pays: AMD Zen 4/5 run ``vdpbf16ps`` at twice the
    multiply-adds of float32 FMAs, and AMX multiplies far faster still, but an Intel Xeon whose AMX is hidden (as in
    many virtual machines) issues ``vdpbf16ps`` at half the rate of its two FMA ports, and a bfloat16 pass there ran
    1.45x slower than float32. So this times oneDNN's 64 -> 64 1x1 convolution of a channels-last 64-channel map in
    both precisions, at the current thread count, the fastest of interleaved repeats.
    """
    if not native_bf16():
        return None
    generator = torch.Generator().manual_seed(0)  # the caller's random stream stays untouched
    x = torch.randn(1, 64, 96, 96, generator=generator).contiguous(memory_format=torch.channels_last)
    w = torch.randn(64, 64, 1, 1, generator=generator)
    x16, w16 = x.bfloat16(), w.bfloat16()
    best = fastest_times({'fp32': lambda: F.conv2d(x, w), 'bf16': lambda: F.conv2d(x16, w16)})
    return best['fp32'] / best['bf16']


def fastest_times(runs: dict[str, Callable[[], object]], repeats: int = 7) -> dict[str, float]:
    """Seconds of the fastest call of each of ``runs``, called in turn ``repeats`` times without autograd; the first
    round, where oneDNN creates its primitives and the caches warm up, is not counted."""
    best = dict.fromkeys(runs, float('inf'))
    with torch.no_grad():
        for repeat in range(repeats):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                if repeat:
                    best[name] = min(best[name], time.perf_counter() - start)
    return best


def bf16_pays() -> bool:
    """Whether bfloat16 products beat float32 here by :data:`BF16_MIN_SPEEDUP` (False without native bfloat16)."""
    speedup = bf16_product_speedup()
    return speedup is not None and speedup >= BF16_MIN_SPEEDUP


def describe_cpu() -> str:
    """One line: ATen's vector capability and the native bfloat16 support, e.g.
    ``AVX512, native bf16: yes (bf16 products 2.05x the float32 rate)``."""
    bf16 = {True: 'yes', False: 'no', None: 'unknown'}[native_bf16()]
    speedup = bf16_product_speedup()
    rate = '' if speedup is None else f' (bf16 products {speedup:.2f}x the float32 rate)'
    return f'{torch.backends.cpu.get_cpu_capability()}, native bf16: {bf16}{rate}'
