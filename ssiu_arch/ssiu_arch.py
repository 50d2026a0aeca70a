"""SSIU: Structural Similarity-Inspired Unfolding for lightweight image super-resolution.

Zhangkai Ni, Yang Zhang, Wenhan Yang, Hanli Wang, Shiqi Wang, Sam Kwong. "Structural Similarity-Inspired
Unfolding for Lightweight Image Super-Resolution", IEEE Transactions on Image Processing 34:3861-3872,
2025 (arXiv:2506.11823). Reference code: github.com/eezkni/SSIU (``models/SSUFSR_network.py``).

The network unfolds an SR objective constrained by structural similarity into ``num_block`` steps
(SSRM). Each step updates the feature estimate with Mixed-Scale Gating Modules (MSGM) and one
Efficient Sparse Attention Module (ESAM); a Mixture-of-Experts Feature Selector (MoE-FS) fuses the
estimates of three steps before a pixel-shuffle reconstruction.

Parameter names follow the published checkpoints (``head``, ``body.N.{norm,s1,s2,s3,s4,ffn}``,
``moe``, ``tail``), so a published state dict loads with ``strict=True`` once its ``module.`` prefix
is removed (see :mod:`ssiu_arch.convert`). All layers run in any memory format; the network is fastest
in ``torch.channels_last`` on CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from basicsr.utils.registry import ARCH_REGISTRY
from torch import nn

__all__ = ['SSIU', 'expert_steps_for', 'pad_to_multiple']


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the bottom/right of an NCHW tensor to a multiple of ``multiple`` by mirror reflection.

    Where one reflection suffices (pad < side) this is ``F.pad(mode='reflect')``, as the published
    network does. Smaller sides, where the published network crashes, are extended by repeating the
    reflection (the whole-sample symmetric periodic extension); a side of one pixel is replicated.
    """
    h, w = x.shape[-2:]
    pad_h, pad_w = (-h) % multiple, (-w) % multiple
    while pad_h or pad_w:
        h, w = x.shape[-2:]
        step_h = pad_h if h > 1 else 0
        step_w = pad_w if w > 1 else 0
        step_h, step_w = min(step_h, h - 1), min(step_w, w - 1)
        if step_h or step_w:
            x = F.pad(x, (0, step_w, 0, step_h), mode='reflect')
        if (h == 1 and pad_h) or (w == 1 and pad_w):
            x = F.pad(x, (0, pad_w if w == 1 else 0, 0, pad_h if h == 1 else 0), mode='replicate')
            step_h, step_w = (pad_h if h == 1 else step_h), (pad_w if w == 1 else step_w)
        pad_h, pad_w = pad_h - step_h, pad_w - step_w
    return x


