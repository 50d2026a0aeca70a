"""The SSIU network in the published formulation, as a trainable ``nn.Module`` for side-by-side benchmarks.

Restated from the paper (Ni et al., IEEE TIP 2025) and the structure of the published network, in its style:
NCHW feature maps, ``nn.Conv2d`` layers with reflect padding, a LayerNorm over channels through a
``(B, H W, C)`` view, halo windows gathered with ``F.unfold``, einsum attention, the input reflect-padded to
a multiple of 16, the published expert selection. It computes what the test oracle ``tests/reference_ssiu.py``
computes, but holds its weights as parameters so that it can train. Parameter names are those of the
published checkpoints, so one state dict (without the ``module.`` prefix) loads here and into
:class:`ssiu_arch.archs.SSIU` with ``strict=True``. Valid where the published network runs: ``n_blocks >= 3``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['PublishedSSIU']


def _conv(c_in: int, c_out: int, kernel: int = 1, groups: int = 1, bias: bool = True) -> nn.Conv2d:
    """A convolution as the published network declares it: 'same' size, reflect padding."""
    return nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, groups=groups, bias=bias, padding_mode='reflect')


class _BiasedLayerNorm(nn.Module):
    """LayerNorm over the last dimension of a ``(B, N, C)`` sequence, with a learned scale and bias."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu = x.mean(-1, keepdim=True)
        var = x.var(-1, keepdim=True, unbiased=False)
        return (x - mu) / torch.sqrt(var + 1e-6) * self.weight + self.bias


