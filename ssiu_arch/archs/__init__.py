"""The networks: plain PyTorch modules, one network a file, importable without BasicSR."""
from ssiu_arch.archs.idsanet_arch import IDSANet
from ssiu_arch.archs.ssiu_arch import SSIU

__all__ = ['IDSANet', 'SSIU']
