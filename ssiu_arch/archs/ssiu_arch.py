"""SSIU: Structural Similarity-Inspired Unfolding for lightweight image super-resolution.

Zhangkai Ni, Yang Zhang, Wenhan Yang, Hanli Wang, Shiqi Wang, Sam Kwong. "Structural Similarity-Inspired
Unfolding for Lightweight Image Super-Resolution", IEEE Transactions on Image Processing 34:3861-3872,
2025 (arXiv:2506.11823). Reference code: github.com/eezkni/SSIU (``models/SSUFSR_network.py``).

The network unfolds an SR objective constrained by structural similarity into ``num_block`` steps
(:class:`SSRMStep`). Each step updates the feature estimate with Mixed-Scale Gating Modules (:class:`MSGM`) and
one Efficient Sparse Attention Module (:class:`ESAM`); a Mixture-of-Experts Feature Selector
(:class:`MoEFeatureSelector`) fuses the estimates of three steps before a pixel-shuffle reconstruction.

Parameter names follow the published checkpoints (``head``, ``body.N.{norm,s1,s2,s3,s4,ffn}``,
``moe``, ``tail``), so a published state dict loads with ``strict=True`` once its ``module.`` prefix
is removed (see :mod:`ssiu_arch.tools.convert`).

This file is the definition of the network, used by training, GPUs, tracing (ONNX export) and any outside
tool; it needs only torch and einops and runs as a copy on its own. Feature maps are NCHW tensors kept in
channels-last memory, where 1x1 convolutions are matrix products over contiguous channel vectors.

Speed: CPU speed lives in :mod:`ssiu_arch.cpu`. Its engine computes the same function from an :class:`SSIU`'s
parameters with fused kernels (in training, these modules with some parts as kernels that have backward formulas);
``import ssiu_arch`` installs it as :attr:`SSIU.engine`, and it steps aside (this file runs) for GPUs, tracing,
compiling, hooks, subclasses and unsupported hyper-parameters.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = ['ESAM', 'MSGM', 'SSIU', 'ChannelLayerNorm', 'MoEFeatureSelector', 'SSRMStep', 'expert_steps_for',
           'pad_to_multiple']


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the bottom/right of an NCHW tensor to a multiple of ``multiple`` by mirror reflection.

    This is the whole-sample symmetric periodic extension: where one reflection suffices (pad < side) it
    equals ``F.pad(mode='reflect')``, as the published network does; smaller sides, where the published
    network crashes, repeat the reflection, and a side of one pixel is replicated. It is an index gather
    computed from the sizes, so a traced (ONNX) or compiled graph pads every input size correctly.
    """
    h, w = x.shape[-2:]
    return x.index_select(-2, _mirror_index(h, multiple, x.device)).index_select(-1, _mirror_index(w, multiple,
                                                                                                   x.device))


