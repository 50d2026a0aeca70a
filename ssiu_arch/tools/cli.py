"""Console scripts: ``basicsr train|test`` (BasicSR's own pipelines, plugin registered) and ``ssiu``."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Each ``ssiu`` subcommand and the module that adds it through ``add_parser(subparsers)``. Only the module of
# the subcommand being run is imported, so that infer/export/convert/lmdb need no basicsr (``ssiu results``
# computes BasicSR's metrics and does).
SUBCOMMANDS = {
    'convert': 'ssiu_arch.tools.convert',
    'lmdb': 'ssiu_arch.datasets_lmdb.cli',
    'results': 'ssiu_arch.tools.results',
    'infer': 'ssiu_arch.tools.infer',
    'bench': 'ssiu_arch.tools.bench',
    'export': 'ssiu_arch.tools.export',
}
# Subcommands that use BasicSR: the BasicSR layer (its compatibility fixes) is imported before them.
BASICSR_SUBCOMMANDS = ('results',)

_BASICSR_USAGE = """usage: basicsr {train,test} -opt OPTIONS.yml [--launcher {none,pytorch,slurm}] [--auto_resume]
                       [--debug] [--force_yml KEY=VALUE ...]

Run BasicSR's own train_pipeline / test_pipeline with the SSIU plugin registered. Experiments go to
./experiments/<name>, test results to ./results/<name>, relative to the current directory.

  train   basicsr.train.train_pipeline (--auto_resume continues from the latest training state)
  test    basicsr.test.test_pipeline
"""


def basicsr_main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ('-h', '--help') or argv[0] not in ('train', 'test'):
        print(_BASICSR_USAGE, file=sys.stdout if argv and argv[0] in ('-h', '--help') else sys.stderr)
        return 0 if argv and argv[0] in ('-h', '--help') else 2
    command, rest = argv[0], argv[1:]
    import ssiu_arch.models  # noqa: F401  (registers the plugin and applies compatibility fixes)
    from ssiu_arch.models.options_check import check_options_file

    if '-h' not in rest and '--help' not in rest:
        check_options_file(rest, is_train=command == 'train')
    from basicsr.test import test_pipeline
    from basicsr.train import train_pipeline

    from ssiu_arch.utils.weights import CheckpointError

    sys.argv = [f'basicsr {command}', *rest]
    try:
        (train_pipeline if command == 'train' else test_pipeline)(os.getcwd())
    except CheckpointError as err:  # path.pretrain_network_g that cannot be read or does not fit network_g
        raise SystemExit(f'basicsr {command}: {err}') from None
    return 0


def ssiu_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='ssiu', description='SSIU tools: checkpoints, data, inference, results.')
    subparsers = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith('-')), None)
    for name, module in SUBCOMMANDS.items():
        if chosen in SUBCOMMANDS and name != chosen:
            continue
        try:
            if name in BASICSR_SUBCOMMANDS:
                importlib.import_module('ssiu_arch.models')
            importlib.import_module(module).add_parser(subparsers)
        except ImportError as err:  # a subcommand whose extra is not installed
            missing = err.name or str(err)
            extra = 'basicsr' if missing.split('.')[0] in ('basicsr', 'torchvision') else None
            hint = f"pip install 'ssiu[{extra}]'" if extra else f'install {missing}'
            if name == chosen:
                message = f'ssiu {name}: needs {missing}, which is not installed or does not import ({hint})'
                raise SystemExit(message) from None
            subparsers.add_parser(name, help=f'(unavailable: needs {missing}; {hint})')
    args = parser.parse_args(argv)
    return args.func(args)

