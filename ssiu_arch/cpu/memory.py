"""Whether freed memory stays with the process, and the glibc setting that makes it stay.

Eager PyTorch allocates every intermediate map afresh. With glibc malloc's default settings, blocks above
its mmap threshold (at most 32 MiB) get a fresh mapping and free space at the top of the heap goes back to
the OS, so each new feature map is zero-filled page by page: SSIU x2 on 640x360 page-faults about 3
million times per pass. The CPU inference engine (:mod:`ssiu_arch.cpu.engine`) processes large maps in row
bands, from a smaller size in that case.
"""
from __future__ import annotations

import ctypes
import os

_RETAINED = False
# Environment variables (read by glibc at start-up) and preloaded allocators that keep freed memory.
_MALLOC_ENV = ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_')
_ALLOCATORS = ('jemalloc', 'tcmalloc', 'mimalloc')


def retain_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse instead of unmapping or trimming it; False if not glibc.

    This raises both thresholds to 1 GiB, the in-process equivalent of ``MALLOC_MMAP_THRESHOLD_``/
    ``MALLOC_TRIM_THRESHOLD_`` (or of jemalloc/tcmalloc, as PyTorch's CPU tuning guide suggests):
    process-wide, and memory freed after a pass stays with the process.
    """
    global _RETAINED
    try:
        mallopt = ctypes.CDLL('libc.so.6').mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    _RETAINED = bool(mallopt(m_mmap_threshold, 1 << 30)) and bool(mallopt(m_trim_threshold, 1 << 30))
    return _RETAINED


def freed_memory_retained() -> bool:
    """Whether this process keeps freed memory: :func:`retain_freed_memory`, the malloc environment or a
    preloaded allocator."""
    preload = os.environ.get('LD_PRELOAD', '')
    return _RETAINED or any(os.environ.get(k) for k in _MALLOC_ENV) or any(a in preload for a in _ALLOCATORS)
