"""IDSA-Net: Information Distillation and Shared Attention Network for lightweight image super-resolution.

"A lightweight image super-resolution reconstruction framework based on information distillation and shared
attention network", Chinese Journal of Engineering (工程科学学报), 2025, DOI 10.13374/j.issn2095-9389.2025.10.24.003.
Reported: 752K parameters at x4; PSNR 32.47 / 28.84 / 27.72 / 26.57 dB on Set5 / Set14 / B100 / Urban100.

No code is published. This implementation follows the paper's description of its four parts:

* shallow 3x3 convolution, then ``num_block`` attention-sharing distillation blocks (:class:`ASDB`), a 3x3
  convolution and a long residual;
* :class:`ASDB`: ``num_stages`` distillation stages, each splitting off ``distill_ratio * num_feat`` channels
  (1x1 convolution) and refining the rest (:class:`RefineUnit`) with a local convolution, window
  self-attention and a sequence-modelling unit (:class:`SequenceModellingUnit`); the distilled channels are
  purified by :class:`LKCIP`, fused by a 1x1 convolution, reweighted by :class:`INHA` and added to the input;
* the spatial attention matrix is computed by one :class:`AttentionMap` per group of ``share_group``
  consecutive blocks (in the first stage of the group's first block) and reused by every later stage and
  block of the group, which only compute new values. A forward pass computes ``ceil(num_block /
  share_group)`` attention matrices instead of ``num_block * num_stages``;
* sub-pixel convolution upsampling (3x3 convolution to ``num_out_ch * upscale**2`` channels, pixel shuffle).

Choices the description leaves open, made here:

* self-attention over non-overlapping ``window_size``² windows (no shift: the local convolutions and the
  23-pixel receptive field of LKCIP connect neighbouring windows) with a learned relative position bias;
  the input is mirror-padded to a multiple of ``window_size`` (:func:`mirror_pad`, as SSIU pads) and
  the output cropped back, so any size works;
* the sequence-modelling unit is a recurrence-free, Mamba-like gated unit: a depthwise 1-D convolution
  along the raster-flattened token sequence of each window, gated by a SiLU branch;
* the local convolution is a depthwise 3x3 convolution with GELU and a residual (the attention values and
  the sequence unit do the channel mixing);
* LKCIP: channel shuffle across the distilled stages, then VAN's large-kernel attention (depthwise 5x5,
  depthwise 7x7 dilated by 3, pointwise) whose pointwise convolution is grouped by stage, so the shuffle
  lets each group mix channels of every stage (before ungrouped layers a shuffle would change nothing);
* INHA, placed at the end of each block: channel attention from average pooling along height and along
  width, each followed by a 1-D depthwise convolution and a sigmoid (no channel reduction), then spatial
  attention: a 7x7 convolution on the channel mean and max of the instance-normalised features;
* defaults (64 channels, 8 blocks of 3 stages, 16 distilled channels per stage, 4 heads, 8x8 windows,
  attention shared by pairs of blocks, so 4 attention matrices per forward pass) give 757,912 parameters at
  x4, 0.8% above the reported 752K (737,140 at x2, 745,795 at x3).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['ASDB', 'INHA', 'LKCIP', 'AttentionMap', 'IDSANet', 'RefineUnit', 'SequenceModellingUnit',
           'channel_shuffle', 'mirror_pad', 'window_partition', 'window_reverse']


def mirror_pad(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the bottom/right of an NCHW tensor to a multiple of ``multiple`` by repeated mirror reflection.

    Equals ``F.pad(mode='reflect')`` where one reflection suffices; smaller sides repeat it (period ``2n - 2``)
    and a one-pixel side is replicated. An index gather, so traced graphs pad any size.
    """
    def index(n: int) -> torch.Tensor:
        period = 2 * n - 2 + 1 // n
        m = torch.arange(((n - 1) // multiple + 1) * multiple, device=x.device) % period
        return torch.minimum(m, period - m)

    h, w = x.shape[-2:]
    return x.index_select(-2, index(h)).index_select(-1, index(w))


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B * windows, window_size², C) tokens, windows in raster order, H and W multiples."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // window_size, window_size, w // window_size, window_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, window_size * window_size, c)


def window_reverse(tokens: torch.Tensor, window_size: int, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B * windows, window_size², C) -> (B, C, H, W) in channels-last memory.

    Tokens keep their channels innermost, so the channels-last result costs one copy.
    """
    c = tokens.shape[-1]
    x = tokens.reshape(-1, h // window_size, w // window_size, window_size, window_size, c)
    return x.transpose(2, 3).reshape(-1, h, w, c).permute(0, 3, 1, 2)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle: channel ``g * (C / groups) + i`` moves to ``i * groups + g``.

    Written into ``empty_like(x)`` so that a channels-last input stays channels-last (a reshape would not).
    """
    b, c, h, w = x.shape
    out = torch.empty_like(x)
    out.view(b, c // groups, groups, h, w).copy_(x.reshape(b, groups, c // groups, h, w).transpose(1, 2))
    return out


class AttentionMap(nn.Module):
    """Window attention matrix ``softmax(q k^T / sqrt(d) + relative position bias)``.

    (B * windows, window_size², C) tokens -> (B * windows, num_heads, window_size², window_size²). Every
    attention matrix of the network is computed by one call of one of these modules.
    """

    def __init__(self, num_feat: int, num_heads: int = 4, window_size: int = 8) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(num_feat)
        self.qk = nn.Linear(num_feat, 2 * num_feat)
        self.rel_bias = nn.Parameter(torch.empty((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.rel_bias, std=0.02)
        coords = torch.stack(torch.meshgrid(torch.arange(window_size), torch.arange(window_size), indexing='ij'))
        rel = (coords.flatten(1)[:, :, None] - coords.flatten(1)[:, None, :]) + window_size - 1
        self.register_buffer('rel_index', rel[0] * (2 * window_size - 1) + rel[1], persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        bw, n, c = tokens.shape
        q, k = self.qk(self.norm(tokens)).reshape(bw, n, 2, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = (q * (c // self.num_heads) ** -0.5) @ k.transpose(-2, -1)
        return (attn + self.rel_bias[self.rel_index].permute(2, 0, 1)).softmax(dim=-1)


class SequenceModellingUnit(nn.Module):
    """Gated depthwise 1-D convolution along each window's token sequence, (B', N, C) -> (B', N, C).

    ``out = W_o(SiLU(DWConv1d(a)) * SiLU(g))`` with ``(a, g) = W_i(LN(x))``: a recurrence-free stand-in for
    a Mamba-style selective scan over the raster-flattened window.
    """

    def __init__(self, num_feat: int, expansion: float = 1.0, kernel_size: int = 5) -> None:
        super().__init__()
        hidden = int(num_feat * expansion)
        self.norm = nn.LayerNorm(num_feat)
        self.proj_in = nn.Linear(num_feat, 2 * hidden)
        self.conv = nn.Conv1d(hidden, hidden, kernel_size, padding=kernel_size // 2, groups=hidden)
        self.proj_out = nn.Linear(hidden, num_feat)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        a, g = self.proj_in(self.norm(tokens)).chunk(2, dim=-1)
        a = self.conv(a.transpose(1, 2)).transpose(1, 2)
        return self.proj_out(F.silu(a) * F.silu(g))


class RefineUnit(nn.Module):
    """Refinement of one distillation stage, (B, C, H, W) -> (B, C, H, W) with H, W window multiples.

    ``x = x + GELU(DWConv(x))`` (:meth:`local`), then on window tokens ``t = t + W_p(A v(LN(t)))`` with the
    shared attention matrix ``A`` and ``t = t + SMU(t)`` (:meth:`global_`).
    """

    def __init__(
        self,
        num_feat: int,
        num_heads: int = 4,
        local_kernel: int = 3,
        smu_expansion: float = 1.0,
        smu_kernel: int = 5,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.local_conv = nn.Conv2d(num_feat, num_feat, local_kernel, padding=local_kernel // 2, groups=num_feat)
        self.norm = nn.LayerNorm(num_feat)
        self.v = nn.Linear(num_feat, num_feat)
        self.proj = nn.Linear(num_feat, num_feat)
        self.smu = SequenceModellingUnit(num_feat, smu_expansion, smu_kernel)

    def local(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.gelu(self.local_conv(x))

    def global_(self, tokens: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        bw, n, c = tokens.shape
        v = self.v(self.norm(tokens)).reshape(bw, n, self.num_heads, c // self.num_heads).transpose(1, 2)
        tokens = tokens + self.proj((attn @ v).transpose(1, 2).reshape(bw, n, c))
        return tokens + self.smu(tokens)


class LKCIP(nn.Module):
    """Large-Kernel Channel Information Purification: ``x' = shuffle(x); x' * PW_g(DW_dil(DW(x')))``.

    (B, C, H, W) -> (B, C, H, W); ``groups`` (the number of concatenated distilled stages) must divide C.
    """

    def __init__(
        self,
        channels: int,
        groups: int = 4,
        kernel_size: int = 5,
        dilated_kernel: int = 7,
        dilation: int = 3,
    ) -> None:
        super().__init__()
        self.groups = groups
        self.dw = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.dw_dilated = nn.Conv2d(channels, channels, dilated_kernel, padding=dilated_kernel // 2 * dilation,
                                    dilation=dilation, groups=channels)
        self.pw = nn.Conv2d(channels, channels, 1, groups=groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = channel_shuffle(x, self.groups)
        return x * self.pw(self.dw_dilated(self.dw(x)))


class INHA(nn.Module):
    """Instance-Normalisation Hybrid Attention, (B, C, H, W) -> (B, C, H, W).

    Channel attention ``y = x * sigmoid(DW1d_h(mean_w x)) * sigmoid(DW1d_w(mean_h x))``, then spatial
    attention ``y * sigmoid(Conv([mean_c IN(y), max_c IN(y)]))``.
    """

    def __init__(self, num_feat: int, kernel_size: int = 7, spatial_kernel: int = 7) -> None:
        super().__init__()
        self.conv_h = nn.Conv1d(num_feat, num_feat, kernel_size, padding=kernel_size // 2, groups=num_feat)
        self.conv_w = nn.Conv1d(num_feat, num_feat, kernel_size, padding=kernel_size // 2, groups=num_feat)
        self.norm = nn.InstanceNorm2d(num_feat, affine=True)
        self.spatial = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a_h = torch.sigmoid(self.conv_h(x.mean(dim=3))).unsqueeze(3)
        a_w = torch.sigmoid(self.conv_w(x.mean(dim=2))).unsqueeze(2)
        y = x * a_h * a_w
        n = self.norm(y)
        return y * torch.sigmoid(self.spatial(torch.cat([n.mean(dim=1, keepdim=True), n.amax(dim=1, keepdim=True)], 1)))


class ASDB(nn.Module):
    """Attention-Sharing Distillation Block, (B, C, H, W) -> (B, C, H, W) with H, W window multiples.

    With ``computes_attention`` the block owns an :class:`AttentionMap` and computes the matrix in its first
    stage when none is passed in; otherwise the caller must pass the matrix of its group. ``forward``
    returns the output and the matrix for the following blocks of the group.
    """

    def __init__(
        self,
        num_feat: int,
        computes_attention: bool = True,
        num_stages: int = 3,
        distill_ratio: float = 0.25,
        num_heads: int = 4,
        window_size: int = 8,
        local_kernel: int = 3,
        smu_expansion: float = 1.0,
        smu_kernel: int = 5,
        lka_kernel: int = 5,
        lka_dilated_kernel: int = 7,
        lka_dilation: int = 3,
        inha_kernel: int = 7,
        spatial_kernel: int = 7,
    ) -> None:
        super().__init__()
        self.window_size = window_size
        distilled = int(num_feat * distill_ratio)
        self.attn_map = AttentionMap(num_feat, num_heads, window_size) if computes_attention else None
        self.distill = nn.ModuleList(nn.Conv2d(num_feat, distilled, 1) for _ in range(num_stages + 1))
        self.refine = nn.ModuleList(
            RefineUnit(num_feat, num_heads, local_kernel, smu_expansion, smu_kernel) for _ in range(num_stages))
        self.purify = LKCIP(distilled * (num_stages + 1), num_stages + 1, lka_kernel, lka_dilated_kernel,
                            lka_dilation)
        self.fuse = nn.Conv2d(distilled * (num_stages + 1), num_feat, 1)
        self.attention = INHA(num_feat, inha_kernel, spatial_kernel)

    def forward(self, x: torch.Tensor, attn: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        h, w = x.shape[-2:]
        ws = self.window_size
        feat, distilled = x, []
        for distill, refine in zip(self.distill, self.refine):
            distilled.append(distill(feat))
            tokens = window_partition(refine.local(feat), ws)
            if attn is None:
                if self.attn_map is None:
                    raise ValueError("this ASDB reuses its group's attention matrix: pass attn")
                attn = self.attn_map(tokens)
            feat = window_reverse(refine.global_(tokens, attn), ws, h, w)
        distilled.append(self.distill[-1](feat))
        out = self.fuse(self.purify(torch.cat(distilled, dim=1)))
        return self.attention(out) + x, attn


class IDSANet(nn.Module):
    """IDSA-Net. Input (B, num_in_ch, H, W) in [0, 1], any H, W >= 1; output (B, num_out_ch, sH, sW).

    Args:
        upscale: scale factor s.
        num_in_ch, num_out_ch: image channels.
        num_feat: feature width (default 64).
        num_block: number of attention-sharing distillation blocks (default 8).
        share_group: consecutive blocks sharing one attention matrix (default 2; 1 disables sharing
            across blocks, stages of a block always share).
        num_stages: distillation stages per block (default 3).
        distill_ratio: channels split off per stage, relative to ``num_feat`` (default 0.25).
        num_heads: attention heads (default 4); must divide ``num_feat``.
        window_size: side of the attention windows; inputs are padded to a multiple of it (default 8).
        local_kernel: depthwise kernel of the local convolution (default 3).
        smu_expansion, smu_kernel: hidden width (relative to ``num_feat``) and 1-D kernel of the
            sequence-modelling unit (defaults 1.0, 5).
        lka_kernel, lka_dilated_kernel, lka_dilation: LKCIP depthwise kernel, dilated depthwise kernel and
            its dilation (defaults 5, 7, 3 as in VAN: a 23-pixel receptive field).
        inha_kernel, spatial_kernel: INHA 1-D channel-attention kernel and spatial-attention kernel
            (defaults 7, 7).
    """

    def __init__(
        self,
        upscale: int = 4,
        num_in_ch: int = 3,
        num_out_ch: int = 3,
        num_feat: int = 64,
        num_block: int = 8,
        share_group: int = 2,
        num_stages: int = 3,
        distill_ratio: float = 0.25,
        num_heads: int = 4,
        window_size: int = 8,
        local_kernel: int = 3,
        smu_expansion: float = 1.0,
        smu_kernel: int = 5,
        lka_kernel: int = 5,
        lka_dilated_kernel: int = 7,
        lka_dilation: int = 3,
        inha_kernel: int = 7,
        spatial_kernel: int = 7,
    ) -> None:
        super().__init__()
        for name, value in (('upscale', upscale), ('num_block', num_block), ('share_group', share_group),
                            ('num_stages', num_stages), ('window_size', window_size)):
            if value < 1:
                raise ValueError(f'{name} must be a positive integer, got {value}')
        if num_feat % num_heads:
            raise ValueError(f'num_feat ({num_feat}) must be divisible by num_heads ({num_heads})')
        if int(num_feat * distill_ratio) < 1:
            raise ValueError(f'distill_ratio ({distill_ratio}) leaves no distilled channel of num_feat ({num_feat})')
        self.upscale, self.window_size = upscale, window_size
        self.head = nn.Conv2d(num_in_ch, num_feat, 3, padding=1)
        self.body = nn.ModuleList(
            ASDB(num_feat, i % share_group == 0, num_stages, distill_ratio, num_heads, window_size, local_kernel,
                 smu_expansion, smu_kernel, lka_kernel, lka_dilated_kernel, lka_dilation, inha_kernel,
                 spatial_kernel)
            for i in range(num_block))
        self.body_conv = nn.Conv2d(num_feat, num_feat, 3, padding=1)
        self.tail = nn.Sequential(nn.Conv2d(num_feat, num_out_ch * upscale * upscale, 3, padding=1),
                                  nn.PixelShuffle(upscale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        feat = self.head(mirror_pad(x, self.window_size))
        out, attn = feat, None
        for block in self.body:
            out, attn = block(out, None if block.attn_map is not None else attn)
        out = self.tail(self.body_conv(out) + feat)
        return out[..., :h * self.upscale, :w * self.upscale]
