"""Atomic writes: every file the plugin produces goes to a temporary name beside its target, then is renamed.

A crash, kill or full disk mid-write therefore leaves either the previous file or none, never a
truncated one; temporary names start with a dot and end in ``.tmp<pid>`` (plus ``suffix``), so
nothing that scans for ``*.pth``, ``*.state`` or ``*.png`` picks them up. A process killed mid-write
leaves its temporary file behind; :func:`remove_stale_temporaries` deletes those of dead processes, and
:func:`replace_atomic` calls it on each folder the first time a process writes there (checkpoints, converted
weights, exports, tables, images).
"""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch

_TEMPORARY = re.compile(r'^\.(?P<name>.+)\.tmp(?P<pid>\d+)(?P<suffix>[^\d].*)?$')
_SWEPT: set[Path] = set()  # folders whose stale temporaries this process has removed


def temporary_path(path: Path, suffix: str = '') -> Path:
    """The hidden name beside ``path`` that this process writes before renaming: ``.NAME.tmp<pid><suffix>``."""
    return path.with_name(f'.{path.name}.tmp{os.getpid()}{suffix}')


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    except (OverflowError, OSError):
        return False
    return True


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of :func:`replace_atomic` in ``folder`` whose writing process is gone.

    A run killed mid-write leaves ``.NAME.tmp<pid>``; once no process has that id, nobody will rename
    it. Files of live processes (another run writing into the same folder) are left alone. Returns the
    paths removed.
    """
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.match(entry.name)
        if match is None or not entry.is_file(follow_symlinks=False) or _process_alive(int(match['pid'])):
            continue
        try:
            os.unlink(entry.path)
        except OSError:
            continue
        removed.append(Path(entry.path))
    return removed


def replace_atomic(path: str | os.PathLike, write: Callable[[Path], None], suffix: str = '') -> None:
    """Call ``write(tmp)`` for a temporary name beside ``path`` (folders created), then rename it to ``path``.

    The first write of a process into a folder also removes the temporaries that killed runs left there.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()
    if folder not in _SWEPT:
        remove_stale_temporaries(folder)
        _SWEPT.add(folder)
    tmp = temporary_path(path, suffix)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    replace_atomic(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    replace_atomic(path, lambda tmp: tmp.write_text(text, encoding='utf-8', newline=''))


def save_atomic(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` written atomically."""
    replace_atomic(path, lambda tmp: torch.save(obj, tmp))