def _mirror_index(n: int, multiple: int, device: torch.device) -> torch.Tensor:
    """Source index of each position of a side of ``n`` extended to a multiple of ``multiple``.

    The extension has period ``2n - 2`` (1 for a single pixel, which ``1 // n`` adds): position ``i`` reads
    ``m = i mod period`` or, past the last sample, its mirror ``period - m``. Plain arithmetic on the size: no
    comparisons, and a padded length whose positivity sympy can see, so that torch.compile lowers it with dynamic
    shapes (and tracing records it as an expression of the size).
    """
    period = 2 * n - 2 + 1 // n
    m = torch.arange(((n - 1) // multiple + 1) * multiple, device=device) % period
    return torch.minimum(m, period - m)


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
    """``LN`` of the SSRM step: LayerNorm over the channels of each pixel, (B, C, H, W) -> (B, C, H, W).

    The published ``WithBias`` norm (eps 1e-6). On a channels-last map both permutes are free.
    """

    def __init__(self, num_feat: int = 64, eps: float = 1e-6) -> None:
        super().__init__()
        self.body = nn.LayerNorm(num_feat, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        # Inductor (torch 2.13) cannot sort the symbolic strides of this permuted map when a training graph with
        # dynamic shapes saves it for backward: compiled graphs get a real NCHW copy instead of the view.
        return out.contiguous() if torch.compiler.is_compiling() else out


class MSGM(nn.Module):
    """Mixed-Scale Gating Module, the learned operator of the SSRM step's terms: (B, C, H, W) -> (B, C, H, W).

    ``MSGM(x) = W_o(GELU(W_1 x) * W_3 DW_k(W_2 x))``: a point-wise GELU branch gates a branch that sees a
    ``kernel_size``² neighbourhood (depthwise, reflect padded). ``W_1``, ``W_3`` map to ``expansion * C`` channels.
    """

    def __init__(self, num_feat: int = 64, expansion: float = 1.0, kernel_size: int = 3) -> None:
        super().__init__()
        hidden = int(num_feat * expansion)
        self.project_in1 = nn.Conv2d(num_feat, hidden, 1)
        self.act = nn.GELU()
        self.project_in2 = nn.Sequential(
            nn.Conv2d(num_feat, num_feat, 1),
            nn.Conv2d(num_feat, num_feat, kernel_size, padding=kernel_size // 2, groups=num_feat,
                      padding_mode='reflect'),
            nn.Conv2d(num_feat, hidden, 1),
        )
        self.project_out = nn.Conv2d(hidden, num_feat, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project_out(self.act(self.project_in1(x)) * self.project_in2(x))


class ESAM(nn.Module):
    """Efficient Sparse Attention Module, the SSRM step's non-local term: (B, C, H, W) -> (B, C, H, W).

    H and W must be multiples of ``block_size * downsample``. The map is max-pooled by ``downsample``; each
    ``block_size``² block of queries attends to the keys and values of its window, the block grown by ``halo``
    pixels on each side (zero padded at the border), with a learned row embedding added to the first half of
    each head's key channels and a column embedding to the second half. ``LocalProp`` (a depthwise convolution
    and bilinear upsampling) brings the result back to full resolution.
    """

    def __init__(
        self,
        num_feat: int = 64,
        num_heads: int = 4,
        block_size: int = 8,
        halo: int = 1,
        downsample: int = 2,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        if num_feat % num_heads or (num_feat // num_heads) % 2:
            raise ValueError(f'num_feat ({num_feat}) must split into num_heads ({num_heads}) heads of even width')
        self.num_heads, self.block_size, self.halo = num_heads, block_size, halo
        head_dim, window = num_feat // num_heads, block_size + 2 * halo
        self.scale = head_dim ** -0.5
        self.rel_h = nn.Parameter(torch.randn(1, window, 1, head_dim // 2))
        self.rel_w = nn.Parameter(torch.randn(1, 1, window, head_dim // 2))
        self.pool = nn.MaxPool2d(2, downsample) if downsample > 1 else nn.Identity()
        self.qkv_conv = nn.Conv2d(num_feat, num_feat * 3, 1, bias=False)
        self.LocalProp = nn.Sequential(
            nn.Conv2d(num_feat, num_feat, kernel_size, padding=kernel_size // 2, groups=num_feat,
                      padding_mode='reflect'),
            nn.Upsample(scale_factor=downsample, mode='bilinear', align_corners=True),
        ) if downsample > 1 else nn.Identity()

    def key_embedding(self) -> torch.Tensor:
        """Position embedding added to the keys of every window, window pixels in raster order: (window², head_dim)."""
        window = self.rel_h.shape[1]
        rows = self.rel_h.expand(-1, -1, window, -1)
        cols = self.rel_w.expand(-1, window, -1, -1)
        return rearrange(torch.cat([rows, cols], dim=-1), '1 i j d -> (i j) d')

    def windows(self, t: torch.Tensor) -> torch.Tensor:
        """The window of every block of a (B, C, h, w) map, tiled: (B, C, h / block * window, w / block * window)."""
        block, halo = self.block_size, self.halo
        window = block + 2 * halo
        t = F.pad(t, (halo, halo, halo, halo))

        def index(n: int) -> torch.Tensor:  # rows (or columns) of the padded map, window after window
            start = torch.arange(n // block, device=t.device) * block
            return (start[:, None] + torch.arange(window, device=t.device)).flatten()

        return t.index_select(2, index(t.shape[2] - 2 * halo)).index_select(3, index(t.shape[3] - 2 * halo))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_conv(self.pool(x)).chunk(3, dim=1)
        heads, block, window = self.num_heads, self.block_size, self.block_size + 2 * self.halo
        blocks = rearrange(q, 'b (n d) (y i) (x j) -> b y x n (i j) d', n=heads, i=block, j=block)
        q = blocks.flatten(0, 2) * self.scale  # (B * blocks, heads, block², head_dim)
        k, v = (rearrange(self.windows(t), 'b (n d) (y i) (x j) -> (b y x) n (i j) d', n=heads, i=window, j=window)
                for t in (k, v))  # (B * blocks, heads, window², head_dim)
        attn = (q @ (k + self.key_embedding()).transpose(-2, -1)).softmax(dim=-1)
        out = rearrange((attn @ v).view(blocks.shape), 'b y x n (i j) d -> b (y i) (x j) (n d)', i=block)
        return self.LocalProp(out.permute(0, 3, 1, 2))  # (B, C, h, w) in channels-last memory


class SSRMStep(nn.Module):
    """One unfolding step (SSRM) of the structural-similarity objective, (B, C, H, W) -> (B, C, H, W).

    From the current estimate ``a`` and the head (observation) features ``y``::

        a = LN(a); z = MSGM_1(a); b = MSGM_2(a)      # structure and luminance terms
        v = a + z + y; v = v + ESAM(v)                # data-consistent update, sparse long-range prior
        a = MSGM_4(v - b) + b; a = a + MSGM_ffn(a)    # proximal refinement
    """

    def __init__(
        self,
        num_feat: int = 64,
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
        """The next estimate from estimate ``a`` and head features ``y``."""
        a = self.norm(a)
        z, b = self.s1(a), self.s2(a)
        v = a + z + y
        v = v + self.s3(v)
        a = self.s4(v - b) + b
        return a + self.ffn(a)


class MoEFeatureSelector(nn.Module):
    """MoE-FS: a per-pixel, per-channel softmax gate over three step estimates, then a residual 1x1 fuse.

    Three (B, C, H, W) experts ``e_i`` -> ``fuse(m) + m`` for ``m = sum_i g_i e_i``, and the gates
    ``g = softmax_i(fc_i(e_i))`` (B, 3, C, H, W).
    """

    def __init__(self, num_feat: int = 64) -> None:
        super().__init__()
        self.fc_a = nn.Conv2d(num_feat, num_feat, 1)
        self.fc_b = nn.Conv2d(num_feat, num_feat, 1)
        self.fc_c = nn.Conv2d(num_feat, num_feat, 1)
        self.fuse = nn.Conv2d(num_feat, num_feat, 1)

    def forward(self, experts: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        fcs = (self.fc_a, self.fc_b, self.fc_c)
        logits = torch.stack([fc(e).permute(0, 2, 3, 1) for fc, e in zip(fcs, experts)], dim=3)  # (B, H, W, 3, C)
        gates = logits.softmax(dim=3).permute(0, 3, 4, 1, 2)  # (B, 3, C, H, W), channels innermost in memory
        mixed = gates[:, 0] * experts[0] + gates[:, 1] * experts[1] + gates[:, 2] * experts[2]
        return self.fuse(mixed) + mixed, gates


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
        pad_multiple: input sides are mirror-padded to a multiple of this (paper: 16, which is also
            ``block_size * attn_downsample``); must be a multiple of ``block_size * attn_downsample``.
        expert_steps: the three unfolding steps fed to MoE-FS (0 = head features); default
            :func:`expert_steps_for` ``(num_block)``, the published choice.

    ``engine`` (class attribute) is an optional fast implementation of :meth:`forward`: an object with
    ``accepts(net, x) -> bool`` and ``run(net, x, return_aux)``; :meth:`forward` hands a call over to it when it
    accepts. ``import ssiu_arch`` installs the CPU inference engine of :mod:`ssiu_arch.cpu` there; a copy of
    this file alone has none. Set ``use_engine = False`` on a network to always run the modules here.
    """

    engine = None

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
        self.upscale, self.pad_multiple, self.use_engine = upscale, pad_multiple, True
        self.expert_steps = tuple(expert_steps) if expert_steps is not None else expert_steps_for(num_block)
        if len(self.expert_steps) != 3 or not all(0 <= s <= num_block for s in self.expert_steps):
            raise ValueError(f'expert_steps must be three steps in [0, {num_block}], got {expert_steps}')

        self.head = nn.Conv2d(num_in_ch, num_feat, 3, padding=1, padding_mode='reflect')
        self.body = nn.ModuleList(
            SSRMStep(num_feat, num_heads, block_size, halo, attn_downsample, expansion, kernel_size)
            for _ in range(num_block))
        self.moe = MoEFeatureSelector(num_feat)
        stages = [2, 2] if upscale == 4 else [upscale]
        upsampler = [layer for factor in stages
                     for layer in (nn.Conv2d(num_feat, num_feat * factor ** 2, 1), nn.PixelShuffle(factor), nn.GELU())]
        self.tail = nn.Sequential(*upsampler, nn.Conv2d(num_feat, num_out_ch, 3, padding=1, padding_mode='reflect'))

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        """Super-resolve ``x``.

        With ``return_aux`` also returns a dict with ``gates``, the MoE-FS gate probabilities
        (B, 3, num_feat, H, W), and ``step_outputs``, one SR image per expert step: the tail applied to
        that step's estimate plus the head features, plus the bilinear skip (what the MoE-FS output
        would be if the gate chose that step alone, fuse aside).
        """
        if self.engine is not None and self.engine.accepts(self, x):
            return self.engine.run(self, x, return_aux)
        h, w = x.shape[-2:]
        s = self.upscale
        x = pad_to_multiple(x, self.pad_multiple).contiguous(memory_format=torch.channels_last)
        y = self.head(x)
        a, estimates = y, {0: y}
        for step, block in enumerate(self.body, start=1):
            a = block(a, y)
            if step in self.expert_steps:
                estimates[step] = a
        experts = [estimates[step] for step in self.expert_steps]
        fused, gates = self.moe(experts)
        skip = F.interpolate(x, scale_factor=s, mode='bilinear', align_corners=False)
        out = (self.tail(fused + y) + skip)[..., :h * s, :w * s]
        if not return_aux:
            return out
        steps = [(self.tail(e + y) + skip)[..., :h * s, :w * s] for e in experts]
        return out, {'gates': gates[..., :h, :w], 'step_outputs': steps}
