"""``ssiu convert``: rewrite a checkpoint of any layout :mod:`ssiu_arch.utils.weights` reads as BasicSR's
``{'params': state_dict, 'network_g': {...}}`` ``.pth`` (the default) or as ``.safetensors``."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from ssiu_arch.tools.common import load_weights_or_exit
from ssiu_arch.utils.weights import build_network, save_weights

FORMATS = ('pth', 'safetensors')


def convert(src: str | os.PathLike, dst: str | os.PathLike, fmt: str | None = None) -> dict:
    """Convert the checkpoint at ``src`` to ``dst`` (format ``fmt``, default from its suffix); returns its
    ``network_g`` dict, which the output carries."""
    net, options = build_network(src)
    save_weights(dst, net.state_dict(), options, fmt)
    return options


def _run(args: argparse.Namespace) -> int:
    fmt = args.format or ('safetensors' if Path(args.output).suffix.lower() == '.safetensors' else 'pth')
    expected = '.safetensors' if fmt == 'safetensors' else '.pth'
    if Path(args.output).suffix.lower() != expected:
        raise SystemExit(f'ssiu convert: --format {fmt} writes {expected} files; name the output '
                         f'{Path(args.output).with_suffix(expected).name}')
    if Path(args.output).exists() and not args.overwrite:
        raise SystemExit(f'ssiu convert: {args.output} exists (use --overwrite)')
    net, options = load_weights_or_exit(args.checkpoint, 'convert', load=build_network)
    try:
        save_weights(args.output, net.state_dict(), options, fmt)
    except OSError as err:
        raise SystemExit(f'ssiu convert: {args.output}: cannot write ({err.strerror or err})') from None
    print(' '.join(f'{k}={v}' for k, v in options.items()))
    print(f'wrote {args.output}')
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'convert', help='convert SSIU / IDSA-Net weights to BasicSR .pth or .safetensors',
        description='Read SSIU or IDSA-Net weights in any layout (published model_state_dict with module. prefix, '
                    'BasicSR params/params_ema, a bare state dict; .pth, .pt or .safetensors), print the network '
                    'options and write them with the weights: .pth as {"params": state_dict, "network_g": options} '
                    '(BasicSR and Real-ESRGAN load it), .safetensors with the options as JSON metadata.')
    parser.add_argument('checkpoint', help='weights to read (.pth, .pt or .safetensors)')
    parser.add_argument('output', help='file to write (.pth or .safetensors)')
    parser.add_argument('--format', choices=FORMATS,
                        help='output format (default: from the output suffix, .pth unless .safetensors)')
    parser.add_argument('--overwrite', action='store_true', help='replace an existing output file')
    parser.set_defaults(func=_run)
