"""SSIU for BasicSR: the SSIU and IDSA-Net networks, their CPU inference engine and tools.

``import ssiu_arch`` is light: it needs only torch. The BasicSR layer (registration of the networks, losses,
``SSIUModel`` and datasets, plus the compatibility fixes for ``basicsr==1.4.2``) is ``import ssiu_arch.models``,
which ``basicsr train|test`` does for you.
"""
from ssiu_arch.archs import SSIU, IDSANet

__all__ = ['IDSANet', 'SSIU']
__version__ = '0.1.0'
