"""Fail fast on option files: a message that names the key, before BasicSR builds anything.

BasicSR reports these mistakes late (after creating folders and loaders, or after training, at the
first validation), as a bare ``KeyError``/``ZeroDivisionError``, or not at all; :func:`check_options`
reports them up front. Option files are parsed with PyYAML's safe loader (:func:`ordered_safe_yaml`):
``!!python/...`` tags, which the full loader BasicSR uses would execute, are refused.
"""
from __future__ import annotations

import argparse
import ast
import inspect
import os
import re
import textwrap
from collections import OrderedDict

import torch
import yaml
from basicsr.utils.registry import ARCH_REGISTRY, DATASET_REGISTRY, LOSS_REGISTRY, METRIC_REGISTRY, MODEL_REGISTRY

_SafeLoaderBase = getattr(yaml, 'CSafeLoader', yaml.SafeLoader)


class OrderedSafeLoader(_SafeLoaderBase):
    """PyYAML's safe loader (plain YAML values only) that keeps mappings in file order, as BasicSR expects."""


class OrderedSafeDumper(yaml.SafeDumper):
    """PyYAML's safe dumper that writes ``OrderedDict`` as a plain mapping."""


def _construct_ordered(loader: yaml.SafeLoader, node: yaml.MappingNode) -> OrderedDict:
    loader.flatten_mapping(node)
    return OrderedDict(loader.construct_pairs(node))


OrderedSafeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_ordered)
OrderedSafeDumper.add_representer(OrderedDict, lambda dumper, data: dumper.represent_dict(data.items()))


def ordered_safe_yaml() -> tuple[type, type]:
    """Drop-in for ``basicsr.utils.options.ordered_yaml``: (loader, dumper), both safe."""
    return OrderedSafeLoader, OrderedSafeDumper


class OptionsError(ValueError):
    """An option file whose values cannot work; the message names the key."""


def _check_registered(registry, name: object, key: str) -> None:
    if name not in registry:
        known = ', '.join(sorted(registry.keys()))
        raise OptionsError(f'{key}: unknown {registry._name.lower()} type {name!r}; registered: {known}')


def _mapping(opt: dict, key: str, where: str = '') -> dict:
    value = opt.get(key)
    if not isinstance(value, dict):
        state = 'missing' if key not in opt else f'must be a mapping, got {value!r}'
        raise OptionsError(f'{where}{key}: {state}')
    return value


def _check_positive_int(section: dict, key: str, where: str) -> None:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        state = 'missing' if key not in section else f'{value!r}'
        raise OptionsError(f'{where}{key}: {state}; must be a whole number >= 1')


def _check_name(name: object) -> None:
    if not isinstance(name, str) or not name.strip():
        raise OptionsError(f'name: {name!r}; must be a non-empty folder name')
    if '/' in name or '\\' in name or '..' in name or name == '.':
        raise OptionsError(f"name: {name!r}; must be a plain folder name (no '/', '\\\\' or '..'): it becomes "
                           'experiments/<name> and results/<name>')


def _check_num_gpu(num_gpu: object) -> None:
    if num_gpu == 'auto':
        return
    if isinstance(num_gpu, bool) or not isinstance(num_gpu, int) or num_gpu < 0:
        raise OptionsError(f"num_gpu: {num_gpu!r}; must be 'auto' or a whole number >= 0 (0: the CPU)")
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if num_gpu > available:
        have = 'no CUDA device is' if available == 0 else f'only {available} CUDA device(s) are'
        raise OptionsError(f"num_gpu: {num_gpu} but {have} available (use 0 for the CPU, or 'auto')")


def _required_roots(dataset_type: str) -> list[str]:
    """The ``dataroot_gt``/``dataroot_lq`` keys that the dataset class's ``__init__`` always reads as
    ``opt['dataroot_..']``: subscripts in its top-level statements (not under ``if``/``try``, not in f-strings)."""
    try:
        source = textwrap.dedent(inspect.getsource(DATASET_REGISTRY.get(dataset_type).__init__))
        function = ast.parse(source).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return []
    roots = set()
    for statement in function.body:
        if isinstance(statement, (ast.If, ast.Try, ast.For, ast.While, ast.With)):
            continue
        strings = {id(n) for f in ast.walk(statement) if isinstance(f, ast.JoinedStr) for n in ast.walk(f)}
        for node in ast.walk(statement):
            if (isinstance(node, ast.Subscript) and id(node) not in strings and isinstance(node.value, ast.Name)
                    and node.value.id == 'opt' and isinstance(node.slice, ast.Constant)
                    and node.slice.value in ('dataroot_gt', 'dataroot_lq')):
                roots.add(node.slice.value)
    return sorted(roots)


