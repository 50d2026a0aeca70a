"""Import torchvision where its CUDA wheel sits beside a CPU build of torch.

There its C extension cannot load, and its meta registrations then reference the missing ops:
``RuntimeError: operator torchvision::nms does not exist``. Defining the two op schemas first lets it
import; only ``torchvision.ops.nms``/``deform_conv2d`` stay unavailable, which image SR does not use.
BasicSR (:mod:`ssiu_arch.models.compat`) and spandrel (:mod:`ssiu_arch.spandrel`) both import torchvision.
Where torchvision imports as it is, nothing is changed.
"""
from __future__ import annotations

import importlib
import sys

import torch

_SCHEMAS = (
    'nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor',
    'qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor',
)
_library = None  # must stay alive for the schemas to stay registered


def import_torchvision() -> None:
    """Import torchvision, defining its missing op schemas first if its C extension cannot load."""
    global _library
    try:
        importlib.import_module('torchvision')
        return
    except RuntimeError as err:
        if 'torchvision::nms' not in str(err):
            raise
    for name in [m for m in sys.modules if m == 'torchvision' or m.startswith('torchvision.')]:
        del sys.modules[name]
    _library = torch.library.Library('torchvision', 'DEF')
    for schema in _SCHEMAS:
        _library.define(schema)
    importlib.import_module('torchvision')
