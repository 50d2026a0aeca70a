"""Test oracle: the published SSIU forward pass, restated functionally from a state dict.

Written for the tests from the published formulation (github.com/eezkni/SSIU, models/SSUFSR_network.py)
in its own style: ``F.unfold`` windows, explicit einsum attention, the published expert selection and
plain reflect padding. It shares no code with :mod:`ssiu_arch.archs.ssiu_arch`, so it checks that module on
seeds, sizes, widths and depths that the shared fixtures do not cover. Valid where the published
network runs: ``num_block`` >= 3 and every input side larger than its padding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _conv(x, sd, name, padding=0, groups=1, reflect=False):
    weight, bias = sd[f'{name}.weight'], sd.get(f'{name}.bias')
    if reflect and padding:
        x = F.pad(x, (padding,) * 4, mode='reflect')
        padding = 0
    return F.conv2d(x, weight, bias, padding=padding, groups=groups)


def _layer_norm(x, sd, name):
    mu = x.mean(1, keepdim=True)
    var = x.var(1, keepdim=True, unbiased=False)
    return (x - mu) / torch.sqrt(var + 1e-6) * sd[f'{name}.weight'][:, None, None] + sd[f'{name}.bias'][:, None, None]


def _msgm(x, sd, name):
    x1 = _conv(x, sd, f'{name}.project_in1')
    x2 = _conv(x, sd, f'{name}.project_in2.0')
    x2 = _conv(x2, sd, f'{name}.project_in2.1', padding=1, groups=x2.shape[1], reflect=True)
    x2 = _conv(x2, sd, f'{name}.project_in2.2')
    return _conv(F.gelu(x1) * x2, sd, f'{name}.project_out')


def _esam(x, sd, name, heads, block=8, halo=1):
    _, _, oh, ow = x.shape
    x = F.max_pool2d(x, 2, 2)
    b, c, h, w = x.shape
    d, win = c // heads, block + 2 * halo
    q, k, v = _conv(x, sd, f'{name}.qkv_conv').chunk(3, dim=1)
    # queries: (b * blocks, heads, block², d), scaled
    q = F.unfold(q, block, stride=block).view(b, heads, d, block * block, -1)
    q = q.permute(0, 4, 1, 3, 2).reshape(-1, heads, block * block, d) * d ** -0.5
    k = F.unfold(k, win, stride=block, padding=halo).view(b, heads, d, win, win, -1)
    v = F.unfold(v, win, stride=block, padding=halo).view(b, heads, d, win * win, -1)
    rel_h = sd[f'{name}.rel_h'][0, :, 0, :].t()  # (d/2, win): varies with the window row
    rel_w = sd[f'{name}.rel_w'][0, 0, :, :].t()  # (d/2, win): varies with the window column
    k = torch.cat([k[:, :, : d // 2] + rel_h[None, None, :, :, None, None],
                   k[:, :, d // 2:] + rel_w[None, None, :, None, :, None]], dim=2)
    k = k.view(b, heads, d, win * win, -1).permute(0, 4, 1, 3, 2).reshape(-1, heads, win * win, d)
    v = v.permute(0, 4, 1, 3, 2).reshape(-1, heads, win * win, d)
    attn = torch.einsum('nhid,nhjd->nhij', q, k).softmax(-1)
    out = torch.einsum('nhij,nhjd->nhid', attn, v)  # (b * blocks, heads, block², d)
    out = out.view(b, -1, heads, block * block, d).permute(0, 2, 4, 3, 1).reshape(b, c * block * block, -1)
    out = F.fold(out, (h, w), block, stride=block)
    out = _conv(out, sd, f'{name}.LocalProp.0', padding=1, groups=c, reflect=True)
    return F.interpolate(out, scale_factor=2, mode='bilinear', align_corners=True)[:, :, :oh, :ow]


def _step(a, y, sd, name, heads):
    a = _layer_norm(a, sd, f'{name}.norm.body')
    z = _msgm(a, sd, f'{name}.s1')
    b = _msgm(a, sd, f'{name}.s2')
    v = a + z + y
    v = _esam(v, sd, f'{name}.s3', heads) + v
    a = _msgm(v - b, sd, f'{name}.s4') + b
    return _msgm(a, sd, f'{name}.ffn') + a


@torch.no_grad()
def reference_forward(x: torch.Tensor, sd: dict, scale: int, num_block: int, heads: int = 4) -> torch.Tensor:
    """Published SSIU forward on ``x`` with state dict ``sd`` (no ``module.`` prefix)."""
    h, w = x.shape[-2:]
    x = F.pad(x, (0, (16 - w % 16) % 16, 0, (16 - h % 16) % 16), mode='reflect')
    res = _conv(x, sd, 'head', padding=1, reflect=True)
    a, collected = res, []
    for i in range(num_block):
        a = _step(a, res, sd, f'body.{i}', heads)
        if (i + 1) % (num_block // 3) == 0 or i + 1 == num_block:
            collected.append(a)
    experts = collected[1:4] if len(collected) == 4 else collected[:3]
    logits = torch.stack([_conv(e, sd, f'moe.fc_{n}') for e, n in zip(experts, 'abc')])
    gates = logits.softmax(0)
    fused = sum(g * e for g, e in zip(gates, experts))
    a = _conv(fused, sd, 'moe.fuse') + fused + res
    stages = 2 if scale == 4 else 1
    for i in range(stages):
        a = F.gelu(F.pixel_shuffle(_conv(a, sd, f'tail.{3 * i}'), 2 if scale == 4 else scale))
    a = _conv(a, sd, f'tail.{3 * stages}', padding=1, reflect=True)
    a = a + F.interpolate(x, scale_factor=scale, mode='bilinear', align_corners=False)
    return a[:, :, : h * scale, : w * scale]
