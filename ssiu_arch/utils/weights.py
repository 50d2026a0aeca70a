"""The one place where SSIU and IDSA-Net weights are read and written.

Reads, from ``.pth``/``.pt`` (``torch.load(..., weights_only=True)``: a checkpoint is untrusted input) or
``.safetensors``:

* BasicSR checkpoints, ``{'params': ..., 'params_ema': ...}`` (``params_ema`` preferred);
* published checkpoints (github.com/eezkni/SSIU), ``{'epoch': ..., 'model_state_dict': ...}`` with the
  ``module.`` prefix of ``nn.DataParallel``;
* bare state dicts, such as spandrel, chaiNNer and traiNNer-redux save.

Most hyper-parameters follow from the tensor shapes (:func:`infer_config`). Those that do not (SSIU:
``block_size``/``halo`` split of the attention window, ``attn_downsample`` when above 1, ``pad_multiple``,
``expert_steps``; IDSA-Net: ``lka_dilation``) travel in the files this project writes as a BasicSR
``network_g`` dict: an entry ``'network_g'`` beside ``'params'`` in ``.pth`` files, JSON under the
``network_g`` key of the metadata of ``.safetensors`` files. A file without it gets the paper's defaults
(:data:`DEFAULTS`). Every failure is a :class:`CheckpointError` whose one-line message names the file.
"""
from __future__ import annotations

import inspect
import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from ssiu_arch.archs.idsanet_arch import IDSANet
from ssiu_arch.archs.ssiu_arch import SSIU
from ssiu_arch.utils.fileio import replace_atomic, save_atomic

ARCHS = {'SSIU': SSIU, 'IDSANet': IDSANet}
CONFIG_KEY = 'network_g'
# Entries of a checkpoint dict that may hold the state dict, in order of preference.
STATE_KEYS = ('params_ema', 'params', 'model_state_dict', 'state_dict')
# Keys that identify each architecture's state dict (also spandrel's detection keys).
ARCH_KEYS = {
    'SSIU': ('head.weight', 'body.0.norm.body.weight', 'body.0.s1.project_in1.weight',
             'body.0.s1.project_in2.1.weight', 'body.0.s3.rel_h', 'body.0.s3.qkv_conv.weight',
             'body.0.ffn.project_out.weight', 'moe.fc_a.weight', 'moe.fuse.weight', 'tail.0.weight'),
    'IDSANet': ('head.weight', 'body.0.attn_map.rel_bias', 'body.0.attn_map.qk.weight', 'body.0.distill.0.weight',
                'body.0.refine.0.local_conv.weight', 'body.0.refine.0.smu.conv.weight', 'body.0.purify.dw.weight',
                'body.0.purify.dw_dilated.weight', 'body.0.attention.conv_h.weight', 'body_conv.weight',
                'tail.0.weight'),
}
# Hyper-parameters the shapes cannot tell, and what a file without them gets: the papers' values.
# SSIU's block_size is the attention window minus 2 halo; pad_multiple is raised to a multiple of
# block_size * attn_downsample where 16 is not one; expert_steps None is the published choice.
DEFAULTS = {
    'SSIU': {'halo': 1, 'attn_downsample': 2, 'pad_multiple': 16, 'expert_steps': None},
    'IDSANet': {'lka_dilation': 3},
}

