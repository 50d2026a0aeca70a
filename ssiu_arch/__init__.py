"""SSIU for BasicSR: the SSIU and IDSA-Net networks, their CPU inference engine and tools.

``import ssiu_arch`` is light: it needs only torch. It installs the CPU inference engine
(:mod:`ssiu_arch.cpu.engine`) as ``SSIU.engine``. The BasicSR layer (registration of the networks, losses,
``SSIUModel`` and datasets, plus the compatibility fixes for ``basicsr==1.4.2``) is ``import ssiu_arch.models``,
which ``basicsr train|test`` does for you.
"""
from ssiu_arch.archs import SSIU, IDSANet
from ssiu_arch.cpu.engine import ENGINE

SSIU.engine = ENGINE

__all__ = ['IDSANet', 'SSIU']
__version__ = '0.1.0'
