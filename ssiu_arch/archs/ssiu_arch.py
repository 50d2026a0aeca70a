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
is removed (see :mod:`ssiu_arch.tools.convert`).

Speed: the network is mostly 1x1 convolutions of 64 channels, whose cost on CPU is memory traffic. Inside
:class:`SSIU` every feature map is therefore channels-last ``(B, H, W, C)``. At CPU inference the MSGMs, ESAM's
attention and upsampling and the MoE-FS gating run in compiled kernels (:mod:`ssiu_arch.cpu.kernels`), the MSGMs in
L2-sized row tiles; the remaining 1x1 convolutions go through oneDNN with fused epilogues, and per-channel
biases are moved across linear maps. On large maps the unfolding steps run in bands of rows with the halo rows
of their depthwise convolutions, which keeps allocations small; the tail always runs in bands, so no full-size
HR feature map exists, and its final 3x3 convolution is one matrix product for its 9 taps x 3 outputs, whose
maps are shifted and summed. Training, tracing and ONNX export run the same computation with standard
operators. Results equal the published network up to float32 rounding.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssiu_arch.cpu import kernels
from ssiu_arch.cpu.memory import freed_memory_retained

__all__ = ['SSIU', 'conv2d_reflect', 'expert_steps_for', 'pad_to_multiple']

try:  # oneDNN convolutions with fused epilogues (the CPU kernels torch.compile emits)
    _ONEDNN_CONV = torch.ops.mkldnn._convolution_pointwise
    _ONEDNN_CONV_ADD_ = torch.ops.mkldnn._convolution_pointwise_.binary
except (AttributeError, RuntimeError):
    _ONEDNN_CONV = _ONEDNN_CONV_ADD_ = None
_POINTWISE = ([0, 0], [1, 1], [1, 1], 1)  # padding, stride, dilation, groups of a 1x1 convolution
# Feature maps above glibc malloc's largest mmap threshold (32 MiB) get fresh, zero-filled pages on every
# allocation. CPU inference therefore runs the unfolding steps in 8 MiB row bands on maps above 32 MiB, or above
# four times that where freed memory stays with the process (``ssiu_arch.cpu.memory``): below, whole maps measured
# faster (``SSIU.whole_map_bytes``, ``SSIU.band_bytes``; a band size of 0 processes whole maps).
WHOLE_MAP_BYTES = 32 << 20
BAND_BYTES = 8 << 20
# HR pixels per band of the tail (its 64-channel features are 8 MiB, its 27 tap maps 3.4 MiB): small enough to
# stay in cache and for the allocator to reuse.
TAIL_BAND_PIXELS = 1 << 15
# Pixels per tile of the fused MSGM kernel: its five tile buffers (1.5 MiB at 64 channels) stay in a 2 MiB L2.
MSGM_TILE_PIXELS = 1536


