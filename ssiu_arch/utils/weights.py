"""Read SSIU checkpoints of every layout this project meets, and build the network they hold.

Published checkpoints (github.com/eezkni/SSIU) are ``{'epoch': ..., 'model_state_dict': {...}}`` with
the ``module.`` prefix of ``nn.DataParallel``; BasicSR saves ``{'params': {...}}`` (plus
``params_ema``). Both are read with ``weights_only=True``: a checkpoint is untrusted input.
"""
from __future__ import annotations

import os
import re

import torch

from ssiu_arch.archs.ssiu_arch import SSIU

_BLOCK_KEY = re.compile(r'^body\.(\d+)\.')


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not hold an SSIU network."""


def read_state_dict(path: str | os.PathLike, param_key: str | None = None) -> dict[str, torch.Tensor]:
    """The SSIU state dict stored in ``path``, in either layout, without any ``module.`` prefix.

    ``param_key`` picks an entry of a BasicSR checkpoint (default: ``params_ema`` if present, else
    ``params``); published checkpoints always use ``model_state_dict``.
    """
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f'{path}: no such checkpoint file') from None
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise CheckpointError(f'{path}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})') from None
    if not isinstance(ckpt, dict):
        raise CheckpointError(f'{path}: expected a dict checkpoint, got {type(ckpt).__name__}')
    if param_key is not None:
        keys = [param_key]
    else:
        keys = ['model_state_dict', 'params_ema', 'params', 'state_dict']
    state = next((ckpt[k] for k in keys if isinstance(ckpt.get(k), dict)), None)
    if state is None:
        if all(isinstance(v, torch.Tensor) for v in ckpt.values()) and ckpt:
            state = ckpt
        else:
            raise CheckpointError(f'{path}: none of {keys} holds a state dict (found keys: {sorted(ckpt)[:8]})')
    state = {k.removeprefix('module.'): v for k, v in state.items()}
    if 'head.weight' not in state or 'moe.fuse.weight' not in state:
        raise CheckpointError(f'{path}: not an SSIU state dict (no head.weight / moe.fuse.weight)')
    return state


def infer_config(state: dict[str, torch.Tensor]) -> dict[str, int]:
    """``network_g`` keywords (upscale, num_in_ch, num_out_ch, num_feat, num_block, num_heads) of a state dict."""
    num_feat, num_in_ch = state['head.weight'].shape[:2]
    num_block = 1 + max(int(m.group(1)) for k in state if (m := _BLOCK_KEY.match(k)))
    head_dim = 2 * state['body.0.s3.rel_h'].shape[-1]
    tail_convs = sorted(int(k.split('.')[1]) for k in state if k.startswith('tail.') and k.endswith('.weight'))
    num_out_ch = state[f'tail.{tail_convs[-1]}.weight'].shape[0]
    if len(tail_convs) == 3:  # two x2 pixel-shuffle stages
        upscale = 4
    else:
        upscale = round((state['tail.0.weight'].shape[0] / num_feat) ** 0.5)
    return {'upscale': upscale, 'num_in_ch': num_in_ch, 'num_out_ch': num_out_ch, 'num_feat': num_feat,
            'num_block': num_block, 'num_heads': num_feat // head_dim}


def load_ssiu(path: str | os.PathLike, **overrides) -> SSIU:
    """Build an SSIU matching the checkpoint at ``path`` and load it with ``strict=True``."""
    state = read_state_dict(path)
    net = SSIU(**{**infer_config(state), **overrides})
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f'{path}: does not fit SSIU{infer_config(state)}: {err}') from None
    return net