def _check_datasets(opt: dict, is_train: bool) -> None:
    datasets = opt.get('datasets')
    if not isinstance(datasets, dict) or not datasets:
        raise OptionsError(f'datasets: {"missing" if "datasets" not in opt else "empty"}; '
                           f'list at least a {"train" if is_train else "test"} set')
    if is_train and not any(str(phase).split('_')[0] == 'train' for phase in datasets):
        raise OptionsError(f'datasets: no train set (phases found: {", ".join(map(str, datasets))})')
    scale = opt.get('scale')
    for phase, dataset in datasets.items():
        where = f'datasets.{phase}'
        if not isinstance(dataset, dict):
            raise OptionsError(f'{where}: must be a mapping, got {dataset!r}')
        _check_registered(DATASET_REGISTRY, dataset.get('type'), f'{where}.type')
        if dataset.get('scale') is not None and scale is not None and dataset['scale'] != scale:
            raise OptionsError(f'{where}.scale ({dataset["scale"]}) does not match scale ({scale})')
        for root in _required_roots(dataset['type']):
            if dataset.get(root) is None:
                raise OptionsError(f'{where}.{root}: missing; {dataset["type"]} needs it')
        for root in ('dataroot_gt', 'dataroot_lq', 'meta_info_file'):
            path = dataset.get(root)
            if path is not None and not os.path.exists(os.path.expanduser(str(path))):
                raise OptionsError(f'{where}.{root}: {path} does not exist')


def _check_tensors_only(key: str, path: str) -> None:
    """Refuse a checkpoint or state that does not load with ``weights_only=True`` (e.g. a pickle running code)."""
    try:
        torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # pickle.UnpicklingError for code, RuntimeError/EOFError for damaged files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise OptionsError(f'path.{key}: {path} does not load as tensors only (weights_only=True): {reason}') \
            from None


