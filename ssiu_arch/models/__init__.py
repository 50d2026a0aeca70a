"""The BasicSR layer: ``import ssiu_arch.models`` registers SSIU, IDSA-Net, the losses, ``SSIUModel`` and the
datasets with BasicSR's registries, after the compatibility fixes of :mod:`ssiu_arch.models.compat`."""
from ssiu_arch.models import compat

compat.apply()

from basicsr.utils.registry import ARCH_REGISTRY  # noqa: E402

from ssiu_arch import losses  # noqa: E402,F401  (registration)
from ssiu_arch.archs import SSIU, IDSANet  # noqa: E402
from ssiu_arch.datasets_lmdb import hr_only_dataset  # noqa: E402,F401  (registration)
from ssiu_arch.models.ssiu_model import SSIUModel  # noqa: E402

for _arch in (SSIU, IDSANet):
    if _arch.__name__ not in ARCH_REGISTRY:
        ARCH_REGISTRY.register(_arch)

__all__ = ['SSIUModel']
