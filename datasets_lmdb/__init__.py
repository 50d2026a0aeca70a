"""Training data the BasicSR way: sub-images, MATLAB-exact bicubic LR, LMDB build/verify, HR-only dataset.

The preparation steps, driven by the ``ssiu lmdb`` command (:mod:`ssiu_arch.datasets_lmdb.cli`), do not
import BasicSR. :class:`HROnlyBicubicDataset` does: ``import ssiu_arch.models`` registers it in BasicSR's
``DATASET_REGISTRY`` after the compatibility fixes, and taking it from this package does the same.
"""
from ssiu_arch.datasets_lmdb.files import DataPrepError
from ssiu_arch.datasets_lmdb.imresize import imresize
from ssiu_arch.datasets_lmdb.lmdb_tools import build_lmdb, check_pairs, scan_image_set
from ssiu_arch.datasets_lmdb.prepare import extract_subimages, make_lr

__all__ = ['DataPrepError', 'HROnlyBicubicDataset', 'build_lmdb', 'check_pairs', 'extract_subimages', 'imresize',
           'make_lr', 'scan_image_set']


def __getattr__(name: str):
    if name == 'HROnlyBicubicDataset':
        from ssiu_arch.datasets_lmdb.hr_only_dataset import HROnlyBicubicDataset

        import ssiu_arch.models  # noqa: F401  (compatibility fixes before BasicSR is imported; registration)

        return HROnlyBicubicDataset
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