def check_options(opt: object, is_train: bool = True) -> None:
    """Raise :class:`OptionsError` for the first problem found in a parsed option dict.

    Messages start with the key at fault (``datasets.train.dataroot_gt: ...``), not with the file name.
    """
    import basicsr.archs  # noqa: F401  (fill the registries with BasicSR's own entries)
    import basicsr.data  # noqa: F401
    import basicsr.losses  # noqa: F401
    import basicsr.metrics  # noqa: F401
    import basicsr.models  # noqa: F401

    if opt is None:
        raise OptionsError('empty option file')
    if not isinstance(opt, dict):
        raise OptionsError(f'expected a mapping of option keys at the top level, got {type(opt).__name__}')
    for key in ('name', 'model_type', 'num_gpu', 'network_g', 'datasets', 'path'):
        if key not in opt:
            raise OptionsError(f'missing required key {key!r}')
    _check_name(opt['name'])
    _check_num_gpu(opt['num_gpu'])
    _check_registered(MODEL_REGISTRY, opt['model_type'], 'model_type')
    network = _mapping(opt, 'network_g')
    _check_registered(ARCH_REGISTRY, network.get('type'), 'network_g.type')
    scale, upscale = opt.get('scale'), network.get('upscale')
    if scale is not None and upscale is not None and scale != upscale:
        raise OptionsError(f'scale ({scale}) does not match network_g.upscale ({upscale})')
    _check_datasets(opt, is_train)
    if is_train:
        train = _mapping(opt, 'train')
        _check_positive_int(train, 'total_iter', 'train.')
        losses = [k for k, v in train.items() if k.endswith('_opt') and isinstance(v, dict)]
        for key in losses:
            _check_registered(LOSS_REGISTRY, train[key].get('type'), f'train.{key}.type')
        logger = _mapping(opt, 'logger')
        for key in ('print_freq', 'save_checkpoint_freq'):
            _check_positive_int(logger, key, 'logger.')
    val = opt.get('val')
    if val is not None:
        if not isinstance(val, dict):
            raise OptionsError(f'val: must be a mapping, got {val!r}')
        if is_train:
            _check_positive_int(val, 'val_freq', 'val.')
        metrics = val.get('metrics') or {}
        if not isinstance(metrics, dict):
            raise OptionsError(f'val.metrics: must be a mapping of metric names, got {metrics!r}')
        for name, metric in metrics.items():
            if not isinstance(metric, dict):
                raise OptionsError(f'val.metrics.{name}: must be a mapping with a type, got {metric!r}')
            _check_registered(METRIC_REGISTRY, metric.get('type'), f'val.metrics.{name}.type')
    paths = _mapping(opt, 'path')
    for key, path in paths.items():
        if path is None or not (key.startswith('pretrain_network') or key == 'resume_state'):
            continue
        path = os.path.expanduser(str(path))
        if not os.path.isfile(path):
            raise OptionsError(f'path.{key}: {path} does not exist')
        _check_tensors_only(key, path)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line for a YAML error: where, and what (a ``!!python`` tag is named as refused)."""
    mark = getattr(err, 'problem_mark', None)
    where = f'line {mark.line + 1}, column {mark.column + 1}: ' if mark is not None else ''
    problem = ' '.join(str(getattr(err, 'problem', None) or err).split())
    tag = re.search(r"tag '(tag:yaml\.org,2002:python/[^']*|![^']*)'", problem)
    if tag is not None:
        return (f'{where}tag {tag.group(1)!r} refused: option files may hold plain YAML values only '
                '(no !!python/... tags, which would run code)')
    return f'not valid YAML: {where}{problem}'


def load_options_file(path: str) -> object:
    """Parse an option file with :class:`OrderedSafeLoader`; ``SystemExit`` with one line naming the file."""
    try:
        with open(path, encoding='utf-8') as f:
            return yaml.load(f, Loader=OrderedSafeLoader)  # noqa: S506 (a safe loader)
    except OSError as err:
        raise SystemExit(f'-opt {path}: {err.strerror}') from None
    except UnicodeDecodeError:
        raise SystemExit(f'{path}: not a UTF-8 text file') from None
    except yaml.YAMLError as err:
        raise SystemExit(f'{path}: {_yaml_problem(err)}') from None


def _forced_value(text: str) -> object:
    """A ``--force_yml`` value as BasicSR 1.4.2's option parser reads it (``_postprocess_yml_value``): None, bools,
    ``!!float``, numbers, lists, else the string. Lists by ``ast.literal_eval``, where BasicSR calls ``eval``."""
    if text == '~' or text.lower() == 'none':
        return None
    if text.lower() in ('true', 'false'):
        return text.lower() == 'true'
    if text.startswith('!!float'):
        return float(text.removeprefix('!!float'))
    if text.isdigit():
        return int(text)
    if text.replace('.', '', 1).isdigit():
        return float(text)
    if text.startswith('['):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise OptionsError(f'--force_yml value {text!r}: not a list of plain values') from None
    return text


def apply_forced_options(opt: dict, entries: list[str]) -> None:
    """Apply BasicSR's ``--force_yml KEY[:SUBKEY...]=VALUE`` overrides to ``opt`` as its option parser will, so that
    the check sees the options that will run; :class:`OptionsError` for an entry BasicSR would fail on."""
    for entry in entries:
        if entry.count('=') != 1:
            raise OptionsError(f'--force_yml {entry!r}: expected KEY[:SUBKEY...]=VALUE with one "="')
        keys, value = (part.strip() for part in entry.split('='))
        *sections, last = keys.split(':')
        node = opt
        for depth, key in enumerate(sections, start=1):
            node = node.get(key) if isinstance(node, dict) else None
            if not isinstance(node, dict):
                where = '.'.join(sections[:depth])
                raise OptionsError(f'--force_yml {entry!r}: {where} is not a section of the option file')
        node[last] = _forced_value(value)


def check_options_file(argv: list[str], is_train: bool = True) -> None:
    """Check the ``-opt`` file named in BasicSR-style ``argv``, with its ``--force_yml`` overrides applied; exit with
    the message on a problem."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument('-opt')
    parser.add_argument('--force_yml', nargs='+', default=[])
    args = parser.parse_known_args(argv)[0]
    if args.opt is None:
        return  # BasicSR's own parser reports the missing -opt
    opt = load_options_file(args.opt)
    try:
        if isinstance(opt, dict):
            apply_forced_options(opt, args.force_yml)
        check_options(opt, is_train=is_train)
    except OptionsError as err:
        raise SystemExit(f'{args.opt}: {err}') from None
