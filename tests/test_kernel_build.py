"""The CPU kernels' first-use build: cached per torch/Python/machine, foreign builds refused, failures told once."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ssiu_arch.archs.ssiu_arch import SSIU
from ssiu_arch.cpu import build, kernels
from ssiu_arch.tools.cli import ssiu_main

REPO = Path(__file__).resolve().parents[1]

FORWARD = '''
import torch
from ssiu_arch.archs.ssiu_arch import SSIU
net = SSIU(upscale=2, num_feat=16, num_block=3).eval()
with torch.no_grad():
    for _ in range(2):
        out = net(torch.rand(1, 3, 16, 16))
print(tuple(out.shape))
'''


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty kernel cache, and no C++ compiler: nothing here may compile."""
    monkeypatch.setenv('SSIU_KERNEL_CACHE', str(tmp_path / 'cache'))
    monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
    return tmp_path / 'cache'


def seed(key: dict[str, str], library: bytes = b'') -> Path:
    """A build record for ``key`` and a library file in the cache folder of this machine's key."""
    folder = build.build_folder(build.build_key())
    folder.mkdir(parents=True)
    (folder / 'ssiu_kernels.so').write_bytes(library)
    (folder / 'build.json').write_text(json.dumps({'key': key, 'library': 'ssiu_kernels.so'}))
    return folder


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ('SSIU_NO_KERNELS', 'SSIU_KERNELS_REBUILD')}
    return {**env, **extra}


def test_matching_build_is_used_without_compiling(cache):
    folder = seed(build.build_key())
    assert build.library() == folder / 'ssiu_kernels.so'


@pytest.mark.parametrize('field, value', [('torch', '2.0.0'), ('python', '.cpython-39-x86_64-linux-gnu.so'),
                                          ('machine', 'linux-aarch64'), ('source_sha256', '0' * 64)])
def test_foreign_build_is_refused_with_the_reason(cache, field, value):
    seed({**build.build_key(), field: value})
    with pytest.raises(build.KernelBuildError) as err:
        build.library()
    message = str(err.value)
    assert f"built for another {field} '{value}'" in message
    assert 'no C++ compiler' in message and 'set CXX' in message


def test_builds_for_other_torch_versions_live_apart(monkeypatch):
    key = build.build_key()
    other = {**key, 'torch': '2.0.0'}
    assert build.build_folder(key) != build.build_folder(other)
    monkeypatch.setattr(build.torch, '__version__', '2.0.0')
    assert build.build_key()['torch'] == '2.0.0'


def test_failed_build_is_recorded_and_not_retried(cache, tmp_path, monkeypatch):
    calls = tmp_path / 'calls'
    compiler = tmp_path / 'old-c++'
    compiler.write_text('#!/bin/sh\n'
                        f'echo "$@" >> {calls}\n'
                        'case "$1" in --version) echo "oldcc 4.8"; exit 0;; esac\n'
                        'echo "kernels.cpp:60:18: error: __builtin_shufflevector is not supported" >&2\n'
                        'exit 1\n')
    compiler.chmod(0o755)
    monkeypatch.setenv('CXX', str(compiler))
    with pytest.raises(build.KernelBuildError, match='build with oldcc 4.8 failed: .*__builtin_shufflevector'):
        build.library()
    compiles = calls.read_text().count('kernels.cpp')
    assert compiles >= 1
    with pytest.raises(build.KernelBuildError, match='SSIU_KERNELS_REBUILD=1 retries'):
        build.library()
    assert calls.read_text().count('kernels.cpp') == compiles  # the recorded failure, no second compile
    log = next(cache.glob('*/build.log'))
    assert '__builtin_shufflevector' in log.read_text()