def _onednn_applies(*tensors: torch.Tensor | None) -> bool:
    """Whether the fused oneDNN kernels may compute a product: float32 CPU inference outside tracing.

    They have no autograd formula and no ONNX export, so training, tracing and exporting compose the same
    product from standard operators instead.
    """
    x = tensors[0]
    return (_ONEDNN_CONV is not None and torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
            and x.device.type == 'cpu' and x.dtype == torch.float32 and x.dim() == 4
            and all(t is None or t.is_contiguous() for t in tensors)
            and not (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling())


def _add_(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x + y``; ``x`` is consumed: outside autograd the sum is written into it, saving a buffer."""
    return x + y if torch.is_grad_enabled() else x.add_(y)


def linear_nhwc(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    gelu: bool = False,
    mul: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
    accumulate: bool = False,
) -> torch.Tensor:
    """1x1 convolution of a channels-last ``(B, H, W, C_in)`` tensor with an optional fused epilogue.

    Returns ``GELU(x @ weight.T + bias)`` if ``gelu``, else ``(x @ weight.T + bias) * mul`` or ``... + add``
    (at most one epilogue). ``weight`` is ``(C_out, C_in)``. With ``accumulate``, ``add`` is consumed: at
    inference the sum is written into its storage (unless that is also the storage of ``x``).
    """
    if _onednn_applies(x, weight, bias, mul, add):
        x, weight = x.permute(0, 3, 1, 2), weight[:, :, None, None]
        if accumulate and add.untyped_storage().data_ptr() != x.untyped_storage().data_ptr():
            out = _ONEDNN_CONV_ADD_(add.permute(0, 3, 1, 2), x, weight, bias, *_POINTWISE, 'add', None, None, [], None)
        elif add is not None or mul is not None:
            attr, other = ('add', add) if add is not None else ('mul', mul)
            out = _ONEDNN_CONV.binary(x, other.permute(0, 3, 1, 2), weight, bias, *_POINTWISE, attr, None, None, [],
                                      None)
        else:
            out = _ONEDNN_CONV(x, weight, bias, *_POINTWISE, 'gelu' if gelu else 'none', [], 'none' if gelu else None)
        return out.permute(0, 2, 3, 1)
    out = F.linear(x, weight, bias)
    if gelu:
        out = F.gelu(out)
    if mul is not None:
        out = out * mul
    if add is not None:
        out = out + add
    return out


def conv2d_reflect(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, groups: int = 1
) -> torch.Tensor:
    """``nn.Conv2d(padding=k // 2, padding_mode='reflect')`` on a channels-last ``(B, H, W, C)`` tensor.

    Instead of a reflect-padded copy of the whole map, the map is convolved with zero padding and its border
    rows and columns (``k // 2`` wide) are recomputed from reflect-padded strips: the same values, without
    the full-size copy. Maps narrower than two borders, and traced graphs (ONNX export), are padded whole.
    """
    x = x.permute(0, 3, 1, 2)
    p = weight.shape[-1] // 2
    h, w = x.shape[-2:]
    if p == 0:
        return F.conv2d(x, weight, bias, groups=groups).permute(0, 2, 3, 1)
    if torch.jit.is_tracing() or min(h, w) < 2 * p:
        return F.conv2d(F.pad(x, (p,) * 4, mode='reflect'), weight, bias, groups=groups).permute(0, 2, 3, 1)
    out = F.conv2d(x, weight, bias, padding=p, groups=groups)
    out[:, :, :p] = F.conv2d(F.pad(x[:, :, :2 * p], (p, p, p, 0), mode='reflect'), weight, bias, groups=groups)
    out[:, :, -p:] = F.conv2d(F.pad(x[:, :, -2 * p:], (p, p, 0, p), mode='reflect'), weight, bias, groups=groups)
    out[..., :p] = F.conv2d(F.pad(x[..., :2 * p], (p, 0, p, p), mode='reflect'), weight, bias, groups=groups)
    out[..., -p:] = F.conv2d(F.pad(x[..., -2 * p:], (0, p, p, p), mode='reflect'), weight, bias, groups=groups)
    return out.permute(0, 2, 3, 1)


def depthwise_reflect(x: torch.Tensor, conv: nn.Conv2d, top: int, bottom: int) -> torch.Tensor:
    """Reflect-padded depthwise ``conv`` of the rows of a channels-last (B, N, W, C) map that have their halo.

    ``x`` holds the output rows plus ``k // 2`` halo rows above and below them, except ``top``/``bottom`` rows
    beyond the map's border, which are reflected here. At CPU inference the compiled kernel reads the halo in
    place; otherwise the band is reflect padded and convolved.
    """
    p = conv.kernel_size[0] // 2
    if kernels.applies(x, conv.weight, conv.bias):
        return kernels.depthwise_reflect(x, conv.weight, conv.bias, p - top, x.shape[1] - 2 * p + top + bottom)
    x = _reflect_pad(x, top, bottom, p)
    return F.conv2d(x.permute(0, 3, 1, 2), conv.weight, conv.bias, groups=conv.groups).permute(0, 2, 3, 1)


def _halo_windows(x: torch.Tensor, block: int, halo: int) -> torch.Tensor:
    """Windows of ``block + 2 halo`` with stride ``block`` of a padded (B, H + 2 halo, W + 2 halo, C) map.

    Returns (B, H / block, block + 2 halo, W / block, block + 2 halo, C): each block with the ``halo`` rows
    above and below it (then the same for columns), gathered by slicing and concatenating three strided
    views rather than by ``unfold``, whose ONNX export needs static sizes.
    """

    def along(t: torch.Tensor, dim: int) -> torch.Tensor:
        n = (t.shape[dim] - 2 * halo) // block

        def blocks(start: int) -> torch.Tensor:
            part = t.narrow(dim, start, n * block)
            return part.reshape(*part.shape[:dim], n, block, *part.shape[dim + 1:])

        parts = [blocks(0).narrow(dim + 1, 0, halo), blocks(halo), blocks(2 * halo).narrow(dim + 1, block - halo, halo)]
        return torch.cat(parts, dim=dim + 1)

    return along(along(x, 1), 3)


def _matrix(conv: nn.Conv2d) -> torch.Tensor:
    """Weight of a 1x1 convolution as a ``(C_out, C_in)`` matrix."""
    return conv.weight.flatten(1)


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad the bottom/right of an NCHW tensor to a multiple of ``multiple`` by mirror reflection.

    This is the whole-sample symmetric periodic extension: where one reflection suffices (pad < side) it
    equals ``F.pad(mode='reflect')``, as the published network does; smaller sides, where the published
    network crashes, repeat the reflection, and a side of one pixel is replicated. It is an index gather
    computed from the sizes, so a traced (ONNX) graph pads every input size correctly.
    """
    h, w = x.shape[-2:]
    return x.index_select(-2, _mirror_index(h, multiple, x.device)).index_select(-1, _mirror_index(w, multiple,
                                                                                                   x.device))


def _mirror_index(n: int, multiple: int, device: torch.device) -> torch.Tensor:
    """Source index of each position of a side of ``n`` extended to a multiple of ``multiple`` (period 2n - 2)."""
    i = torch.arange(n + (-n) % multiple, device=device)
    period = 2 * n - 2 + (n == 1)  # 1 for a single pixel; a tensor expression of the size when traced
    i = i % period
    return torch.where(i < n, i, period - i)


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


def _rows(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of a (B, H, W, C) map, or the map itself when that is all of it.

    Returning the map itself keeps traced (ONNX) graphs free of slices with fixed bounds.
    """
    return x if start == 0 and stop == x.shape[1] else x[:, start:stop]


def _window(r0: int, r1: int, halo: int, height: int) -> tuple[int, int, int, int]:
    """Rows ``[lo, hi)`` of a map of ``height`` rows that band ``[r0, r1)`` needs with ``halo`` rows on each side.

    Also returns how many of those rows lie beyond the top and the bottom of the map (to be reflected).
    """
    lo, hi = max(r0 - halo, 0), min(r1 + halo, height)
    return lo, hi, lo - (r0 - halo), r1 + halo - hi


def _reflect_pad(x: torch.Tensor, top: int, bottom: int, side: int) -> torch.Tensor:
    """Reflect-pad a channels-last (B, H, W, C) band by ``top``/``bottom`` rows and ``side`` columns each side."""
    return F.pad(x.permute(0, 3, 1, 2), (side, side, top, bottom), mode='reflect').permute(0, 2, 3, 1)


def _bands(height: int, band_rows: int | None) -> list[tuple[int, int]]:
    """Row ranges ``[r0, r1)`` covering ``height`` rows, ``band_rows`` at a time (all at once if None)."""
    if band_rows is None or band_rows >= height:
        return [(0, height)]
    return [(r0, min(r0 + band_rows, height)) for r0 in range(0, height, band_rows)]


def _store(part: torch.Tensor, out: torch.Tensor | None, r0: int) -> torch.Tensor:
    """Write a band into rows ``r0:`` of ``out`` (a preallocated map), or return it if there is no ``out``."""
    if out is None:
        return part
    out[:, r0:r0 + part.shape[1]] = part
    return out


def _column_sums(t: torch.Tensor) -> torch.Tensor:
    """Sums over ``kx`` of tap maps (3 kx, 3 ky, B, C, h, r, W) shifted by their column tap, reflected at the sides.

    Returns (3 ky, B, C, h r, W). ``t`` may be any strided view (such as the unshuffled maps of
    :meth:`SSIU._tap_maps`): reading it is its only copy.
    """
    u = t.new_empty(t.shape[1:])
    torch.add(t[1][..., 1:], t[0][..., :-1], out=u[..., 1:])
    torch.add(t[1][..., 0], t[0][..., 1], out=u[..., 0])
    u[..., :-1] += t[2][..., 1:]
    u[..., -1] += t[2][..., -2]
    return u.flatten(-3, -2)


def _shifted_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of the tap maps (k kx, k ky, B, C, h, r, W) shifted by their tap, reflect padded: (B, C, h r, W)."""
    k, c = t.shape[0], t.shape[3]
    p = k // 2
    padded = F.pad(t.flatten(-3, -2).flatten(0, 3), (p,) * 4, mode='reflect').unflatten(0, (k, k, -1))
    out = sum(padded[kx, ky, :, ky:ky - 2 * p or None, kx:kx - 2 * p or None] for kx in range(k) for ky in range(k))
    return out.unflatten(0, (-1, c))


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of a channels-last (B, H, W, C) map (the ``WithBias`` norm of the reference)."""

    def __init__(self, num_feat: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.body = nn.LayerNorm(num_feat, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class MSGM(nn.Module):
    """Mixed-Scale Gating Module: ``out = W_o(GELU(W_1 x) * W_3 DW_k(W_2 x))``, (B, H, W, C) -> (B, H, W, C).

    The GELU branch sees one pixel, the gated branch a ``kernel_size`` neighbourhood (reflect padded).
    """

    def __init__(self, num_feat: int, expansion: float = 1.0, kernel_size: int = 3, ratio: float = 1.0) -> None:
        super().__init__()
        hidden, mid = int(num_feat * expansion), int(num_feat * ratio)
        self.halo = kernel_size // 2
        self.project_in1 = nn.Conv2d(num_feat, hidden, 1)
        self.project_in2 = nn.Sequential(
            nn.Conv2d(num_feat, mid, 1),
            nn.Conv2d(mid, mid, kernel_size, padding=kernel_size // 2, groups=mid, padding_mode='reflect'),
            nn.Conv2d(mid, hidden, 1),
        )
        self.project_out = nn.Conv2d(hidden, num_feat, 1)

    def gated(self, x: torch.Tensor, top: int, bottom: int, shift: torch.Tensor | None = None) -> torch.Tensor:
        """``GELU(W_1 x') * W_3 DW_k(W_2 x')`` for ``x' = x + shift``: the module before ``project_out``.

        ``x`` holds the rows of a band plus ``halo`` rows above and below it, except ``top``/``bottom`` rows
        beyond the map's border, which are reflected here; the result has the band's rows. ``shift`` (C,)
        is a per-channel offset of the input, folded into the input projection biases.
        """
        reduce, depthwise, expand = self.project_in2
        gate_weight, gate_bias = _matrix(self.project_in1), self.project_in1.bias
        value_weight, value_bias = _matrix(reduce), reduce.bias
        if shift is not None:
            gate_bias, value_bias = gate_bias + gate_weight @ shift, value_bias + value_weight @ shift
        p = self.halo
        gate = linear_nhwc(_rows(x, p - top, x.shape[1] - p + bottom), gate_weight, gate_bias, gelu=True)
        value = depthwise_reflect(linear_nhwc(x, value_weight, value_bias), depthwise, top, bottom)
        return linear_nhwc(value, _matrix(expand), expand.bias, mul=gate)

    def fuses(self, x: torch.Tensor, *others: torch.Tensor | None) -> bool:
        """Whether :meth:`project` runs the compiled kernel on the band ``x``: CPU inference (no gradient to any of
        these tensors or the module's parameters), widths multiples of 16."""
        widths = (x.shape[-1], self.project_in1.out_channels, self.project_in2[0].out_channels,
                  self.project_out.out_channels)
        return (kernels.applies(x, *others, *self.parameters()) and all(n % 16 == 0 for n in widths)
                and self.halo <= 3 and min(x.shape[1], x.shape[2]) > self.halo)

    def project(
        self,
        x: torch.Tensor,
        top: int,
        bottom: int,
        shift: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        add: torch.Tensor | None = None,
        residual: bool = False,
        accumulate: bool = False,
        norm: nn.LayerNorm | None = None,
    ) -> torch.Tensor:
        """``W_o gated(x' + shift) + bias`` plus ``add`` and, with ``residual``, plus ``x'``, on the band's rows.

        ``x' = norm(x)`` (``x`` if no ``norm``); ``x``, ``top``, ``bottom`` and ``shift`` are as in :meth:`gated`;
        ``bias`` replaces ``project_out``'s own (None: no bias). At CPU inference one compiled kernel computes it
        in cache-sized tiles (see :meth:`fuses`). Otherwise, with ``accumulate``, the sum may be written into
        ``add`` or, with ``residual``, into ``x'``.
        """
        reduce, depthwise, expand = self.project_in2
        p = self.halo
        rows = x.shape[1] - 2 * p + top + bottom
        if self.fuses(x, add, *(() if norm is None else norm.parameters())):
            gate_bias, value_bias = self.project_in1.bias, reduce.bias
            if shift is not None:
                gate_bias = gate_bias + _matrix(self.project_in1) @ shift
                value_bias = value_bias + _matrix(reduce) @ shift
            return kernels.msgm(x, _matrix(self.project_in1), gate_bias, _matrix(reduce), value_bias, depthwise.weight,
                                depthwise.bias, _matrix(expand), expand.bias, _matrix(self.project_out), bias, add,
                                residual, p - top, rows, MSGM_TILE_PIXELS, norm=norm)
        if norm is not None:
            x = norm(x)
        gated = self.gated(x, top, bottom, shift)
        if residual:
            inner = _rows(x, p - top, p - top + rows)
            add = inner if add is None else (_add_(inner, add) if accumulate else torch.add(inner, add))
        return linear_nhwc(gated, _matrix(self.project_out), bias, add=add, accumulate=accumulate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The module on a whole map (B, H, W, C), reflect padded at every border."""
        p = self.halo
        return self.project(x, p, p, bias=self.project_out.bias)


class ESAM(nn.Module):
    """Efficient Sparse Attention Module: halo block attention at reduced resolution.

    (B, H, W, C) -> (B, H, W, C), with H and W multiples of ``block_size * downsample``. Features are
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
        """Positional embedding added to every key window: (window, window, head_dim)."""
        window = self.rel_h.shape[1]
        rows = self.rel_h[0].expand(-1, window, -1)
        cols = self.rel_w[0].expand(window, -1, -1)
        return torch.cat([rows, cols], dim=-1)

    def forward(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        """ESAM of ``x + shift`` at full resolution."""
        height = x.shape[1]
        return self.upsample_rows(self.attend(x, shift), 0, height, height)

    def attend(self, x: torch.Tensor, shift: torch.Tensor | None = None) -> torch.Tensor:
        """ESAM of ``x + shift`` before upsampling: (B, H / downsample, W / downsample, C).

        ``shift`` (C,) commutes with max-pooling and is folded into the qkv projection.
        """
        if self.downsample > 1:
            x = F.max_pool2d(x.permute(0, 3, 1, 2), 2, self.downsample).permute(0, 2, 3, 1)
        b, h, w, c = x.shape
        bs, halo, heads = self.block_size, self.halo, self.num_heads
        if not torch.jit.is_tracing() and (h % bs or w % bs):
            raise ValueError(f'ESAM input {h}x{w} (after pooling) is not a multiple of block_size {bs}')
        qkv_weight = _matrix(self.qkv_conv)
        qkv = linear_nhwc(x, qkv_weight, None if shift is None else qkv_weight @ shift)
        if kernels.applies(qkv, self.rel_h, self.rel_w):
            out = kernels.halo_attention(qkv, self.key_embedding(), heads, bs, halo)
        else:
            out = self._attention(qkv)
        if self.downsample > 1:
            depthwise = self.LocalProp[0]
            out = depthwise_reflect(out, depthwise, depthwise.padding[0], depthwise.padding[0])
        return out

    def _attention(self, qkv: torch.Tensor) -> torch.Tensor:
        """Halo block attention on the qkv map (B, h, w, 3 C) with standard operators: (B, h, w, C)."""
        b, h, w, c3 = qkv.shape
        c, bs, halo, heads = c3 // 3, self.block_size, self.halo, self.num_heads
        nh, nw, head_dim, window = h // bs, w // bs, c // heads, bs + 2 * halo
        # Queries: (B * blocks, heads, bs², head_dim).
        q = qkv[..., :c].reshape(b, nh, bs, nw, bs, heads, head_dim).permute(0, 1, 3, 5, 2, 4, 6)
        q = q.reshape(b * nh * nw, heads, bs * bs, head_dim)
        # Keys and values: overlapping (bs + 2 halo)² windows with stride bs over the zero-padded map,
        # (2, B, nh, nw, heads, window, window, head_dim).
        kv = F.pad(qkv[..., c:], (0, 0, halo, halo, halo, halo))
        if torch.jit.is_tracing():
            kv = _halo_windows(kv, bs, halo).reshape(b, nh, window, nw, window, 2, heads, head_dim)
            kv = kv.permute(5, 0, 1, 3, 6, 2, 4, 7)
        else:  # a strided view of the padded map, read once by the copies below
            s_b, s_h, s_w, _ = kv.stride()
            kv = kv.as_strided((2, b, nh, nw, heads, window, window, head_dim),
                               (c, s_b, bs * s_h, bs * s_w, head_dim, s_h, s_w, 1), kv.storage_offset())
        k = torch.add(kv[0], self.key_embedding()).reshape(b * nh * nw, heads, window * window, head_dim)
        v = kv[1].reshape(b * nh * nw, heads, window * window, head_dim)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.view(b, nh, nw, heads, bs, bs, head_dim).permute(0, 1, 4, 2, 5, 3, 6)
        return out.clone(memory_format=torch.contiguous_format).view(b, h, w, c)  # a new tensor in every case

    def combine(self, low: torch.Tensor, v: torch.Tensor, b: torch.Tensor, r0: int, height: int) -> torch.Tensor:
        """Rows ``r0:r0 + N`` of ``ESAM + v - b``, ``low`` the output of :meth:`attend` and ``v``, ``b`` (B, N, W, C)
        those rows of full-size maps: the SSRM update that consumes ESAM, in one pass at CPU inference."""
        if self.downsample > 1 and kernels.applies(low, v, b):
            return kernels.upsample_combine(low, v, b, r0, height)
        return torch.add(self.upsample_rows(low, r0, r0 + v.shape[1], height), v).sub_(b)

    def upsample_rows(self, low: torch.Tensor, r0: int, r1: int, height: int) -> torch.Tensor:
        """Rows ``[r0, r1)`` of the ESAM output (``height`` rows) from ``low``, the output of :meth:`attend`.

        The whole map is upsampled by ``nn.Upsample`` (bilinear, corners aligned) as in the published module.
        A band of rows is interpolated vertically at the positions the whole map uses (computed in float32 as
        PyTorch does), then horizontally by a same-height resize, whose vertical weights are exactly zero.
        """
        if self.downsample == 1:
            return _rows(low, r0, r1)
        upsample = self.LocalProp[1]
        if r0 == 0 and r1 == height:
            return upsample(low.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        h, w = low.shape[1:3]
        scale = torch.tensor(h - 1, dtype=torch.float32) / (height - 1)
        pos = torch.arange(r0, r1, dtype=torch.float32) * scale
        top = pos.long()
        weight = (pos - top).to(low)[:, None, None]
        top, bottom = top.to(low.device), (top + 1).clamp_(max=h - 1).to(low.device)
        rows = torch.lerp(low.index_select(1, top), low.index_select(1, bottom), weight)
        out = F.interpolate(rows.permute(0, 3, 1, 2), size=(r1 - r0, w * self.downsample), mode='bilinear',
                            align_corners=True)
        return out.permute(0, 2, 3, 1)


class SSRMStep(nn.Module):
    """One unfolding step (SSRM) of the structural-similarity objective, (B, H, W, C) -> (B, H, W, C).

    With ``a`` the current estimate and ``y`` the head (observation) features::

        a' = LN(a); z = MSGM_1(a'); b = MSGM_2(a')      # structure / luminance terms
        v = a' + z + y; v = v + ESAM(v)                  # data-consistent update, sparse long-range
        a = MSGM_4(v - b) + b; a = a + MSGM_ffn(a)       # proximal refinement

    Every sum is taken inside a 1x1 projection, and the output biases of MSGM_1 and MSGM_2 are carried to
    where they meet a linear map (ESAM's qkv projection, MSGM_4's input projections) instead of being added
    to full-size maps. Everything but ESAM's attention can run on bands of rows (with the halo rows their
    depthwise convolutions need), which keeps the intermediate maps of a band in the CPU cache.
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

    def forward(
        self,
        a: torch.Tensor,
        y: torch.Tensor,
        band_rows: int | None = None,
        out: torch.Tensor | None = None,
        scratch: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The next estimate from estimate ``a`` and head features ``y``.

        With ``band_rows`` (inference, batch of one), bands of that many rows are written into ``out`` (which
        may be ``a`` itself) through the two maps of ``scratch``; otherwise new tensors are returned.
        """
        height, p = a.shape[1], self.s1.halo
        bands = _bands(height, band_rows)
        out1, out2, out4, outf = self.s1.project_out, self.s2.project_out, self.s4.project_out, self.ffn.project_out
        v_map, b_map = scratch if scratch is not None else (None, None)
        for r0, r1 in bands:
            lo, hi, top, bottom = _window(r0, r1, p, height)
            x, norm = _rows(a, lo, hi), self.norm.body  # the compiled MSGM normalizes in its tiles
            if not (self.s1.fuses(x, *self.norm.parameters()) and self.s2.fuses(x)):
                x, norm = self.norm(x), None
            b = _store(self.s2.project(x, top, bottom, norm=norm), b_map, r0)  # b - out2.bias
            v = self.s1.project(x, top, bottom, add=_rows(y, r0, r1), residual=True, accumulate=True, norm=norm)
            v = _store(v, v_map, r0)  # v - out1.bias
        low = self.s3.attend(v, shift=out1.bias)
        shift4, bias4 = out1.bias - out2.bias, out4.bias + out2.bias
        for r0, r1 in bands:
            lo, hi, top, bottom = _window(r0, r1, p, height)  # rows of MSGM_4(v - b) + b for MSGM_ffn
            u_lo, u_hi, u_top, u_bottom = _window(lo, hi, p, height)
            # ESAM + v - b - out1.bias + out2.bias
            u = self.s3.combine(low, _rows(v, u_lo, u_hi), _rows(b, u_lo, u_hi), u_lo, height)
            refined = self.s4.project(u, u_top, u_bottom, shift=shift4, bias=bias4, add=_rows(b, lo, hi),
                                      accumulate=len(bands) == 1)
            a_next = self.ffn.project(refined, top, bottom, bias=outf.bias, residual=True, accumulate=True)
            result = _store(a_next, out, r0)
        return result


class MoEFeatureSelector(nn.Module):
    """MoE-FS: per-pixel, per-channel softmax gate over three step estimates, then a residual 1x1 fuse.

    Three (B, H, W, C) experts -> (B, H, W, C) output and (B, H, W, 3, C) gate probabilities.
    """

    def __init__(self, num_feat: int) -> None:
        super().__init__()
        self.fc_a = nn.Conv2d(num_feat, num_feat, 1)
        self.fc_b = nn.Conv2d(num_feat, num_feat, 1)
        self.fc_c = nn.Conv2d(num_feat, num_feat, 1)
        self.fuse = nn.Conv2d(num_feat, num_feat, 1)

    def forward(
        self, experts: list[torch.Tensor], residual: torch.Tensor | None = None, with_gates: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``fuse(out) + out`` (plus ``residual`` if given) for the gated sum ``out``, and the gates (None unless
        ``with_gates``)."""
        fcs = (self.fc_a, self.fc_b, self.fc_c)
        logits = [linear_nhwc(e, _matrix(fc), fc.bias) for fc, e in zip(fcs, experts)]
        if kernels.applies(*logits, *experts, residual):
            out, skip, gates = kernels.moe_combine(logits, experts, residual, with_gates)
        else:
            gates = torch.stack(logits, dim=-2).softmax(dim=-2)
            out = gates[..., 0, :] * experts[0]
            for i in (1, 2):
                out = out.addcmul(gates[..., i, :], experts[i])
            skip = out.clone() if residual is None else out + residual
        fused = linear_nhwc(out, _matrix(self.fuse), self.fuse.bias, add=skip, accumulate=True)
        return fused, gates if with_gates else None


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
        self.band_bytes, self.whole_map_bytes = BAND_BYTES, WHOLE_MAP_BYTES
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

    def _tap_maps(self, feat: torch.Tensor) -> torch.Tensor:
        """Products of the final 3x3 convolution's taps with the upsampled features (B, h, w, C).

        Returns a strided view (3 kx, 3 ky, B, C_out, h', r, sw) of planar maps, ``h' r = sh`` (``r`` the last
        stage's factor): ``[kx, ky, :, o]`` is the HR feature map times ``weight[o, :, ky, kx]``, a 1x1 product;
        the convolution is the bias plus the sum of the nine maps shifted by their tap. The stages run on the
        unshuffled map (1x1 products and GELUs commute with pixel shuffle): all but the last are shuffled as
        whole C-vectors, the last is never shuffled, only its 27-channel tap products are, by the view. Its
        sub-pixel channels are ordered (j, i), so that an HR row of that view is a run with stride ``r``.
        """
        *stages, last = self.tail
        b, h, w, c = feat.shape
        r = 1
        for index, (conv, shuffle) in enumerate(zip(stages[0::3], stages[1::3])):
            if index:  # shuffle the previous stage: (B, h, w, j, i, C) -> (B, h i, w j, C)
                feat = feat.reshape(b, h, w, r, r, c).permute(0, 1, 4, 2, 3, 5).reshape(b, h * r, w * r, c)
                h, w = h * r, w * r
            r = shuffle.upscale_factor
            weight = conv.weight.view(-1, r, r, c).permute(2, 1, 0, 3).reshape(conv.out_channels, c)
            bias = conv.bias.view(-1, r, r).permute(2, 1, 0).reshape(-1)
            feat = linear_nhwc(feat, weight, bias, gelu=True)
            c = conv.out_channels // (r * r)
        k, o = last.kernel_size[0], last.out_channels
        taps = last.weight.permute(3, 2, 0, 1).reshape(k * k * o, c)  # rows (kx, ky, o)
        t = torch.mm(taps, feat.reshape(-1, c).T)  # (k k o, B h w r r), pixels (b, y, x, j, i)
        return t.view(k, k, o, b, h, w, r, r).permute(0, 1, 3, 2, 4, 7, 5, 6).flatten(-2)

    def reconstruct(self, feat: torch.Tensor) -> torch.Tensor:
        """The tail on channels-last features (B, H, W, C) -> (B, num_out_ch, sH, sW).

        The reflect-padded 3x3 convolution is the bias plus the sum of its shifted tap products
        (:meth:`_tap_maps`): a 64 -> 27 matrix product instead of a direct convolution, and no HR feature map
        is ever copied. At inference, maps whose HR output exceeds ``TAIL_BAND_PIXELS`` pixels run in bands of
        LR rows, so that no full-size HR feature map is allocated: a band adds its taps that reach the row above
        it to the previous band's output and carries those that reach the row below it to the next band.
        Autograd and tracing (ONNX export) reflect-pad and sum the taps of the whole map.
        """
        b, h, w, _ = feat.shape
        s, bias = self.upscale, self.tail[-1].bias
        grad = torch.is_grad_enabled() and (feat.requires_grad or any(p.requires_grad for p in self.tail.parameters()))
        if grad or torch.jit.is_tracing():
            return _shifted_sum(self._tap_maps(feat)) + bias[:, None, None]
        band_rows = max(2, TAIL_BAND_PIXELS // (w * s * s))
        starts = list(range(0, h, band_rows))
        if len(starts) > 1 and (h - starts[-1]) * s < 2:  # the last HR row needs the one above it in its band
            starts.pop()
        out = feat.new_empty(b, self.tail[-1].out_channels, h * s, w * s)
        above = None  # taps of the row above the band that reach into it (summed over kx)
        for r0, r1 in zip(starts, starts[1:] + [h]):
            u = _column_sums(self._tap_maps(feat[:, r0:r1].contiguous()))
            u[1] += bias[:, None, None]
            rows = out[:, :, r0 * s:r1 * s]
            torch.add(u[1][:, :, 1:], u[0][:, :, :-1], out=rows[:, :, 1:])
            torch.add(u[1][:, :, 0], u[0][:, :, 1] if above is None else above, out=rows[:, :, 0])
            rows[:, :, :-1] += u[2][:, :, 1:]
            if r0:
                out[:, :, r0 * s - 1] += u[2][:, :, 0]
            above = u[0][:, :, -1]
        out[:, :, -1] += u[2][:, :, -2]
        return out

    def band_rows(self, x: torch.Tensor) -> int | None:
        """Rows per band of the unfolding steps for the padded LR input ``x``, or None to process whole maps.

        Bands of ``band_bytes`` apply to CPU inference on feature maps larger than ``whole_map_bytes``, or four
        times that where freed memory stays with the process (module attributes, default ``BAND_BYTES`` and
        ``WHOLE_MAP_BYTES``). The result is the same and the allocations stay small; training (autograd),
        tracing, compiling and GPUs use whole maps.
        """
        map_bytes = x.shape[-2] * x.shape[-1] * self.head.out_channels * x.element_size()
        limit = self.whole_map_bytes * (4 if freed_memory_retained() else 1)
        if (x.device.type != 'cpu' or not self.band_bytes or map_bytes <= limit
                or torch.jit.is_tracing() or torch.compiler.is_compiling()
                or (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())))):
            return None
        return max(1, self.band_bytes * x.shape[-2] // map_bytes)

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        """Super-resolve ``x``.

        With ``return_aux`` also returns a dict with ``gates``, the MoE-FS gate probabilities
        (B, 3, num_feat, H, W), and ``step_outputs``, one SR image per expert step: the tail applied to
        that step's estimate plus the head features, plus the bilinear skip (what the MoE-FS output
        would be if the gate chose that step alone, fuse aside).
        """
        h, w = x.shape[-2:]
        images = x
        x = pad_to_multiple(x, self.pad_multiple)
        band_rows = self.band_rows(x)
        if band_rows is not None and x.shape[0] > 1:  # bands are taken from one image at a time
            results = [self(image, return_aux) for image in images.split(1)]
            if not return_aux:
                return torch.cat(results)
            outs, auxes = zip(*results)
            steps = [torch.cat(step) for step in zip(*(aux['step_outputs'] for aux in auxes))]
            return torch.cat(outs), {'gates': torch.cat([aux['gates'] for aux in auxes]), 'step_outputs': steps}
        y = conv2d_reflect(x.permute(0, 2, 3, 1).contiguous(), self.head.weight, self.head.bias)
        scratch = (torch.empty_like(y), torch.empty_like(y)) if band_rows is not None else None
        estimates = {0: y}
        a = y
        for step, block in enumerate(self.body, start=1):
            out = None
            if scratch is not None:  # write over the previous estimate unless it is kept
                out = a if a is not y and step - 1 not in self.expert_steps else torch.empty_like(y)
            a = block(a, y, band_rows, out=out, scratch=scratch)
            if step in self.expert_steps:
                estimates[step] = a
        experts = [estimates[s] for s in self.expert_steps]
        fused = scratch[0] if scratch is not None else None
        gates = []
        for r0, r1 in _bands(y.shape[1], band_rows):
            part, gate = self.moe([_rows(e, r0, r1) for e in experts], _rows(y, r0, r1), with_gates=return_aux)
            fused = _store(part, fused, r0)
            gates.append(gate)
        skip = F.interpolate(x, scale_factor=self.upscale, mode='bilinear', align_corners=False)
        s = self.upscale
        out = (skip + self.reconstruct(fused))[..., :h * s, :w * s]
        if not return_aux:
            return out
        gates = torch.cat(gates, dim=1) if len(gates) > 1 else gates[0]
        steps = [(skip + self.reconstruct(e + y))[..., :h * s, :w * s] for e in experts]
        return out, {'gates': gates.permute(0, 3, 4, 1, 2)[..., :h, :w], 'step_outputs': steps}
