"""Build the compiled CPU kernels (``csrc/kernels.cpp``) on first use, into a per-user cache.

Why on first use rather than in ``setup.py``: pip builds a package in an isolated environment without torch,
so an install-time build is silently skipped by ``pip install .``, ``pip wheel .`` and sdists, and a library
built at install time stays tied to the torch it saw then. ``torch.utils.cpp_extension.load`` at first use
builds against the torch, Python and machine that actually import the package, by the same route for every
kind of install.

The cache is ``$SSIU_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/ssiu/kernels``, else ``~/.cache/ssiu/kernels``. Each
build has its own folder, named after a hash of everything the library depends on (:func:`build_key`: the
source, the build flags, torch's version, commit and C++ ABI, the Python ABI and the machine), with
``build.json`` recording those; a library is used only when that record matches. The build flags select no
CPU features: GCC compiles each hot loop for AVX-512, AVX2 and plain x86-64 (``target_clones``) and picks one
when the library loads, so one build serves every CPU of a machine architecture. A lock keeps concurrent
processes from building at once; a failed build is recorded, with its log, and not retried for the same
compiler until ``SSIU_KERNELS_REBUILD=1``.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock

from ssiu_arch.utils.fileio import write_text_atomic

SOURCE = Path(__file__).parent / 'csrc' / 'kernels.cpp'
NAME = 'ssiu_kernels'
CFLAGS = ('-O3', '-fopenmp')
LDFLAGS = ('-fopenmp',)


class KernelBuildError(RuntimeError):
    """The kernels cannot be built or used here; the message says why in one line."""


def cache_root() -> Path:
    """The folder holding every build: ``$SSIU_KERNEL_CACHE``, else the user's cache folder."""
    if os.environ.get('SSIU_KERNEL_CACHE'):
        return Path(os.environ['SSIU_KERNEL_CACHE']).expanduser()
    base = os.environ.get('XDG_CACHE_HOME') or Path.home() / '.cache'
    return Path(base) / 'ssiu' / 'kernels'


def build_key() -> dict[str, str]:
    """What a built library depends on; a library built under any other key is never loaded."""
    return {
        'source_sha256': hashlib.sha256(SOURCE.read_bytes()).hexdigest(),
        'flags': ' '.join(CFLAGS) + '; link ' + ' '.join(LDFLAGS),
        'torch': torch.__version__,
        'torch_git': str(torch.version.git_version),
        'cxx11_abi': str(int(torch._C._GLIBCXX_USE_CXX11_ABI)),
        'python': sysconfig.get_config_var('EXT_SUFFIX') or sys.implementation.cache_tag,
        'machine': f'{sys.platform}-{platform.machine()}',
    }