def test_missing_compiler_gives_one_notice_and_the_model_runs(tmp_path):
    env = subprocess_env(SSIU_KERNEL_CACHE=str(tmp_path / 'cache'), CXX=str(tmp_path / 'no-such-compiler'))
    run = subprocess.run([sys.executable, '-c', FORWARD], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == '(1, 3, 32, 32)'
    notices = [line for line in run.stderr.splitlines() if 'compiled CPU kernels' in line]
    assert len(notices) == 1, run.stderr
    assert 'unavailable (no C++ compiler' in notices[0] and notices[0].endswith('about 2x slower')


def test_switched_off_kernels_are_reported_not_warned(tmp_path):
    script = 'from ssiu_arch.cpu import kernels; print(kernels.status()); print(kernels.available())'
    env = subprocess_env(SSIU_NO_KERNELS='1', SSIU_KERNEL_CACHE=str(tmp_path / 'cache'))
    run = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert run.stdout.splitlines() == ["(False, 'switched off by SSIU_NO_KERNELS')", 'False']
    assert 'compiled CPU kernels' not in run.stderr



def test_ssiu_infer_prints_the_kernel_state(tmp_path, capsys):
    torch.manual_seed(1)
    weights = tmp_path / 'net_g.pth'
    torch.save({'params': SSIU(upscale=2, num_feat=8, num_block=1, num_heads=2).state_dict()}, weights)
    cv2.imwrite(str(tmp_path / 'lr.png'), np.full((12, 16, 3), 128, np.uint8))
    assert ssiu_main(['infer', str(tmp_path / 'lr.png'), '-w', str(weights), '-o', str(tmp_path / 'out')]) == 0
    loaded, path = kernels.status()
    assert f'compiled CPU kernels: loaded ({path})' in capsys.readouterr().out and loaded

@pytest.mark.slow
def test_wheel_installed_in_a_fresh_venv_compiles_and_loads_the_kernels(tmp_path, monkeypatch):
    """``pip wheel .``, then that wheel installed into a new venv that reuses this one's packages (nothing is
    downloaded): the first use compiles the kernels into an empty cache, replacing a foreign build found there."""
    source = tmp_path / 'src'
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns('.*', 'build', 'dist', '*.egg-info', '__pycache__',
                                                                '*.so', 'experiments', 'results'))
    venv = tmp_path / 'venv'
    subprocess.run([sys._base_executable, '-m', 'venv', '--without-pip', str(venv)], check=True, timeout=120)
    python = venv / 'bin' / 'python'
    site = subprocess.run([python, '-c', 'import sysconfig; print(sysconfig.get_paths()["purelib"])'],
                          capture_output=True, text=True, check=True).stdout.strip()
    (Path(site) / 'outer_venv.pth').write_text(sysconfig.get_paths()['purelib'] + '\n')
    pip = [python, '-m', 'pip', '--disable-pip-version-check', '--no-input']
    subprocess.run([*pip, 'wheel', '--no-deps', '--no-build-isolation', '--no-index', '-w', tmp_path / 'wheels',
                    source], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / 'wheels').glob('ssiu-*.whl'))
    assert 'ssiu_arch/cpu/csrc/kernels.cpp' in zipfile.ZipFile(wheel).namelist()
    subprocess.run([*pip, 'install', '--no-deps', '--no-index', wheel], check=True, capture_output=True, timeout=300)

    monkeypatch.setenv('SSIU_KERNEL_CACHE', str(tmp_path / 'cache'))
    foreign = seed({**build.build_key(), 'torch': '2.0.0'}, library=b'not a library')
    script = 'import ssiu_arch; from ssiu_arch.cpu import kernels; print(ssiu_arch.__file__); print(kernels.status())'
    run = subprocess.run([python, '-c', script], capture_output=True, text=True, cwd=tmp_path, timeout=900,
                         env=subprocess_env(SSIU_KERNEL_CACHE=str(tmp_path / 'cache')))
    assert run.returncode == 0, run.stderr
    module, state = run.stdout.splitlines()
    assert Path(module).is_relative_to(venv)
    assert state == f"(True, '{foreign / 'ssiu_kernels.so'}')"
    assert 'compiling SSIU CPU kernels' in run.stderr
    assert json.loads((foreign / 'build.json').read_text())['key'] == build.build_key()