_INDEX = re.compile(r'^(\w+)\.(\d+)\.')


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not hold a network of this package."""


def read_checkpoint(path: str | os.PathLike, param_key: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict stored in ``path`` (``module.`` prefix removed) and its stored ``network_g`` dict ({} if none).

    ``param_key`` picks an entry of a checkpoint dict; by default the first of :data:`STATE_KEYS` present, or
    the whole dict when it holds only tensors. Non-finite weights are refused.
    """
    if Path(path).suffix.lower() == '.safetensors':
        ckpt, config = _read_safetensors(path)
    else:
        ckpt = _read_torch(path)
        config = ckpt.get(CONFIG_KEY, {})
    keys = [param_key] if param_key is not None else list(STATE_KEYS)
    state = next((ckpt[k] for k in keys if isinstance(ckpt.get(k), dict)), None)
    if state is None:
        tensors = {k: v for k, v in ckpt.items() if k != CONFIG_KEY}
        if param_key is not None or not tensors or not all(isinstance(v, torch.Tensor) for v in tensors.values()):
            raise CheckpointError(f'{path}: none of {keys} holds a state dict (found keys: {sorted(ckpt)[:8]})')
        state = tensors
    odd = next((k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise CheckpointError(f'{path}: state dict entry {odd!r} is not a tensor')
    state = {k.removeprefix('module.'): v for k, v in state.items()}
    bad = next((k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise CheckpointError(f'{path}: weight {bad} holds NaN or Inf values')
    if not isinstance(config, dict):
        raise CheckpointError(f'{path}: {CONFIG_KEY} entry is {type(config).__name__}, expected a dict')
    return state, config


def _read_torch(path: str | os.PathLike) -> dict:
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f'{path}: no such checkpoint file') from None
    except IsADirectoryError:
        raise CheckpointError(f'{path}: is a folder, not a checkpoint file') from None
    except Exception as err:  # torch raises several types for truncated, foreign or unsafe (pickled code) files
        message = str(err).strip().splitlines()[0] if str(err).strip() else ''
        raise CheckpointError(f'{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {message})') from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path}: expected a dict checkpoint, got {type(ckpt).__name__}')
    return ckpt


def _read_safetensors(path: str | os.PathLike) -> tuple[dict, dict]:
    from safetensors import SafetensorError, safe_open

    if not Path(path).is_file():
        raise CheckpointError(f'{path}: no such checkpoint file')
    try:
        with safe_open(str(path), framework='pt', device='cpu') as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f'{path}: not a readable safetensors file ({err})') from None
    try:
        config = json.loads(metadata[CONFIG_KEY]) if CONFIG_KEY in metadata else {}
    except json.JSONDecodeError as err:
        raise CheckpointError(f'{path}: metadata {CONFIG_KEY} is not JSON ({err})') from None
    return tensors, config


def detect_arch(state: dict[str, torch.Tensor]) -> str | None:
    """``'SSIU'`` or ``'IDSANet'`` when ``state`` has all of that architecture's :data:`ARCH_KEYS`, else None."""
    return next((arch for arch, keys in ARCH_KEYS.items() if all(k in state for k in keys)), None)


def _count(state: dict[str, torch.Tensor], prefix: str) -> int:
    """Length of the ``nn.ModuleList``/``Sequential`` whose entries are ``prefix.N.*``."""
    return 1 + max(int(m.group(2)) for k in state if (m := _INDEX.match(k)) and m.group(1) == prefix)


def _ssiu_config(state: dict[str, torch.Tensor]) -> dict:
    num_feat, num_in_ch = state['head.weight'].shape[:2]
    head_dim = 2 * state['body.0.s3.rel_h'].shape[-1]
    tail_convs = sorted(int(k.split('.')[1]) for k in state if k.startswith('tail.') and k.endswith('.weight'))
    if len(tail_convs) == 3:  # two x2 pixel-shuffle stages
        upscale = 4
    else:
        upscale = round((state['tail.0.weight'].shape[0] / num_feat) ** 0.5)
    return {'upscale': upscale, 'num_in_ch': num_in_ch, 'num_out_ch': state[f'tail.{tail_convs[-1]}.weight'].shape[0],
            'num_feat': num_feat, 'num_block': _count(state, 'body'),
            'num_heads': num_feat // head_dim, 'window': state['body.0.s3.rel_h'].shape[1],
            'expansion': state['body.0.s1.project_in1.weight'].shape[0] / num_feat,
            'kernel_size': state['body.0.s1.project_in2.1.weight'].shape[-1],
            'attn_pooled': 'body.0.s3.LocalProp.0.weight' in state}


def _idsanet_config(state: dict[str, torch.Tensor]) -> dict:
    num_feat, num_in_ch = state['head.weight'].shape[:2]
    num_block = _count(state, 'body')
    with_attention = [i for i in range(num_block) if f'body.{i}.attn_map.qk.weight' in state]
    distilled = state['body.0.distill.0.weight'].shape[0]
    tail_out = state['tail.0.weight'].shape[0]
    num_out_ch = num_in_ch if round((tail_out / num_in_ch) ** 0.5) ** 2 * num_in_ch == tail_out else 3
    return {'upscale': round((tail_out / num_out_ch) ** 0.5), 'num_in_ch': num_in_ch, 'num_out_ch': num_out_ch,
            'num_feat': num_feat, 'num_block': num_block,
            'share_group': with_attention[1] if len(with_attention) > 1 else num_block,
            'num_stages': _count({k.removeprefix('body.0.'): 0 for k in state if k.startswith('body.0.refine.')},
                                 'refine'),
            'distill_ratio': distilled / num_feat, 'num_heads': state['body.0.attn_map.rel_bias'].shape[1],
            'window_size': (round(state['body.0.attn_map.rel_bias'].shape[0] ** 0.5) + 1) // 2,
            'local_kernel': state['body.0.refine.0.local_conv.weight'].shape[-1],
            'smu_expansion': state['body.0.refine.0.smu.conv.weight'].shape[0] / num_feat,
            'smu_kernel': state['body.0.refine.0.smu.conv.weight'].shape[-1],
            'lka_kernel': state['body.0.purify.dw.weight'].shape[-1],
            'lka_dilated_kernel': state['body.0.purify.dw_dilated.weight'].shape[-1],
            'inha_kernel': state['body.0.attention.conv_h.weight'].shape[-1],
            'spatial_kernel': state['body.0.attention.spatial.weight'].shape[-1]}


def infer_config(state: dict[str, torch.Tensor], arch: str = 'SSIU') -> dict:
    """What the tensor shapes of ``state`` tell of ``arch``'s keywords (for SSIU: upscale, num_in_ch, num_out_ch,
    num_feat, num_block, num_heads, expansion, kernel_size; plus ``window``, the attention window side, and
    ``attn_pooled``, whether ESAM max-pools, from which :func:`network_options` derives the rest).

    Raises KeyError, IndexError or ValueError on a state dict that is not ``arch``'s (see :func:`network_options`).
    """
    return _ssiu_config(state) if arch == 'SSIU' else _idsanet_config(state)


def network_options(state: dict[str, torch.Tensor], stored: dict | None = None,
                    source: str | os.PathLike = 'state dict') -> dict:
    """The full BasicSR ``network_g`` dict (``type`` and keywords) of a state dict.

    Shapes decide what they can; ``stored`` (the file's own ``network_g``) gives the rest, :data:`DEFAULTS` what
    it lacks. A stored value that contradicts the shapes, or an unknown stored key, is a :class:`CheckpointError`.
    """
    stored = dict(stored or {})
    arch = detect_arch(state)
    if arch is None:
        missing = [k for k in ARCH_KEYS['SSIU'] if k not in state]
        raise CheckpointError(f'{source}: not an SSIU state dict, nor an IDSA-Net one (no {" / ".join(missing[:2])}; '
                              f'{len(state)} tensors, first key {next(iter(state), None)!r})')
    stored_type = stored.pop('type', arch)
    if stored_type != arch:
        raise CheckpointError(f'{source}: {CONFIG_KEY}.type is {stored_type!r} but the weights are {arch}')
    try:
        shapes = infer_config(state, arch)
    except (KeyError, IndexError, ValueError, ZeroDivisionError) as err:
        raise CheckpointError(f'{source}: odd {arch} state dict ({type(err).__name__}: {err})') from None
    options = {**DEFAULTS[arch], **shapes}
    if arch == 'SSIU':
        window, pooled = options.pop('window'), options.pop('attn_pooled')
        halo = stored.get('halo', options['halo'])
        options['block_size'] = stored.get('block_size', window - 2 * halo)
        if not pooled:
            options['attn_downsample'] = 1
        cell = options['block_size'] * stored.get('attn_downsample', options['attn_downsample'])
        if cell > 0 and options['pad_multiple'] % cell:
            options['pad_multiple'] = cell
    unknown = sorted(set(stored) - set(options))
    if unknown:
        raise CheckpointError(f'{source}: {CONFIG_KEY} has keys {arch} does not take: {", ".join(unknown)}')
    for key, value in stored.items():
        if key in shapes and key not in ('window', 'attn_pooled') and value != shapes[key]:
            raise CheckpointError(f'{source}: {CONFIG_KEY}.{key} is {value!r} but the weights have {shapes[key]!r}')
    options.update(stored)
    order = list(inspect.signature(ARCHS[arch]).parameters)  # the constructor's order, as in a YAML file
    return {'type': arch, **dict(sorted(options.items(), key=lambda item: order.index(item[0])))}


def build_network(path: str | os.PathLike, param_key: str | None = None) -> tuple[nn.Module, dict]:
    """The network held by the checkpoint at ``path`` (SSIU or IDSA-Net), loaded with ``strict=True``, and its
    ``network_g`` dict."""
    state, stored = read_checkpoint(path, param_key)
    return build_network_from(state, network_options(state, stored, path), path)


def _format(kwargs: dict) -> str:
    return ', '.join(f'{k}={v}' for k, v in kwargs.items())


def load_ssiu(path: str | os.PathLike, **overrides) -> SSIU:
    """Build an SSIU matching the checkpoint at ``path`` and load it with ``strict=True``.

    ``overrides`` replace keywords the file does not decide (e.g. ``pad_multiple``).
    """
    state, stored = read_checkpoint(path)
    options = network_options(state, {**stored, **overrides}, path)
    if options['type'] != 'SSIU':
        raise CheckpointError(f'{path}: holds {options["type"]} weights, not SSIU')
    net, _ = build_network_from(state, options, path)
    return net


def build_network_from(state: dict[str, torch.Tensor], options: dict,
                       source: str | os.PathLike = 'state dict') -> tuple[nn.Module, dict]:
    """Build ``options['type']`` with ``options`` and load ``state`` into it with ``strict=True``."""
    kwargs = {k: v for k, v in options.items() if k != 'type'}
    try:
        net = ARCHS[options['type']](**kwargs)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f'{source}: cannot build {options["type"]}({_format(kwargs)}): {err}') from None
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = ' '.join(str(err).split())[:300]
        raise CheckpointError(f'{source}: does not fit {options["type"]}({_format(kwargs)}): {first}') from None
    return net, options