def build_folder(key: dict[str, str]) -> Path:
    """The cache folder of the build for ``key``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / f'torch{key["torch"]}-{sys.implementation.cache_tag}-{platform.machine()}-{digest}'


def library(rebuild: bool = False) -> Path:
    """The path of a library built for this torch, Python and machine, building it first when there is none
    (or when ``rebuild``). The build loads it into ``torch.ops.ssiu`` as a side effect.

    Raises :class:`KernelBuildError` with the reason when it cannot be built.
    """
    key = build_key()
    folder = build_folder(key)
    if not rebuild and _mismatch(folder, key) is None:
        return _library_path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder) + '.lock')
        lock.acquire()
    except OSError as err:
        raise KernelBuildError(f'kernel cache {folder.parent} is not writable ({err}); set SSIU_KERNEL_CACHE') from None
    try:
        stale = _mismatch(folder, key)  # another process may have built it while this one waited
        if stale is None and not rebuild:
            return _library_path(folder)
        return _build(folder, key, stale, rebuild)
    finally:
        lock.release()


def _library_path(folder: Path) -> Path:
    """The library a build recorded in ``folder`` (checked by :func:`_mismatch`)."""
    return folder / json.loads((folder / 'build.json').read_text(encoding='utf-8'))['library']


def _mismatch(folder: Path, key: dict[str, str]) -> str | None:
    """None when ``folder`` holds a library built under ``key``; else why it cannot be used ('' when absent)."""
    record = folder / 'build.json'
    if not record.is_file():
        return ''
    try:
        built = json.loads(record.read_text(encoding='utf-8'))
        built, library_name = built['key'], Path(built['library']).name
    except (OSError, ValueError, KeyError, TypeError):
        return f'unreadable build record {record}'
    differences = [f'{name} {built.get(name)!r} (here {value!r})' for name, value in key.items()
                   if built.get(name) != value]
    if differences:
        return f'library in {folder} was built for another ' + ', '.join(differences)
    if not (folder / library_name).is_file():
        return f'library missing from {folder}'
    return None


def _build(folder: Path, key: dict[str, str], stale: str | None, rebuild: bool) -> Path:
    """Compile the kernels into ``folder`` (emptied first) and record ``key`` and the library's name; on failure
    record and raise why."""
    from torch.utils.cpp_extension import get_cxx_compiler, load

    refused = f'{stale}; ' if stale else ''
    compiler = get_cxx_compiler()
    identity = _compiler_identity(compiler)
    if identity is None:
        raise KernelBuildError(f'{refused}no C++ compiler ({compiler!r} not found; set CXX)')
    failure = folder / 'failed.json'
    if not rebuild and failure.is_file():
        try:
            failed = json.loads(failure.read_text(encoding='utf-8'))
        except (OSError, ValueError):
            failed = {}
        if failed.get('key') == key and failed.get('compiler') == identity:
            raise KernelBuildError(f'{failed.get("reason")}; SSIU_KERNELS_REBUILD=1 retries')
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    print(f'compiling SSIU CPU kernels (once, ~1 min) into {folder} ...', file=sys.stderr, flush=True)
    try:
        with _ninja_on_path():  # (copies of the flags: load() extends its lists)
            path = Path(load(NAME, [str(SOURCE)], extra_cflags=list(CFLAGS), extra_ldflags=list(LDFLAGS),
                             build_directory=str(folder), is_python_module=False))
    except KernelBuildError as err:
        raise KernelBuildError(f'{refused}{err}') from None
    except Exception as err:  # a compiler error, a link error or a library that does not load
        log = folder / 'build.log'
        write_text_atomic(log, f'{identity}\n{err}\n')
        reason = f'{refused}build with {identity} failed: {_first_error(str(err))} (log: {log})'
        write_text_atomic(failure, json.dumps({'key': key, 'compiler': identity, 'reason': reason}, indent=2))
        raise KernelBuildError(reason) from None
    record = {'key': key, 'library': path.name, 'compiler': identity}
    write_text_atomic(folder / 'build.json', json.dumps(record, indent=2) + '\n')
    return path


def _first_error(output: str) -> str:
    """The compiler's first error line in a build's output (else its first line), at most 200 characters."""
    lines = [line.strip() for line in output.splitlines() if line.strip()] or ['no output']
    line = next((line for line in lines if ': error' in line or 'undefined symbol' in line), lines[0])
    return line if len(line) <= 200 else line[:197] + '...'


def _compiler_identity(compiler: str) -> str | None:
    """The first line of ``compiler --version``; None when it does not run."""
    try:
        out = subprocess.run([compiler, '--version'], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    first = out.stdout.strip().splitlines()[:1]
    return first[0] if out.returncode == 0 and first else None


@contextmanager
def _ninja_on_path():
    """Make ``ninja`` (which ``cpp_extension.load`` runs) reachable: the system's, else the ``ninja`` package's."""
    if shutil.which('ninja'):
        yield
        return
    try:
        import ninja
    except ImportError:
        raise KernelBuildError('ninja not found (pip install ninja)') from None
    path = os.environ.get('PATH', '')
    os.environ['PATH'] = ninja.BIN_DIR + os.pathsep + path
    try:
        yield
    finally:
        os.environ['PATH'] = path
