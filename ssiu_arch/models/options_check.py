"""Fail fast on option files: a message that names the key, before BasicSR builds anything.

BasicSR reports these mistakes late (after creating folders and loaders) or as a bare ``KeyError``;
:func:`check_options` reports them up front.
"""
from __future__ import annotations

import argparse
import os

import yaml
from basicsr.utils.options import ordered_yaml
from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, MODEL_REGISTRY


class OptionsError(ValueError):
    """An option file whose values cannot work; the message names the key."""


def _check_registered(registry, name: object, key: str) -> None:
    if name not in registry:
        known = ', '.join(sorted(registry.keys()))
        raise OptionsError(f'{key}: unknown {registry._name.lower()} type {name!r}; registered: {known}')


def check_options(opt: dict, is_train: bool = True, source: str = 'options') -> None:
    """Raise :class:`OptionsError` for the first problem found in a parsed option dict."""
    import basicsr.archs  # noqa: F401  (fill the registries with BasicSR's own entries)
    import basicsr.data  # noqa: F401
    import basicsr.losses  # noqa: F401
    import basicsr.models  # noqa: F401

    for key in ('name', 'model_type', 'network_g', 'datasets'):
        if key not in opt:
            raise OptionsError(f'{source}: missing required key {key!r}')
    _check_registered(MODEL_REGISTRY, opt['model_type'], 'model_type')
    network = opt['network_g']
    _check_registered(ARCH_REGISTRY, network.get('type'), 'network_g.type')
    scale, upscale = opt.get('scale'), network.get('upscale')
    if scale is not None and upscale is not None and scale != upscale:
        raise OptionsError(f'scale ({scale}) does not match network_g.upscale ({upscale})')
    for phase, dataset in opt['datasets'].items():
        _check_registered(DATASET_REGISTRY, dataset.get('type'), f'datasets.{phase}.type')
        if dataset.get('scale') is not None and scale is not None and dataset['scale'] != scale:
            raise OptionsError(f'datasets.{phase}.scale ({dataset["scale"]}) does not match scale ({scale})')
        for root in ('dataroot_gt', 'dataroot_lq', 'meta_info_file'):
            path = dataset.get(root)
            if path is not None and not os.path.exists(os.path.expanduser(path)):
                raise OptionsError(f'datasets.{phase}.{root}: {path} does not exist')
    if is_train:
        losses = [k for k, v in opt.get('train', {}).items() if k.endswith('_opt') and isinstance(v, dict)]
        for key in losses:
            _check_registered(LOSS_REGISTRY, opt['train'][key].get('type'), f'train.{key}.type')
    for key, path in opt.get('path', {}).items():
        if key.startswith('pretrain_network') and path is not None and not os.path.isfile(os.path.expanduser(path)):
            raise OptionsError(f'path.{key}: {path} does not exist')


def check_options_file(argv: list[str], is_train: bool = True) -> None:
    """Check the ``-opt`` file named in BasicSR-style ``argv``; exit with the message on a problem."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('-opt')
    path = parser.parse_known_args(argv)[0].opt
    if path is None:
        return  # BasicSR's own parser reports the missing -opt
    try:
        with open(path, encoding='utf-8') as f:
            opt = yaml.load(f, Loader=ordered_yaml()[0])
    except OSError as err:
        raise SystemExit(f'-opt {path}: {err.strerror}') from None
    except yaml.YAMLError as err:
        raise SystemExit(f'-opt {path}: not valid YAML: {err}') from None
    try:
        check_options(opt, is_train=is_train, source=path)
    except OptionsError as err:
        raise SystemExit(f'{path}: {err}') from None
