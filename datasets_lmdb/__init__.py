"""Training data the BasicSR way: sub-images, MATLAB-exact bicubic LR, LMDB build/verify, HR-only dataset.

The preparation steps need no BasicSR; the ``ssiu lmdb`` command (:mod:`ssiu_arch.datasets_lmdb.cli`) drives
them. :class:`HROnlyBicubicDataset` is BasicSR's: ``import ssiu_arch.models`` registers it in
``DATASET_REGISTRY``, and reading it from this package does that first.
"""
import importlib

from ssiu_arch.datasets_lmdb.files import DataPrepError
from ssiu_arch.datasets_lmdb.imresize import imresize
from ssiu_arch.datasets_lmdb.lmdb_tools import build_lmdb, check_pairs, scan_image_set
from ssiu_arch.datasets_lmdb.prepare import extract_subimages, make_lr

__all__ = ['DataPrepError', 'HROnlyBicubicDataset', 'build_lmdb', 'check_pairs', 'extract_subimages', 'imresize',
           'make_lr', 'scan_image_set']


def __getattr__(name: str) -> object:
    if name == 'HROnlyBicubicDataset':
        importlib.import_module('ssiu_arch.models')  # BasicSR with its compatibility fixes first; registers it
        return importlib.import_module('ssiu_arch.datasets_lmdb.hr_only_dataset').HROnlyBicubicDataset
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