def expert_steps_for(num_block: int) -> tuple[int, int, int]:
    """Unfolding steps (1-based; 0 is the head features) whose estimates the MoE-FS combines.

    The published network collects the estimate after every ``num_block // 3``-th step and after the
    last step, and keeps the last three collected: for 3, 4 and 6 steps or more that is what we do.
    For 5 steps the published code keeps the first three collected (steps 1-3, ignoring steps 4 and
    5) and for 1 or 2 steps it divides by zero: we keep the last three iterates there, counting the
    head features as the initial iterate (5: 3, 4, 5; 2: 0, 1, 2; 1: 0, 0, 1).
    """
    if num_block < 1:
        raise ValueError(f'num_block must be >= 1, got {num_block}')
    if num_block < 3:
        return tuple(max(step, 0) for step in range(num_block - 2, num_block + 1))
    interval = num_block // 3
    collected = [step for step in range(1, num_block + 1) if step % interval == 0 or step == num_block]
    return tuple(collected[-3:])


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW tensor (the ``WithBias`` norm of the reference, eps 1e-6)."""

    def __init__(self, num_feat: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.body = nn.LayerNorm(num_feat, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class MSGM(nn.Module):
    """Mixed-Scale Gating Module: ``out = W_o(GELU(W_1 x) * W_3 DW_k(W_2 x))``, (B, C, H, W) -> (B, C, H, W).

    The GELU branch sees one pixel, the gated branch a ``kernel_size`` neighbourhood (reflect padded).
    Its two input projections share the input; :meth:`input_projection` returns them stacked so that
    a caller can run them, and those of other MSGMs on the same input, as one 1x1 convolution.
    """

    def __init__(self, num_feat: int, expansion: float = 1.0, kernel_size: int = 3, ratio: float = 1.0) -> None:
        super().__init__()
        hidden, mid = int(num_feat * expansion), int(num_feat * ratio)
        self.project_in1 = nn.Conv2d(num_feat, hidden, 1)
        self.project_in2 = nn.Sequential(
            nn.Conv2d(num_feat, mid, 1),
            nn.Conv2d(mid, mid, kernel_size, padding=kernel_size // 2, groups=mid, padding_mode='reflect'),
            nn.Conv2d(mid, hidden, 1),
        )
        self.project_out = nn.Conv2d(hidden, num_feat, 1)

    def input_projection(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Weight and bias of ``project_in1`` and ``project_in2[0]`` stacked along the output channels."""
        first = self.project_in2[0]
        return (
            torch.cat([self.project_in1.weight, first.weight]),
            torch.cat([self.project_in1.bias, first.bias]),
        )

    def forward_projected(self, projected: torch.Tensor) -> torch.Tensor:
        """The module after its input projections; ``projected`` is their stacked output."""
        gate, value = projected.split([self.project_in1.out_channels, self.project_in2[0].out_channels], dim=1)
        value = self.project_in2[2](self.project_in2[1](value))
        return self.project_out(F.gelu(gate) * value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_projected(F.conv2d(x, *self.input_projection()))


class ESAM(nn.Module):
    """Efficient Sparse Attention Module: halo block attention at reduced resolution.

    (B, C, H, W) -> (B, C, H, W), with H and W multiples of ``block_size * downsample``. Features are
    max-pooled by ``downsample``; each ``block_size``² block of queries attends to the keys of the
    block grown by ``halo`` pixels on each side (zero-padded at the border), with learned row (first
    half of each head's channels) and column (second half) embeddings added to the keys. The result
    returns to full resolution through a depthwise convolution and bilinear upsampling.
    """

    def __init__(
        self,
        num_feat: int,
        num_heads: int = 4,
        block_size: int = 8,
        halo: int = 1,
        downsample: int = 2,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if num_feat % num_heads or (num_feat // num_heads) % 2:
            raise ValueError(f'num_feat ({num_feat}) must split into num_heads ({num_heads}) heads of even width')
        self.num_heads, self.block_size, self.halo, self.downsample = num_heads, block_size, halo, downsample
        head_dim, window = num_feat // num_heads, block_size + 2 * halo
        self.rel_h = nn.Parameter(torch.randn(1, window, 1, head_dim // 2))
        self.rel_w = nn.Parameter(torch.randn(1, 1, window, head_dim // 2))
        self.qkv_conv = nn.Conv2d(num_feat, num_feat * 3, 1, bias=False)
        if downsample > 1:
            self.LocalProp = nn.Sequential(
                nn.Conv2d(num_feat, num_feat, kernel_size, padding=kernel_size // 2, groups=num_feat,
                          padding_mode='reflect'),
                nn.Upsample(scale_factor=downsample, mode='bilinear', align_corners=True),
            )

    def key_embedding(self) -> torch.Tensor:
        """Positional embedding added to every key window: (window², head_dim)."""
        window = self.rel_h.shape[1]
        rows = self.rel_h[0].expand(-1, window, -1)
        cols = self.rel_w[0].expand(window, -1, -1)
        return torch.cat([rows, cols], dim=-1).flatten(0, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample > 1:
            x = F.max_pool2d(x, 2, self.downsample)
        b, c, h, w = x.shape
        bs, halo, heads = self.block_size, self.halo, self.num_heads
        if h % bs or w % bs:
            raise ValueError(f'ESAM input {h}x{w} (after pooling) is not a multiple of block_size {bs}')
        nh, nw, head_dim, window = h // bs, w // bs, c // heads, bs + 2 * halo
        q, k, v = self.qkv_conv(x).chunk(3, dim=1)
        # Queries: (B * blocks, heads, bs², head_dim).
        q = q.reshape(b, heads, head_dim, nh, bs, nw, bs).permute(0, 3, 5, 1, 4, 6, 2).reshape(
            b * nh * nw, heads, bs * bs, head_dim)

        # Keys and values: overlapping (bs + 2 halo)² windows with stride bs over the zero-padded map.
        def windows(t: torch.Tensor) -> torch.Tensor:
            t = F.pad(t, (halo, halo, halo, halo)).unfold(2, window, bs).unfold(3, window, bs)
            t = t.reshape(b, heads, head_dim, nh, nw, window, window).permute(0, 3, 4, 1, 5, 6, 2)
            return t.reshape(b * nh * nw, heads, window * window, head_dim)

        k = windows(k) + self.key_embedding()
        out = F.scaled_dot_product_attention(q, k, windows(v))
        out = out.reshape(b, nh, nw, heads, bs, bs, head_dim).permute(0, 3, 6, 1, 4, 2, 5).reshape(b, c, h, w)
        if self.downsample > 1:
            out = self.LocalProp(out)
        return out


class SSRMStep(nn.Module):
    """One unfolding step (SSRM) of the structural-similarity objective, (B, C, H, W) -> (B, C, H, W).

    With ``a`` the current estimate and ``y`` the head (observation) features::

        a' = LN(a); z = MSGM_1(a'); b = MSGM_2(a')      # structure / luminance terms
        v = a' + z + y; v = v + ESAM(v)                  # data-consistent update, sparse long-range
        a = MSGM_4(v - b) + b; a = a + MSGM_ffn(a)       # proximal refinement
    """

    def __init__(
        self,
        num_feat: int,
        num_heads: int = 4,
        block_size: int = 8,
        halo: int = 1,
        attn_downsample: int = 2,
        expansion: float = 1.0,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        self.norm = ChannelLayerNorm(num_feat)
        self.s1 = MSGM(num_feat, expansion, kernel_size)
        self.s2 = MSGM(num_feat, expansion, kernel_size)
        self.s3 = ESAM(num_feat, num_heads, block_size, halo, attn_downsample, kernel_size)
        self.s4 = MSGM(num_feat, expansion, kernel_size)
        self.ffn = MSGM(num_feat, expansion, kernel_size)

    def forward(self, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        a = self.norm(a)
        (w1, b1), (w2, b2) = self.s1.input_projection(), self.s2.input_projection()
        z_in, b_in = F.conv2d(a, torch.cat([w1, w2]), torch.cat([b1, b2])).split([w1.shape[0], w2.shape[0]], dim=1)
        z, b = self.s1.forward_projected(z_in), self.s2.forward_projected(b_in)
        v = a + z + y
        v = self.s3(v) + v
        a = self.s4(v - b) + b
        return self.ffn(a) + a


class MoEFeatureSelector(nn.Module):
    """MoE-FS: per-pixel, per-channel softmax gate over three step estimates, then a residual 1x1 fuse.

    Three (B, C, H, W) experts -> (B, C, H, W) output and (B, 3, C, H, W) gate probabilities.
    """

    def __init__(self, num_feat: int) -> None:
        super().__init__()
        self.fc_a = nn.Conv2d(num_feat, num_feat, 1)
        self.fc_b = nn.Conv2d(num_feat, num_feat, 1)
        self.fc_c = nn.Conv2d(num_feat, num_feat, 1)
        self.fuse = nn.Conv2d(num_feat, num_feat, 1)

    def forward(self, experts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logits = torch.stack([fc(e) for fc, e in zip((self.fc_a, self.fc_b, self.fc_c), experts)], dim=1)
        gates = logits.softmax(dim=1)
        out = sum(gates[:, i] * e for i, e in enumerate(experts))
        return self.fuse(out) + out, gates


@ARCH_REGISTRY.register()
class SSIU(nn.Module):
    """SSIU network. Input (B, num_in_ch, H, W) in [0, 1], any H, W >= 1; output (B, num_out_ch, sH, sW).

    Args:
        upscale: scale factor s (the published models: 2, 3, 4).
        num_in_ch, num_out_ch: image channels.
        num_feat: feature width (paper: 64).
        num_block: number of unfolding steps (paper: 9).
        num_heads, block_size, halo, attn_downsample: ESAM heads, query block side, key halo and
            max-pool factor (paper: 4, 8, 1, 2).
        expansion: MSGM hidden width relative to ``num_feat`` (paper: 1).
        kernel_size: depthwise kernel of MSGM and ESAM (paper: 3).
        pad_multiple: input sides are reflect-padded to a multiple of this (paper: 16, which is also
            ``block_size * attn_downsample``); must be a multiple of ``block_size * attn_downsample``.
        expert_steps: the three unfolding steps fed to MoE-FS (0 = head features); default
            :func:`expert_steps_for` ``(num_block)``, the published choice.
    """

    def __init__(
        self,
        upscale: int = 4,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_block: int = 9,
        num_heads: int = 4,
        block_size: int = 8,
        halo: int = 1,
        attn_downsample: int = 2,
        expansion: float = 1.0,
        kernel_size: int = 3,
        pad_multiple: int = 16,
        expert_steps: tuple[int, int, int] | None = None,
    ) -> None:
        super().__init__()
        if upscale < 1:
            raise ValueError(f'upscale must be a positive integer, got {upscale}')
        if pad_multiple % (block_size * attn_downsample):
            raise ValueError(f'pad_multiple ({pad_multiple}) must be a multiple of block_size * attn_downsample '
                             f'({block_size * attn_downsample})')
        self.upscale, self.pad_multiple = upscale, pad_multiple
        self.expert_steps = tuple(expert_steps) if expert_steps is not None else expert_steps_for(num_block)
        if len(self.expert_steps) != 3 or not all(0 <= s <= num_block for s in self.expert_steps):
            raise ValueError(f'expert_steps must be three steps in [0, {num_block}], got {expert_steps}')

        self.head = nn.Conv2d(num_in_ch, num_feat, 3, padding=1, padding_mode='reflect')
        self.body = nn.ModuleList(
            SSRMStep(num_feat, num_heads, block_size, halo, attn_downsample, expansion, kernel_size)
            for _ in range(num_block))
        self.moe = MoEFeatureSelector(num_feat)
        self.tail = nn.Sequential(*self._upsampler(upscale, num_feat, num_out_ch))

    @staticmethod
    def _upsampler(upscale: int, num_feat: int, num_out_ch: int) -> list[nn.Module]:
        stages = [2, 2] if upscale == 4 else [upscale]
        layers: list[nn.Module] = []
        for factor in stages:
            layers += [nn.Conv2d(num_feat, num_feat * factor * factor, 1), nn.PixelShuffle(factor), nn.GELU()]
        layers.append(nn.Conv2d(num_feat, num_out_ch, 3, padding=1, padding_mode='reflect'))
        return layers

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        """Super-resolve ``x``.

        With ``return_aux`` also returns a dict with ``gates``, the MoE-FS gate probabilities
        (B, 3, num_feat, H, W), and ``step_outputs``, one SR image per expert step: the tail applied to
        that step's estimate plus the head features, plus the bilinear skip (what the MoE-FS output
        would be if the gate chose that step alone, fuse aside).
        """
        h, w = x.shape[-2:]
        x = pad_to_multiple(x, self.pad_multiple)
        y = self.head(x)
        estimates = {0: y}
        a = y
        for step, block in enumerate(self.body, start=1):
            a = block(a, y)
            if step in self.expert_steps:
                estimates[step] = a
        experts = [estimates[s] for s in self.expert_steps]
        fused, gates = self.moe(experts)
        skip = F.interpolate(x, scale_factor=self.upscale, mode='bilinear', align_corners=False)
        s = self.upscale
        out = (self.tail(fused + y) + skip)[..., :h * s, :w * s]
        if not return_aux:
            return out
        steps = [(self.tail(e + y) + skip)[..., :h * s, :w * s] for e in experts]
        return out, {'gates': gates[..., :h, :w], 'step_outputs': steps}