class ChannelNorm(nn.Module):
    """LayerNorm of each pixel's channel vector, through the (B, H W, C) view of the NCHW map."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = _BiasedLayerNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        return self.body(x.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(b, c, h, w)


class MSGM(nn.Module):
    """Mixed-Scale Gating Module: ``W_o (GELU(W_1 x) * W_3 DW(W_2 x))``."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.project_in1 = _conv(channels, channels)
        self.project_in2 = nn.Sequential(_conv(channels, channels), _conv(channels, channels, 3, groups=channels),
                                         _conv(channels, channels))
        self.project_out = _conv(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_out(F.gelu(self.project_in1(x)) * self.project_in2(x))


class ESAM(nn.Module):
    """Efficient Sparse Attention Module: halo block attention on the 2x max-pooled map, propagated back up."""

    def __init__(self, channels: int, heads: int, block: int = 8, halo: int = 1) -> None:
        super().__init__()
        self.heads, self.block, self.halo = heads, block, halo
        d, win = channels // heads, block + 2 * halo
        self.rel_h = nn.Parameter(torch.randn(1, win, 1, d // 2))
        self.rel_w = nn.Parameter(torch.randn(1, 1, win, d // 2))
        self.qkv_conv = _conv(channels, 3 * channels, bias=False)
        self.LocalProp = nn.Sequential(_conv(channels, channels, 3, groups=channels),
                                       nn.Upsample(scale_factor=2, mode='bilinear', align_corners=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_h, out_w = x.shape[-2:]
        x = F.max_pool2d(x, 2, 2)
        b, c, h, w = x.shape
        heads, block, halo = self.heads, self.block, self.halo
        d, win = c // heads, block + 2 * halo
        q, k, v = self.qkv_conv(x).chunk(3, dim=1)
        # every block of queries against the keys and values of its window grown by the halo (zero padded)
        q = F.unfold(q, block, stride=block).view(b, heads, d, block * block, -1)
        q = q.permute(0, 4, 1, 3, 2).reshape(-1, heads, block * block, d) * d ** -0.5
        k = F.unfold(k, win, stride=block, padding=halo).view(b, heads, d, win, win, -1)
        v = F.unfold(v, win, stride=block, padding=halo).view(b, heads, d, win * win, -1)
        rel_h = self.rel_h[0, :, 0, :].t()[:, :, None, None]  # first half of a head's channels: by window row
        rel_w = self.rel_w[0, 0, :, :].t()[:, None, :, None]  # second half: by window column
        k = torch.cat([k[:, :, :d // 2] + rel_h, k[:, :, d // 2:] + rel_w], dim=2)
        k = k.view(b, heads, d, win * win, -1).permute(0, 4, 1, 3, 2).reshape(-1, heads, win * win, d)
        v = v.permute(0, 4, 1, 3, 2).reshape(-1, heads, win * win, d)
        attn = torch.einsum('nhid,nhjd->nhij', q, k).softmax(dim=-1)
        out = torch.einsum('nhij,nhjd->nhid', attn, v)
        out = out.view(b, -1, heads, block * block, d).permute(0, 2, 4, 3, 1).reshape(b, c * block * block, -1)
        out = F.fold(out, (h, w), block, stride=block)
        return self.LocalProp(out)[:, :, :out_h, :out_w]


class SSRMStep(nn.Module):
    """One unfolding step: the SSIM-constrained update of the estimate ``a`` given the head features ``y``."""

    def __init__(self, channels: int, heads: int) -> None:
        super().__init__()
        self.norm = ChannelNorm(channels)
        self.s1, self.s2, self.s4, self.ffn = (MSGM(channels) for _ in range(4))
        self.s3 = ESAM(channels, heads)

    def forward(self, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = self.norm(a)
        z, b = self.s1(a), self.s2(a)
        v = a + z + y
        v = self.s3(v) + v
        a = self.s4(v - b) + b
        return self.ffn(a) + a


class MoEFeatureSelector(nn.Module):
    """Softmax gates over three step estimates, per pixel and channel; their mixture plus a fused projection."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.fc_a, self.fc_b, self.fc_c = _conv(channels, channels), _conv(channels, channels), _conv(channels,
                                                                                                       channels)
        self.fuse = _conv(channels, channels)

    def forward(self, experts: list[torch.Tensor], res: torch.Tensor) -> torch.Tensor:
        logits = torch.stack([fc(e) for fc, e in zip((self.fc_a, self.fc_b, self.fc_c), experts)])
        fused = (logits.softmax(dim=0) * torch.stack(experts)).sum(dim=0)
        return self.fuse(fused) + fused + res


class PublishedSSIU(nn.Module):
    """SSIU with the published configuration names (``scale``, ``n_feats``, ``n_blocks``, ``num_heads``, ``colors``)."""

    def __init__(self, scale: int = 2, n_feats: int = 64, n_blocks: int = 9, num_heads: int = 4,
                 colors: int = 3) -> None:
        super().__init__()
        if n_blocks < 3:
            raise ValueError(f'the published network needs n_blocks >= 3, got {n_blocks}')
        self.scale, self.n_blocks = scale, n_blocks
        self.head = _conv(colors, n_feats, 3)
        self.body = nn.ModuleList(SSRMStep(n_feats, num_heads) for _ in range(n_blocks))
        self.moe = MoEFeatureSelector(n_feats)
        factors = [2, 2] if scale == 4 else [scale]
        tail: list[nn.Module] = []
        for factor in factors:
            tail += [_conv(n_feats, n_feats * factor * factor), nn.PixelShuffle(factor), nn.GELU()]
        self.tail = nn.Sequential(*tail, _conv(n_feats, colors, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        x = F.pad(x, (0, -w % 16, 0, -h % 16), mode='reflect')
        res = self.head(x)
        a, collected = res, []
        interval = self.n_blocks // 3
        for i, step in enumerate(self.body, start=1):
            a = step(a, res)
            if i % interval == 0 or i == self.n_blocks:
                collected.append(a)
        experts = collected[1:4] if len(collected) == 4 else collected[:3]
        out = self.tail(self.moe(experts, res))
        out = out + F.interpolate(x, scale_factor=self.scale, mode='bilinear', align_corners=False)
        return out[:, :, :h * self.scale, :w * self.scale]
