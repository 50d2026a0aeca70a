"""SSIU for BasicSR. ``import ssiu_arch`` registers the SSIU and IDSA-Net networks, the losses, model and datasets."""
from ssiu_arch import compat

compat.apply()

from ssiu_arch import datasets_lmdb, losses, ssiu_model  # noqa: E402,F401  (registration)
from ssiu_arch.idsanet_arch import IDSANet  # noqa: E402
from ssiu_arch.ssiu_arch import SSIU  # noqa: E402

__all__ = ['IDSANet', 'SSIU']
__version__ = '0.1.0'
