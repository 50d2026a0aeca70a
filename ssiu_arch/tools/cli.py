"""Console scripts: ``basicsr train|test`` (BasicSR's own pipelines, plugin registered) and ``ssiu``."""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# Modules that each contribute one ``ssiu`` subcommand through ``add_parser(subparsers)``.
SUBCOMMAND_MODULES = (
    'ssiu_arch.tools.convert',
    'ssiu_arch.datasets_lmdb.cli',
    'ssiu_arch.tools.results',
    'ssiu_arch.tools.infer',
    'ssiu_arch.tools.bench',
    'ssiu_arch.tools.export',
)

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
    sys.argv = [f'basicsr {command}', *rest]
    if command == 'train':
        from basicsr.train import train_pipeline

        train_pipeline(os.getcwd())
    else:
        from basicsr.test import test_pipeline

        test_pipeline(os.getcwd())
    return 0


def ssiu_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog='ssiu', description='SSIU tools: checkpoints, data, inference, results.')
    subparsers = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).add_parser(subparsers)
    args = parser.parse_args(argv)
    return args.func(args)
