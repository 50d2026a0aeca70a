"""What the ``ssiu`` subcommands share: reading a checkpoint with a one-line error instead of a traceback,
and argument types."""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from ssiu_arch.utils.weights import CheckpointError, load_ssiu


def one_line(err: BaseException, limit: int = 400) -> str:
    """``str(err)`` on one line (whitespace collapsed), cut at ``limit`` characters."""
    text = ' '.join(str(err).split()) or type(err).__name__
    return text if len(text) <= limit else text[:limit - 3] + '...'


def load_weights_or_exit(path: str | os.PathLike, command: str, load: Callable = load_ssiu) -> Any:
    """``load(path)`` (default :func:`~ssiu_arch.utils.weights.load_ssiu`), or ``SystemExit`` with one line naming
    ``path``."""
    try:
        return load(path)
    except CheckpointError as err:
        raise SystemExit(f'ssiu {command}: {one_line(err)}') from None
    except (ValueError, KeyError, IndexError, TypeError, AttributeError, RuntimeError) as err:
        raise SystemExit(f'ssiu {command}: {path}: not a usable SSIU checkpoint '
                         f'({type(err).__name__}: {one_line(err)})') from None


def positive_int(text: str) -> int:
    """``argparse`` type: a whole number >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f'expected a whole number >= 1, got {text!r}')
    return int(text)
