"""Parameter and multiply-add counts as the lightweight-SR literature reports them.

Multiply-adds (MACs) are ``torch.utils.flop_counter`` FLOPs / 2 for one forward pass, counting every
convolution and both attention products. The pass runs on the ``meta`` device, so counting a
1280x720 output costs no compute, and attention is counted through its decomposition whether or not
the real device would use a fused kernel.
"""
from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def count_params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def lr_size_for(output_hw: tuple[int, int], scale: int) -> tuple[int, int]:
    """LR input size whose SR output covers ``output_hw`` (1280x720 at x3 -> 427x240, as papers round up)."""
    return math.ceil(output_hw[0] / scale), math.ceil(output_hw[1] / scale)


@torch.no_grad()
def count_macs(net: nn.Module, input_hw: tuple[int, int], in_ch: int = 3) -> int:
    """Multiply-adds of one forward pass of ``net`` on a (1, in_ch, H, W) input."""
    meta_net = copy.deepcopy(net).to('meta').eval()
    x = torch.empty(1, in_ch, *input_hw, device='meta')
    with FlopCounterMode(display=False) as counter:
        meta_net(x)
    return counter.get_total_flops() // 2
