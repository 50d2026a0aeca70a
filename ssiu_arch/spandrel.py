"""spandrel support: SSIU and IDSA-Net in the model loader of chaiNNer, ComfyUI and other SR front ends.

spandrel (``pip install 'ssiu[spandrel]'``) finds architectures only in its registry, so the host makes one
call::

    import ssiu_arch.spandrel
    ssiu_arch.spandrel.register()
    model = spandrel.ModelLoader().load_from_file('SSIU_x2.safetensors')  # an ImageModelDescriptor

Detection is by state-dict keys (:data:`ssiu_arch.utils.weights.ARCH_KEYS`); hyper-parameters come from the
tensor shapes (:func:`ssiu_arch.utils.weights.network_options`). spandrel hands an architecture only the
tensors, not the ``network_g`` options stored beside them, so the few hyper-parameters that shapes cannot
tell take the papers' values here (:data:`ssiu_arch.utils.weights.DEFAULTS`); every published and
paper-configured SSIU has them. Both networks pad internally, so any input size is accepted.
"""
from __future__ import annotations

from torch import nn

from ssiu_arch.utils.torchvision_import import import_torchvision
from ssiu_arch.utils.weights import ARCH_KEYS, build_network_from, network_options

import_torchvision()  # spandrel imports torchvision; a CUDA torchvision beside a CPU torch needs this first

from spandrel import (  # noqa: E402
    MAIN_REGISTRY,
    Architecture,
    ArchRegistry,
    ArchSupport,
    ImageModelDescriptor,
    ModelTiling,
    SizeRequirements,
    StateDict,
)
from spandrel.util import KeyCondition  # noqa: E402

__all__ = ['IDSANET', 'SSIU', 'SUPPORTS', 'register']

# Measured on the CPU with the reference passes of tests/data (paper width, x2/x3/x4): float16 within 2e-3 of
# float32 (>= 69 dB), bfloat16 within 9e-3 (>= 54 dB). GPU measurements, where made, decide these flags.
SUPPORTS_HALF = True
SUPPORTS_BFLOAT16 = True


class NetworkArch(Architecture[nn.Module]):
    """spandrel ``Architecture`` for one network of this package (``'SSIU'`` or ``'IDSANet'``)."""

    def __init__(self, arch: str, name: str) -> None:
        super().__init__(id=arch, name=name, detect=KeyCondition.has_all(*ARCH_KEYS[arch]))

    def load(self, state_dict: StateDict) -> ImageModelDescriptor[nn.Module]:
        options = network_options(state_dict, source=f'{self.name} state dict')
        net, _ = build_network_from(state_dict, options, f'{self.name} state dict')
        scale = options['upscale']
        return ImageModelDescriptor(
            net.eval(), state_dict, architecture=self, purpose='SR' if scale > 1 else 'Restoration',
            tags=[f'{options["num_feat"]}nf', f'{options["num_block"]}nb'],
            supports_half=SUPPORTS_HALF, supports_bfloat16=SUPPORTS_BFLOAT16, scale=scale,
            input_channels=options['num_in_ch'], output_channels=options['num_out_ch'],
            size_requirements=SizeRequirements(),  # both networks pad any H, W >= 1 themselves
            tiling=ModelTiling.SUPPORTED)


SSIU = ArchSupport.from_architecture(NetworkArch('SSIU', 'SSIU'))
IDSANET = ArchSupport.from_architecture(NetworkArch('IDSANet', 'IDSA-Net'))
SUPPORTS = (SSIU, IDSANET)


def register(registry: ArchRegistry = MAIN_REGISTRY) -> list[ArchSupport]:
    """Add SSIU and IDSA-Net to ``registry`` (default: spandrel's ``MAIN_REGISTRY``, which ``ModelLoader()``
    uses); safe to call repeatedly. Returns the entries added by this call."""
    return registry.add(*SUPPORTS, ignore_duplicates=True)
