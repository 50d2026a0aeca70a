"""Make ``basicsr==1.4.2`` work with current torch/torchvision and on machines without CUDA.

Each fix is applied only when the problem it addresses is present, so newer BasicSR or torchvision
releases run untouched:

* torchvision CUDA wheels beside a CPU torch fail on import with ``operator torchvision::nms does not
  exist``: :func:`ssiu_arch.utils.torchvision_import.import_torchvision` defines the two op schemas and
  imports again (only ``torchvision.ops.nms``/``deform_conv2d`` stay unavailable).
* basicsr 1.4.2 imports ``torchvision.transforms.functional_tensor``, removed in torchvision 0.17
  (BasicSR issues #533 and #663): we register an alias exposing ``rgb_to_grayscale``.
* ``basicsr.train.load_resume_state`` maps the state to ``torch.cuda.current_device()`` and unpickles
  whatever the file holds: we load it with ``weights_only=True`` (a training state is only tensors,
  numbers, lists and dicts), to the CPU when there is no CUDA, and name the file when it cannot be read.
* ``basicsr.utils.options.ordered_yaml`` uses PyYAML's full loader, which runs ``!!python/...`` tags: we
  give it a safe loader (plain YAML values only) that keeps the mapping order.
* ``basicsr.utils.dist_util.init_dist`` hard-codes NCCL and CUDA devices: without CUDA we use gloo.

The model-level gaps (optimizers other than Adam, DDP ``device_ids`` on CPU, atomic checkpoints) are
handled in :class:`ssiu_arch.models.ssiu_model.SSIUModel`, where BasicSR expects subclasses to do so.
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
import types

import torch

from ssiu_arch.utils.torchvision_import import import_torchvision


def _alias_functional_tensor() -> None:
    name = 'torchvision.transforms.functional_tensor'
    try:
        importlib.import_module(name)
    except ImportError:
        from torchvision.transforms import functional

        alias = types.ModuleType(name)
        alias.rgb_to_grayscale = functional.rgb_to_grayscale
        sys.modules[name] = alias


class ResumeStateError(SystemExit):
    """A resume state that cannot be loaded; raised as ``SystemExit`` so the run stops with one line."""


def load_resume_state(opt: dict) -> dict | None:
    """``basicsr.train.load_resume_state`` (same lookup), reading tensors only (``weights_only=True``).

    States go to the current CUDA device when there is one, else to the CPU. A file that is not a
    tensors-only state (a crafted pickle, a truncated or foreign file) stops the run with its path.
    """
    from basicsr.utils import scandir
    from basicsr.utils.misc import check_resume

    resume_state_path = opt['path'].get('resume_state')
    if opt['auto_resume']:
        state_dir = os.path.join('experiments', opt['name'], 'training_states')
        if os.path.isdir(state_dir):
            iters = [int(name.split('.state')[0]) for name in scandir(state_dir, suffix='.state', recursive=False)
                     if name.split('.state')[0].isdigit()]
            if iters:
                resume_state_path = os.path.join(state_dir, f'{max(iters)}.state')
                opt['path']['resume_state'] = resume_state_path
    if resume_state_path is None:
        return None
    device = f'cuda:{torch.cuda.current_device()}' if torch.cuda.is_available() else 'cpu'
    try:
        resume_state = torch.load(resume_state_path, map_location=device, weights_only=True)
    except FileNotFoundError:
        raise ResumeStateError(f'path.resume_state: {resume_state_path}: no such file') from None
    except Exception as err:  # pickle.UnpicklingError for code, RuntimeError/EOFError for damaged files
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ResumeStateError(f'{resume_state_path}: not a training state that loads as tensors only '
                               f'(weights_only=True): {reason}') from None
    if not isinstance(resume_state, dict) or not isinstance(resume_state.get('iter'), int):
        raise ResumeStateError(f'{resume_state_path}: not a BasicSR training state (no integer "iter")')
    check_resume(opt, resume_state['iter'])
    return resume_state


def init_dist_cpu(launcher: str, backend: str = 'gloo', **kwargs) -> None:
    """CPU counterpart of ``basicsr.utils.dist_util.init_dist``: gloo, no CUDA device selection.

    ``launcher='pytorch'`` reads torchrun's environment; ``'slurm'`` derives it from SLURM's as BasicSR
    does (first host of the node list as master; port from ``port``, ``MASTER_PORT`` or 29500).
    """
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if mp.get_start_method(allow_none=True) is None:
        mp.set_start_method('spawn')
    if launcher == 'slurm':
        node_list = os.environ['SLURM_NODELIST']
        os.environ['MASTER_ADDR'] = subprocess.getoutput(f'scontrol show hostname {node_list} | head -n1')
        os.environ['MASTER_PORT'] = str(kwargs.pop('port', None) or os.environ.get('MASTER_PORT', 29500))
        os.environ['WORLD_SIZE'] = os.environ['SLURM_NTASKS']
        os.environ['RANK'] = os.environ['SLURM_PROCID']
    elif launcher != 'pytorch':
        raise ValueError(f'Invalid launcher type: {launcher}')
    dist.init_process_group(backend=backend, **kwargs)


def apply() -> None:
    """Apply every fix that the installed versions and the machine need; safe to call repeatedly."""
    import_torchvision()
    _alias_functional_tensor()
    import basicsr.train
    import basicsr.utils.dist_util
    import basicsr.utils.options

    from ssiu_arch.models.options_check import ordered_safe_yaml

    basicsr.train.load_resume_state = load_resume_state
    basicsr.utils.options.ordered_yaml = ordered_safe_yaml
    if torch.cuda.is_available():
        return
    basicsr.utils.dist_util.init_dist = init_dist_cpu
    basicsr.utils.options.init_dist = init_dist_cpu
