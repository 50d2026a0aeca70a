"""``ssiu convert``: write a checkpoint of any layout :mod:`ssiu_arch.utils.weights` reads as BasicSR's
``{'params': state_dict}``."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ssiu_arch.archs.ssiu_arch import SSIU
from ssiu_arch.tools.common import load_weights_or_exit
from ssiu_arch.utils.fileio import save_atomic
from ssiu_arch.utils.weights import infer_config, load_ssiu


def write_params(net: SSIU, dst: str | os.PathLike) -> dict[str, int]:
    """Save ``net`` as BasicSR's ``{'params': ...}`` at ``dst`` (atomically); returns its config."""
    config = infer_config(net.state_dict())
    save_atomic({'params': net.state_dict()}, dst)
    return config


def convert(src: str | os.PathLike, dst: str | os.PathLike) -> dict[str, int]:
    """Convert a checkpoint at ``src`` to BasicSR's ``{'params': ...}`` at ``dst``; returns its config."""
    return write_params(load_ssiu(src), dst)


def _run(args: argparse.Namespace) -> int:
    if Path(args.output).exists() and not args.overwrite:
        raise SystemExit(f'ssiu convert: {args.output} exists (use --overwrite)')
    net = load_weights_or_exit(args.checkpoint, 'convert')
    try:
        config = write_params(net, args.output)
    except OSError as err:
        raise SystemExit(f'ssiu convert: {args.output}: cannot write ({err.strerror or err})') from None
    print(' '.join(f'{k}={v}' for k, v in config.items()))
    print(f'wrote {args.output}')
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'convert', help='convert a published SSIU checkpoint to a BasicSR one',
        description='Read a published SSIU checkpoint (model_state_dict, module. prefix) or a BasicSR one, '
                    'print scale/num_feat/num_block and write {"params": state_dict} for BasicSR.')
    parser.add_argument('checkpoint', help='published (.pt) or BasicSR (.pth) checkpoint')
    parser.add_argument('output', help='BasicSR checkpoint to write')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output file')
    parser.set_defaults(func=_run)
