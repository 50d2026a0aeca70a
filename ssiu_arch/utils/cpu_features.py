"""What the CPU can do natively, detected at run time: bfloat16 dot products (AVX512_BF16 or AMX)."""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

# /proc/cpuinfo flags of instructions that multiply bfloat16 natively: AVX512_BF16 (AMD Zen 4/5, Intel Cooper
# Lake) and AMX-BF16 (Intel Sapphire Rapids and later).
BF16_FLAGS = ('avx512_bf16', 'amx_bf16')


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


def describe_cpu() -> str:
    """One line: ATen's vector capability and the native bfloat16 support, e.g. ``AVX512, native bf16: yes``."""
    bf16 = {True: 'yes', False: 'no', None: 'unknown'}[native_bf16()]
    return f'{torch.backends.cpu.get_cpu_capability()}, native bf16: {bf16}'