def save_weights(path: str | os.PathLike, state: dict[str, torch.Tensor], options: dict | None = None,
                 fmt: str | None = None) -> None:
    """Write ``state`` (and its ``network_g`` dict ``options``) atomically.

    ``fmt`` ``'pth'`` writes ``{'params': state, 'network_g': options}``, which BasicSR's ``load_network``
    and Real-ESRGAN load; ``'safetensors'`` writes the bare tensors with ``options`` as JSON metadata. By
    default the suffix of ``path`` decides (``.safetensors``, else ``.pth``).
    """
    fmt = fmt or ('safetensors' if Path(path).suffix.lower() == '.safetensors' else 'pth')
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    options = _jsonable(options or {})
    if fmt == 'safetensors':
        from safetensors.torch import save_file

        metadata = {CONFIG_KEY: json.dumps(options)} if options else None
        replace_atomic(path, lambda tmp: save_file(state, str(tmp), metadata=metadata), suffix='.safetensors')
    elif fmt == 'pth':
        save_atomic({'params': state, CONFIG_KEY: options} if options else {'params': state}, path)
    else:
        raise ValueError(f'unknown weights format {fmt!r}; use pth or safetensors')


def _jsonable(options: dict) -> dict:
    """``options`` with tuples as lists, so that it reads back the same from JSON and from ``.pth``."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
