"""Atomic writes: every file the plugin produces goes to a temporary name beside its target, then is renamed.

A crash, kill or full disk mid-write therefore leaves either the previous file or none, never a
truncated one; temporary names start with a dot and end in ``.tmp<pid>`` (plus ``suffix``), so
nothing that scans for ``*.pth``, ``*.state`` or ``*.png`` picks them up.
"""
from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch


def replace_atomic(path: str | os.PathLike, write: Callable[[Path], None], suffix: str = '') -> None:
    """Call ``write(tmp)`` for a temporary name beside ``path`` (folders created), then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f'.{path.name}.tmp{os.getpid()}{suffix}')
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
