"""Atomic writes: the first write of a process into a folder removes what killed runs left there."""
from __future__ import annotations

import os
import subprocess
import sys

from ssiu_arch.utils import fileio


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, '-c', 'pass'])
    child.wait()
    return child.pid


def test_first_write_into_a_folder_removes_stale_temporaries_of_dead_processes(tmp_path, monkeypatch):
    monkeypatch.setattr(fileio, '_SWEPT', set())
    stale = tmp_path / f'.net_g_500.pth.tmp{dead_pid()}'
    live = tmp_path / f'.net_g_600.pth.tmp{os.getpid()}x'
    other = tmp_path / '.hidden.tmpnotes'
    for path in (stale, live, other):
        path.write_bytes(b'partial')
    fileio.write_text_atomic(tmp_path / 'metrics.json', '{}')
    assert not stale.exists()
    assert live.exists() and other.exists()
    assert (tmp_path / 'metrics.json').read_text() == '{}'
    stale.write_bytes(b'partial')  # later writes of the same process do not scan the folder again
    fileio.write_text_atomic(tmp_path / 'metrics.json', '{"a": 1}')
    assert stale.exists()
