"""Training data the BasicSR way: sub-images, MATLAB-exact bicubic LR, LMDB build/verify, HR-only dataset.

Importing this package registers :class:`HROnlyBicubicDataset` in BasicSR's ``DATASET_REGISTRY``; the
``ssiu lmdb`` command (:mod:`ssiu_arch.datasets_lmdb.cli`) drives the preparation steps.
"""
from ssiu_arch.datasets_lmdb.files import DataPrepError
from ssiu_arch.datasets_lmdb.hr_only_dataset import HROnlyBicubicDataset
from ssiu_arch.datasets_lmdb.imresize import imresize
from ssiu_arch.datasets_lmdb.lmdb_tools import build_lmdb, check_pairs, scan_image_set
from ssiu_arch.datasets_lmdb.prepare import extract_subimages, make_lr

__all__ = ['DataPrepError', 'HROnlyBicubicDataset', 'build_lmdb', 'check_pairs', 'extract_subimages', 'imresize',
           'make_lr', 'scan_image_set']
