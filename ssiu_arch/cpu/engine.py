"""CPU engine for SSIU: the reference network's function, computed fast from an instance's parameters.

:class:`ssiu_arch.archs.ssiu_arch.SSIU` is the plain reference network. On the CPU in float32 it hands its
forward pass to :data:`ENGINE` when :meth:`Engine.accepts` says so. Where autograd needs gradients the engine
runs :func:`ssiu_arch.cpu.training.forward`: the network's modules, with ESAM's attention, MSGM's gate, the
depthwise convolutions and some residual sums as kernels with their own backward formulas. At inference it
computes the same function from the network's parameters:

- every feature map is channels-last ``(B, H, W, C)``: the network is mostly 1x1 convolutions of 64 channels,
  whose cost on CPU is memory traffic;
- each MSGM is one compiled kernel (:mod:`ssiu_arch.cpu.kernels`) that works in L2-sized row tiles, with the
  step's LayerNorm computed in its tiles; ESAM's attention, its depthwise convolution and upsampling, and the
  MoE-FS gating are compiled kernels too; the remaining 1x1 convolutions go through oneDNN with fused epilogues;
- per-channel biases are moved across linear maps: the output biases of MSGM_1 and MSGM_2 are carried to where
  they meet a linear map (ESAM's qkv projection, MSGM_4's input projections) instead of being added to maps;
- on large maps the unfolding steps run in bands of rows with the halo rows of their depthwise convolutions,
  which keeps allocations small (:attr:`Engine.band_bytes`, :attr:`Engine.whole_map_bytes`, and malloc awareness
  from :mod:`ssiu_arch.cpu.memory`);
- the tail always runs in bands, so no full-size HR feature map exists, and its final 3x3 convolution is one
  matrix product for its 9 taps x outputs, whose maps are shifted and summed.

Under ``torch.autocast('cpu', dtype=torch.bfloat16)``, on a CPU with AVX512_BF16, the engine computes the network
with bfloat16 operands in every matrix product (the MSGM kernels' four products, ESAM's qkv projection and its
attention's scores and weighted sums, MoE-FS's 1x1 convolutions, the tail's stages and tap product), from weights
rounded on each call and activations rounded tile by tile, with float32 accumulators. Everything else stays
float32: LayerNorm statistics, GELU, the softmaxes, the depthwise convolutions, every map carried between steps
and every residual sum, the head and the final image; input and output are float32. A GELU whose output only
bfloat16 products read (MSGM's gate, the tail's stages) is interpolated from a table, within 2e-5 of the exact
one: a hundredth of the rounding it meets.
"""
from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as nn_module
from torch.utils._python_dispatch import _len_torch_dispatch_stack

from ssiu_arch.archs.ssiu_arch import (
    ESAM,
    MSGM,
    SSIU,
    ChannelLayerNorm,
    MoEFeatureSelector,
    SSRMStep,
    pad_to_multiple,
)
from ssiu_arch.cpu import kernels, training
from ssiu_arch.cpu.memory import freed_memory_retained
from ssiu_arch.utils.cpu_features import fastest_times

__all__ = ['ENGINE', 'Engine']

try:  # oneDNN convolutions with fused epilogues (the CPU kernels torch.compile emits)
    _ONEDNN_CONV = torch.ops.mkldnn._convolution_pointwise
    _ONEDNN_CONV_ADD_ = torch.ops.mkldnn._convolution_pointwise_.binary
except (AttributeError, RuntimeError):
    _ONEDNN_CONV = _ONEDNN_CONV_ADD_ = None
_POINTWISE = ([0, 0], [1, 1], [1, 1], 1)  # padding, stride, dilation, groups of a 1x1 convolution
# Feature maps above glibc malloc's largest mmap threshold (32 MiB) get fresh, zero-filled pages on every
# allocation. The engine therefore runs the unfolding steps in 8 MiB row bands on maps above 32 MiB, or above
# four times that where freed memory stays with the process (``ssiu_arch.cpu.memory``): below, whole maps measured
# faster. A band size of 0 processes whole maps.
WHOLE_MAP_BYTES = 32 << 20
BAND_BYTES = 8 << 20
# HR pixels per band of the tail (its 64-channel features are 8 MiB, its 27 tap maps 3.4 MiB): small enough to
# stay in cache and for the allocator to reuse.
TAIL_BAND_PIXELS = 1 << 15
# Pixels per tile of the fused MSGM kernel: its five tile buffers (1.5 MiB at 64 channels) stay in a 2 MiB L2.
MSGM_TILE_PIXELS = 1536
# Depthwise kernel sizes the compiled kernels implement.
KERNEL_SIZES = (1, 3, 5, 7)
# SHA-256 of the network file the engine was written for and checked against (LF line endings). Any change to
# that file makes the engine stand aside until its tests pass again against the changed network and this
# digest is updated: a modified network never runs the old fused math.
NETWORK_DIGEST = 'a1aa69f4f460d28bb394bd98d2a7cf1b979a22f5a56efe4436b1cb57f9d990e3'
# Exactly the module classes the engine knows; a subclass of any of them is a network it was not written for.
_PARTS = (SSIU, SSRMStep, ChannelLayerNorm, MSGM, ESAM, MoEFeatureSelector, nn.LayerNorm, nn.Conv2d,
          nn.Sequential, nn.ModuleList, nn.PixelShuffle, nn.GELU, nn.Upsample, nn.MaxPool2d, nn.Identity)


def network_digest() -> str | None:
    """SHA-256 of the network file that defines :class:`SSIU` (LF line endings), None if it cannot be read."""
    try:
        text = Path(sys.modules[SSIU.__module__].__file__).read_bytes()
    except (OSError, AttributeError, TypeError):
        return None
    return hashlib.sha256(text.replace(b'\r\n', b'\n')).hexdigest()


_NETWORK_KNOWN = network_digest() == NETWORK_DIGEST


@functools.cache
def bf16_speedup() -> float | None:
    """float32 time / bfloat16 time of the fused MSGM kernel, which holds most of the engine's products, on a
    64-channel 96x96 map at the current thread count: the fastest of interleaved repeats, measured once per process
    (~40 ms). None where the bfloat16 kernels cannot run (:func:`~ssiu_arch.cpu.kernels.bf16_available`).

    The engine's bfloat16 products are its kernels' own AVX512_BF16 ``vdpbf16ps``, so oneDNN's bfloat16 rate
    (:func:`~ssiu_arch.utils.cpu_features.bf16_product_speedup`) does not decide whether its bfloat16 path pays: with
    AMX (Intel Sapphire Rapids and later), oneDNN multiplies bfloat16 several times faster than float32, while
    ``vdpbf16ps`` issues at half the rate of those CPUs' two FMA ports."""
    if not kernels.bf16_available():
        return None
    generator = torch.Generator().manual_seed(0)  # the caller's random stream stays untouched
    c, side = 64, 96
    x = torch.randn(1, side, side, c, generator=generator)
    w = [torch.randn(c, c, generator=generator) * c ** -0.5 for _ in range(4)]
    depthwise = torch.randn(c, 1, 3, 3, generator=generator) / 3
    zero = torch.zeros(c)

    def run(bf16: bool) -> torch.Tensor:
        return kernels.msgm(x, w[0], zero, w[1], zero, depthwise, zero, w[2], zero, w[3], zero, None, False, 0, side,
                            MSGM_TILE_PIXELS, bf16=bf16)

    best = fastest_times({'fp32': lambda: run(False), 'bf16': lambda: run(True)})
    return best['fp32'] / best['bf16']


class Engine:
    """The CPU engine. Its settings (of the inference path) are attributes, which tests and benchmarks may change:

    - ``band_bytes``: bytes of feature map per row band of the unfolding steps (0: always whole maps);
    - ``whole_map_bytes``: maps up to this size (four times it where freed memory stays with the process)
      are processed whole;
    - ``tail_band_pixels``: HR pixels per band of the tail;
    - ``msgm_tile_pixels``: pixels per cache tile of the fused MSGM kernel.
    """

    def __init__(self) -> None:
        self.band_bytes = BAND_BYTES
        self.whole_map_bytes = WHOLE_MAP_BYTES
        self.tail_band_pixels = TAIL_BAND_PIXELS
        self.msgm_tile_pixels = MSGM_TILE_PIXELS

    def accepts(self, net: nn.Module, x: torch.Tensor) -> bool:
        """Whether the engine computes ``net(x)``: the one decision between the engine and the reference forward.

        True only when all of these hold:

        - ``x`` and every parameter are float32 CPU tensors;
        - where a gradient is needed (autograd is on and ``x`` or a parameter requires one), CPU autocast is off and
          the training path's kernels cover the ESAM heads (:func:`ssiu_arch.cpu.training.supported`); the engine
          then runs :func:`ssiu_arch.cpu.training.forward`, the modules with some parts as kernels with their
          own backward formulas;
        - otherwise, CPU autocast is off, or it is bfloat16 autocast and the kernels' bfloat16 products can run
          (:func:`ssiu_arch.cpu.kernels.bf16_available`: a CPU with AVX512_BF16); the engine then computes in
          bfloat16 where that pays (see the module docstring);
        - nothing is tracing, scripting, compiling or exporting (``torch.jit``, ``torch.compile``,
          ``torch.export``, ONNX), and no ``TorchDispatchMode`` (such as ``FlopCounterMode``) is active;
        - the compiled kernels are loaded and oneDNN is enabled, ``SSIU_NO_KERNELS`` is unset (or 0) and
          ``net.use_engine`` is true;
        - no forward or backward hook (or pre-hook) is registered on the network, on any submodule, or globally;
        - the network is one the engine was written for: the network file is the one it was checked against
          (``NETWORK_DIGEST``), ``net`` and each of its parts are exactly the classes it knows (no subclass, no
          other module swapped in), and the hyper-parameters are ones its kernels support (widths multiples
          of 16, depthwise kernels of 1, 3, 5 or 7, a 3x3 final convolution, ...).

        Otherwise the reference forward runs, which GPUs, tracing, ``torch.compile`` and every outside tool see
        (under autocast, as autocast has it).
        """
        if not (x.device.type == 'cpu' and x.dtype == torch.float32 and x.dim() == 4):
            return False
        if (torch.jit.is_tracing() or torch.jit.is_scripting() or torch.compiler.is_compiling()
                or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export() or _len_torch_dispatch_stack()):
            return False
        bf16 = torch.is_autocast_enabled('cpu')
        if bf16 and torch.get_autocast_dtype('cpu') != torch.bfloat16:
            return False
        if (os.environ.get('SSIU_NO_KERNELS', '') not in ('', '0') or not net.use_engine or _ONEDNN_CONV is None
                or not torch.backends.mkldnn.is_available() or not torch.backends.mkldnn.enabled):
            return False
        if (nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks
                or nn_module._global_backward_hooks or nn_module._global_backward_pre_hooks):
            return False
        modules = [net]
        for m in modules:  # every module, appended as they are reached
            if (type(m) not in _PARTS or m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                    or m._backward_pre_hooks):
                return False
            for p in m._parameters.values():
                if p is not None and (p.dtype != torch.float32 or not p.is_cpu):
                    return False
            modules.extend(m._modules.values())
        if _needs_grad(net, x) and (bf16 or not training.supported(net)):
            return False
        # last: it may build the kernels
        return _NETWORK_KNOWN and _supported(net) and kernels.available() and (not bf16 or kernels.bf16_available())

    def band_rows(self, net: SSIU, x: torch.Tensor) -> int | None:
        """Rows per band of the unfolding steps for the padded LR input ``x``, or None to process whole maps.

        Bands of ``band_bytes`` apply to feature maps larger than ``whole_map_bytes``, or four times that where
        freed memory stays with the process. The result is the same and the allocations stay small.
        """
        map_bytes = x.shape[-2] * x.shape[-1] * net.head.out_channels * x.element_size()
        limit = self.whole_map_bytes * (4 if freed_memory_retained() else 1)
        if not self.band_bytes or map_bytes <= limit:
            return None
        return max(1, self.band_bytes * x.shape[-2] // map_bytes)

    def run(self, net: SSIU, x: torch.Tensor, return_aux: bool = False):
        """``net(x, return_aux)`` computed by the engine (call only where :meth:`accepts` is true).

        Under bfloat16 CPU autocast the matrix products take bfloat16 operands (see the module docstring); the
        engine's own float32 arithmetic runs with autocast off.
        """
        if _needs_grad(net, x):
            return training.forward(net, x, return_aux)
        bf16 = torch.is_autocast_enabled('cpu')
        with torch.autocast('cpu', enabled=False):
            return self._run(net, x, return_aux, bf16)

    def _run(self, net: SSIU, x: torch.Tensor, return_aux: bool, bf16: bool):
        """:meth:`run`, with bfloat16 operands in the matrix products if ``bf16``."""
        h, w = x.shape[-2:]
        padded = pad_to_multiple(x, net.pad_multiple)
        band_rows = self.band_rows(net, padded)
        if band_rows is None or padded.shape[0] == 1:
            return self._forward(net, padded, h, w, band_rows, return_aux, bf16)
        results = [self._forward(net, image, h, w, band_rows, return_aux, bf16) for image in padded.split(1)]
        if not return_aux:  # bands are taken from one image at a time
            return torch.cat(results)
        outs, auxes = zip(*results)
        steps = [torch.cat(step) for step in zip(*(aux['step_outputs'] for aux in auxes))]
        return torch.cat(outs), {'gates': torch.cat([aux['gates'] for aux in auxes]), 'step_outputs': steps}

    def _forward(self, net: SSIU, x: torch.Tensor, h: int, w: int, band_rows: int | None, return_aux: bool,
                 bf16: bool):
        """The network on the padded input ``x``, cropped to the ``h`` x ``w`` input's output."""
        y = _conv2d_reflect(x.permute(0, 2, 3, 1).contiguous(), net.head)
        scratch = (torch.empty_like(y), torch.empty_like(y)) if band_rows is not None else None
        estimates = {0: y}
        a = y
        for step, block in enumerate(net.body, start=1):
            out = None
            if scratch is not None:  # write over the previous estimate unless it is kept
                out = a if a is not y and step - 1 not in net.expert_steps else torch.empty_like(y)
            a = self._step(block, a, y, band_rows, out, scratch, bf16)
            if step in net.expert_steps:
                estimates[step] = a
        experts = [estimates[s] for s in net.expert_steps]
        fused = scratch[0] if scratch is not None else None
        gates = []
        for r0, r1 in _bands(y.shape[1], band_rows):
            part, gate = _moe(net.moe, [_rows(e, r0, r1) for e in experts], _rows(y, r0, r1), return_aux, bf16)
            fused = _store(part, fused, r0)
            gates.append(gate)
        s = net.upscale
        skip = F.interpolate(x, scale_factor=s, mode='bilinear', align_corners=False)
        out = (skip + self._reconstruct(net, fused, bf16))[..., :h * s, :w * s]
        if not return_aux:
            return out
        gates = torch.cat(gates, dim=1) if len(gates) > 1 else gates[0]
        steps = [(skip + self._reconstruct(net, e + y, bf16))[..., :h * s, :w * s] for e in experts]
        return out, {'gates': gates.permute(0, 3, 4, 1, 2)[..., :h, :w], 'step_outputs': steps}

    def _step(self, step: SSRMStep, a: torch.Tensor, y: torch.Tensor, band_rows: int | None,
              out: torch.Tensor | None, scratch: tuple[torch.Tensor, torch.Tensor] | None,
              bf16: bool) -> torch.Tensor:
        """One unfolding step: the next estimate from estimate ``a`` and head features ``y``.

        The step's update, with ``a' = LN(a)``::

            z = MSGM_1(a'); b = MSGM_2(a'); v = a' + z + y; v = v + ESAM(v)
            a = MSGM_4(v - b) + b; a = a + MSGM_ffn(a)

        is computed with the output biases of MSGM_1 and MSGM_2 left out of the maps ``v`` and ``b`` and added
        where they meet a linear map. With ``band_rows`` (batch of one), bands of that many rows are written
        into ``out`` (which may be ``a`` itself) through the two maps of ``scratch``; otherwise new tensors
        are returned. With ``bf16`` the matrix products take bfloat16 operands.
        """
        height, p = a.shape[1], _halo(step.s1)
        bands = _bands(height, band_rows)
        out1, out2, out4, outf = step.s1.project_out, step.s2.project_out, step.s4.project_out, step.ffn.project_out
        v_map, b_map = scratch if scratch is not None else (None, None)
        norm, tile = step.norm.body, (self.msgm_tile_pixels, bf16)
        for r0, r1 in bands:
            lo, hi, top, bottom = _window(r0, r1, p, height)
            x = _rows(a, lo, hi)
            b = _store(_msgm(step.s2, x, top, bottom, tile, norm=norm), b_map, r0)  # b - out2.bias
            v = _msgm(step.s1, x, top, bottom, tile, add=_rows(y, r0, r1), residual=True, norm=norm)
            v = _store(v, v_map, r0)  # v - out1.bias
        low = _attend(step.s3, v, out1.bias, bf16)
        shift4, bias4 = out1.bias - out2.bias, out4.bias + out2.bias
        for r0, r1 in bands:
            lo, hi, top, bottom = _window(r0, r1, p, height)  # rows of MSGM_4(v - b) + b for MSGM_ffn
            u_lo, u_hi, u_top, u_bottom = _window(lo, hi, p, height)
            # ESAM + v - b - out1.bias + out2.bias
            u = _combine(step.s3, low, _rows(v, u_lo, u_hi), _rows(b, u_lo, u_hi), u_lo, height)
            refined = _msgm(step.s4, u, u_top, u_bottom, tile, shift=shift4, bias=bias4, add=_rows(b, lo, hi))
            a_next = _msgm(step.ffn, refined, top, bottom, tile, bias=outf.bias, residual=True)
            result = _store(a_next, out, r0)
        return result

    def _reconstruct(self, net: SSIU, feat: torch.Tensor, bf16: bool) -> torch.Tensor:
        """The tail on channels-last features (B, H, W, C) -> (B, num_out_ch, sH, sW).

        The reflect-padded 3x3 convolution is the bias plus the sum of its shifted tap products
        (:func:`_tap_maps`): a 64 -> 27 matrix product instead of a direct convolution. Maps run in bands of LR
        rows (``tail_band_pixels`` HR pixels), so that no full-size HR feature map is allocated: a band adds its
        taps that reach the row above it to the previous band's output and carries those that reach the row
        below it to the next band.
        """
        b, h, w, _ = feat.shape
        last = net.tail[-1]
        s, bias = net.upscale, last.bias
        band_rows = max(2, self.tail_band_pixels // (w * s * s))
        starts = list(range(0, h, band_rows))
        if len(starts) > 1 and (h - starts[-1]) * s < 2:  # the last HR row needs the one above it in its band
            starts.pop()
        out = feat.new_empty(b, last.out_channels, h * s, w * s)
        above = None  # taps of the row above the band that reach into it (summed over kx)
        for r0, r1 in zip(starts, starts[1:] + [h]):
            u = _column_sums(_tap_maps(net.tail, feat[:, r0:r1].contiguous(), bf16))
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


ENGINE = Engine()


def _needs_grad(net: nn.Module, x: torch.Tensor) -> bool:
    """Whether autograd is on and the input or a parameter of ``net`` requires a gradient."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in net.parameters()))


def _is_conv(m: nn.Module, c_in: int, c_out: int, k: int = 1, groups: int = 1, bias: bool = True) -> bool:
    """Whether ``m`` is exactly an ``nn.Conv2d(c_in, c_out, k, groups=groups, bias=bias)`` with stride 1 and, for
    ``k`` > 1, reflect padding by ``k // 2``."""
    return (type(m) is nn.Conv2d and m.in_channels == c_in and m.out_channels == c_out and m.kernel_size == (k, k)
            and m.stride == (1, 1) and m.dilation == (1, 1) and m.groups == groups and (m.bias is not None) == bias
            and m.padding == (k // 2, k // 2) and (k == 1 or m.padding_mode == 'reflect'))


def _halo(msgm: MSGM) -> int:
    """Rows of halo of an MSGM's depthwise convolution."""
    _, depthwise, _ = msgm.project_in2
    return depthwise.kernel_size[0] // 2


def _depthwise_size(m: nn.Module) -> int:
    """Kernel size of the depthwise convolution of an MSGM laid out as the engine knows it, else 0."""
    inner = m.project_in2 if type(m) is MSGM else None
    if type(inner) is not nn.Sequential or len(inner) != 3:
        return 0
    _, depthwise, _ = inner
    return depthwise.kernel_size[0] if type(depthwise) is nn.Conv2d else 0


def _msgm_supported(m: nn.Module, c: int, k: int) -> bool:
    """Whether ``m`` is an MSGM on ``c`` channels with a ``k`` x ``k`` depthwise kernel that the fused kernel
    computes."""
    if _depthwise_size(m) != k:
        return False
    reduce, depthwise, expand = m.project_in2
    gate, out, act = m.project_in1, m.project_out, m.act
    if type(gate) is not nn.Conv2d or type(reduce) is not nn.Conv2d or type(act) is not nn.GELU:
        return False
    hidden, mid = gate.out_channels, reduce.out_channels
    return (hidden % 16 == 0 and mid % 16 == 0 and act.approximate == 'none' and _is_conv(gate, c, hidden)
            and _is_conv(reduce, c, mid)
            and _is_conv(depthwise, mid, mid, k, groups=mid) and _is_conv(expand, mid, hidden)
            and _is_conv(out, hidden, c))


def _downsample(esam: ESAM) -> int:
    """ESAM's max-pooling factor (1: no pooling)."""
    return esam.pool.stride if type(esam.pool) is nn.MaxPool2d else 1


def _esam_supported(m: nn.Module, c: int, pad_multiple: int) -> bool:
    """Whether ``m`` is an ESAM on ``c`` channels that the attention and upsampling kernels compute, on maps whose
    sides are multiples of ``pad_multiple``."""
    if type(m) is not ESAM:
        return False
    heads, block, halo, pool, local = m.num_heads, m.block_size, m.halo, m.pool, m.LocalProp
    if not (heads >= 1 and block >= 1 and halo >= 0) or c % (2 * heads) or m.scale != (c // heads) ** -0.5:
        return False
    if type(pool) is nn.Identity:
        down = 1
        if type(local) is not nn.Identity:
            return False
    else:
        down = pool.stride if type(pool) is nn.MaxPool2d else 0
        if not (type(down) is int and down > 1 and pool.kernel_size in (2, (2, 2)) and pool.padding in (0, (0, 0))
                and pool.dilation in (1, (1, 1)) and not pool.ceil_mode and not pool.return_indices
                and type(local) is nn.Sequential and len(local) == 2):
            return False
    window, half = block + 2 * halo, c // heads // 2
    if (pad_multiple % (block * down) or m.rel_h.shape != (1, window, 1, half) or m.rel_w.shape != (1, 1, window, half)
            or not _is_conv(m.qkv_conv, c, 3 * c, bias=False)):
        return False
    if down == 1:
        return True
    depthwise, upsample = local
    k = depthwise.kernel_size[0] if type(depthwise) is nn.Conv2d else 0
    return (k in KERNEL_SIZES and k // 2 < pad_multiple // down and _is_conv(depthwise, c, c, k, groups=c)
            and type(upsample) is nn.Upsample and upsample.mode == 'bilinear' and upsample.align_corners is True
            and upsample.size is None and upsample.scale_factor == down)


def _tail_supported(tail: nn.Module, c: int, upscale: int) -> bool:
    """Whether ``tail`` is (1x1 conv to ``c r²``, PixelShuffle(r), exact GELU) stages of total factor ``upscale``,
    then a reflect-padded 3x3 convolution."""
    if type(tail) is not nn.Sequential or len(tail) % 3 != 1 or len(tail) < 4:
        return False
    *stages, last = tail
    factor = 1
    for conv, shuffle, gelu in zip(stages[0::3], stages[1::3], stages[2::3]):
        if type(shuffle) is not nn.PixelShuffle or type(gelu) is not nn.GELU or gelu.approximate != 'none':
            return False
        r = shuffle.upscale_factor
        if not _is_conv(conv, c, c * r * r):
            return False
        factor *= r
    return factor == upscale and type(last) is nn.Conv2d and _is_conv(last, c, last.out_channels, 3)


def _supported(net: SSIU) -> bool:
    """Whether the parts of ``net`` have the layout and hyper-parameters the engine's kernels compute (see
    :meth:`Engine.accepts`)."""
    if type(net) is not SSIU or type(net.head) is not nn.Conv2d:
        return False
    c, pad, k = net.head.out_channels, net.pad_multiple, net.head.kernel_size[0]
    if not (c % 16 == 0 and k % 2 == 1 and _is_conv(net.head, net.head.in_channels, c, k)
            and type(net.body) is nn.ModuleList and len(net.expert_steps) == 3
            and all(0 <= s <= len(net.body) for s in net.expert_steps)):
        return False
    for step in net.body:
        if type(step) is not SSRMStep or type(step.norm) is not ChannelLayerNorm:
            return False
        norm = step.norm.body
        if not (type(norm) is nn.LayerNorm and norm.normalized_shape == (c,) and norm.weight is not None
                and norm.bias is not None):
            return False
        k = _depthwise_size(step.s1)
        if not (k in KERNEL_SIZES and k // 2 < pad and _esam_supported(step.s3, c, pad)
                and all(_msgm_supported(m, c, k) for m in (step.s1, step.s2, step.s4, step.ffn))):
            return False
    moe = net.moe
    return (type(moe) is MoEFeatureSelector
            and all(_is_conv(fc, c, c) for fc in (moe.fc_a, moe.fc_b, moe.fc_c, moe.fuse))
            and _tail_supported(net.tail, c, net.upscale))


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, bf16: bool,
            gelu: bool = False) -> torch.Tensor:
    """1x1 convolution (oneDNN) of a contiguous channels-last ``(B, H, W, C_in)`` map, GELU fused if ``gelu``.

    ``weight`` is ``(C_out, C_in)``. With ``bf16`` the compiled kernel computes it from bfloat16 operands, with
    float32 accumulators and output.
    """
    if bf16:
        return kernels.linear_bf16(x, weight, bias, gelu=gelu)
    out = _ONEDNN_CONV(x.permute(0, 3, 1, 2), weight[:, :, None, None], bias, *_POINTWISE, 'gelu' if gelu else 'none',
                       [], 'none' if gelu else None)
    return out.permute(0, 2, 3, 1)


def _linear_add_(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, add: torch.Tensor,
                 bf16: bool) -> torch.Tensor:
    """``add += x @ weight.T + bias`` (oneDNN) on contiguous channels-last maps of other storage; returns ``add``.

    With ``bf16``, a new map ``add + x @ weight.T + bias`` from bfloat16 operands (:func:`_linear`).
    """
    if bf16:
        return kernels.linear_bf16(x, weight, bias, add=add)
    out = _ONEDNN_CONV_ADD_(add.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), weight[:, :, None, None], bias,
                            *_POINTWISE, 'add', None, None, [], None)
    return out.permute(0, 2, 3, 1)


def _matrix(conv: nn.Conv2d) -> torch.Tensor:
    """Weight of a 1x1 convolution as a ``(C_out, C_in)`` matrix."""
    return conv.weight.flatten(1)


def _conv2d_reflect(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """The reflect-padded ``conv`` on a channels-last ``(B, H, W, C)`` tensor, channels-last.

    Instead of a reflect-padded copy of the whole map, the map is convolved with zero padding and its border
    rows and columns (``k // 2`` wide) are recomputed from reflect-padded strips: the same values, without
    the full-size copy. Maps narrower than two borders are padded whole.
    """
    x, weight, bias = x.permute(0, 3, 1, 2), conv.weight, conv.bias
    p = weight.shape[-1] // 2
    if p == 0:
        return F.conv2d(x, weight, bias).permute(0, 2, 3, 1)
    if min(x.shape[-2:]) < 2 * p:
        return F.conv2d(F.pad(x, (p,) * 4, mode='reflect'), weight, bias).permute(0, 2, 3, 1)
    out = F.conv2d(x, weight, bias, padding=p)
    out[:, :, :p] = F.conv2d(F.pad(x[:, :, :2 * p], (p, p, p, 0), mode='reflect'), weight, bias)
    out[:, :, -p:] = F.conv2d(F.pad(x[:, :, -2 * p:], (p, p, 0, p), mode='reflect'), weight, bias)
    out[..., :p] = F.conv2d(F.pad(x[..., :2 * p], (p, 0, p, p), mode='reflect'), weight, bias)
    out[..., -p:] = F.conv2d(F.pad(x[..., -2 * p:], (0, p, p, p), mode='reflect'), weight, bias)
    return out.permute(0, 2, 3, 1)


def _msgm(
    m: MSGM,
    x: torch.Tensor,
    top: int,
    bottom: int,
    tile: tuple[int, bool],
    shift: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    add: torch.Tensor | None = None,
    residual: bool = False,
    norm: nn.LayerNorm | None = None,
) -> torch.Tensor:
    """``W_o gated(x' + shift) + bias`` plus ``add`` and, with ``residual``, plus ``x'``, by the fused kernel.

    ``x' = norm(x)`` (``x`` if no ``norm``) and ``gated`` is the MSGM before ``project_out``. ``x`` holds the rows
    of a band plus the depthwise halo rows above and below it, except ``top``/``bottom`` rows beyond the map's
    border, which are reflected; the result has the band's rows. ``shift`` (C,) is folded into the input
    projection biases; ``bias`` replaces ``project_out``'s own (None: no bias). ``tile``: pixels per cache tile,
    and whether the products take bfloat16 operands.
    """
    reduce, depthwise, expand = m.project_in2
    p = _halo(m)
    gate_weight, value_weight = _matrix(m.project_in1), _matrix(reduce)
    gate_bias, value_bias = m.project_in1.bias, reduce.bias
    if shift is not None:
        gate_bias, value_bias = gate_bias + gate_weight @ shift, value_bias + value_weight @ shift
    return kernels.msgm(x, gate_weight, gate_bias, value_weight, value_bias, depthwise.weight, depthwise.bias,
                        _matrix(expand), expand.bias, _matrix(m.project_out), bias, add, residual, p - top,
                        x.shape[1] - 2 * p + top + bottom, tile[0], norm=norm, bf16=tile[1])


def _key_embedding(esam: ESAM) -> torch.Tensor:
    """ESAM's positional embedding added to every key window: (window, window, head_dim)."""
    window = esam.rel_h.shape[1]
    return torch.cat([esam.rel_h[0].expand(-1, window, -1), esam.rel_w[0].expand(window, -1, -1)], dim=-1)


def _attend(esam: ESAM, x: torch.Tensor, shift: torch.Tensor, bf16: bool) -> torch.Tensor:
    """ESAM of ``x + shift`` before upsampling: (B, H / downsample, W / downsample, C).

    ``shift`` (C,) commutes with max-pooling and is folded into the qkv projection; ``bf16``: that projection and
    the attention's two products take bfloat16 operands.
    """
    down = _downsample(esam)
    if down > 1:
        x = F.max_pool2d(x.permute(0, 3, 1, 2), 2, down).permute(0, 2, 3, 1)
    qkv_weight = _matrix(esam.qkv_conv)
    qkv = _linear(x, qkv_weight, qkv_weight @ shift, bf16)
    out = kernels.halo_attention(qkv, _key_embedding(esam), esam.num_heads, esam.block_size, esam.halo, bf16)
    if down > 1:
        depthwise = esam.LocalProp[0]
        out = kernels.depthwise_reflect(out, depthwise.weight, depthwise.bias, 0, out.shape[1])
    return out


def _combine(esam: ESAM, low: torch.Tensor, v: torch.Tensor, b: torch.Tensor, r0: int, height: int) -> torch.Tensor:
    """Rows ``r0:r0 + N`` of ``ESAM + v - b``, ``low`` the output of :func:`_attend` and ``v``, ``b`` (B, N, W, C)
    those rows of full-size maps: the SSRM update that consumes ESAM, in one pass."""
    if type(esam.pool) is nn.MaxPool2d:
        return kernels.upsample_combine(low, v, b, r0, height)
    return torch.add(_rows(low, r0, r0 + v.shape[1]), v).sub_(b)


def _moe(moe: MoEFeatureSelector, experts: list[torch.Tensor], residual: torch.Tensor, with_gates: bool,
         bf16: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """MoE-FS on three (B, H, W, C) experts: ``fuse(out) + out + residual`` for the gated sum ``out``, and the gates
    (B, H, W, 3, C), None unless ``with_gates``. ``bf16``: the 1x1 convolutions take bfloat16 operands; the softmax
    and the gated sum stay float32."""
    fcs = (moe.fc_a, moe.fc_b, moe.fc_c)
    logits = [_linear(e, _matrix(fc), fc.bias, bf16) for fc, e in zip(fcs, experts)]
    out, skip, gates = kernels.moe_combine(logits, experts, residual, with_gates)
    return _linear_add_(out, _matrix(moe.fuse), moe.fuse.bias, skip, bf16), gates


def _tap_maps(tail: nn.Sequential, feat: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Products of the tail's final 3x3 convolution's taps with the upsampled features (B, h, w, C).

    Returns a strided view (3 kx, 3 ky, B, C_out, h', r, sw) of planar maps, ``h' r = sh`` (``r`` the last
    stage's factor): ``[kx, ky, :, o]`` is the HR feature map times ``weight[o, :, ky, kx]``, a 1x1 product;
    the convolution is the bias plus the sum of the nine maps shifted by their tap. The stages run on the
    unshuffled map (1x1 products and GELUs commute with pixel shuffle): all but the last are shuffled as
    whole C-vectors, the last is never shuffled, only its tap products are, by the view. Its sub-pixel
    channels are ordered (j, i), so that an HR row of that view is a run with stride ``r``.
    """
    *stages, last = tail
    b, h, w, c = feat.shape
    k, o = last.kernel_size[0], last.out_channels
    taps = last.weight.permute(3, 2, 0, 1).reshape(k * k * o, c)  # rows (kx, ky, o)
    r, count = 1, len(stages) // 3
    for index, (conv, shuffle) in enumerate(zip(stages[0::3], stages[1::3])):
        if index:  # shuffle the previous stage: (B, h, w, j, i, C) -> (B, h i, w j, C)
            feat = feat.reshape(b, h, w, r, r, c).permute(0, 1, 4, 2, 3, 5).reshape(b, h * r, w * r, c)
            h, w = h * r, w * r
        r = shuffle.upscale_factor
        weight = conv.weight.view(-1, r, r, c).permute(2, 1, 0, 3).reshape(conv.out_channels, c)
        bias = conv.bias.view(-1, r, r).permute(2, 1, 0).reshape(-1)
        c = conv.out_channels // (r * r)
        if bf16 and index == count - 1:  # the last stage and the tap product in one pass, read transposed
            padded = F.pad(taps, (0, 0, 0, -taps.shape[0] % 16))  # (pixels, taps padded to 16)
            t = kernels.gelu_product_bf16(feat, weight, bias, padded).T[:taps.shape[0]]
        else:
            feat = _linear(feat, weight, bias, bf16, gelu=True)
    if not bf16:
        t = torch.mm(taps, feat.reshape(-1, c).T)  # (k k o, B h w r r), pixels (b, y, x, j, i)
    return t.view(k, k, o, b, h, w, r, r).permute(0, 1, 3, 2, 4, 7, 5, 6).flatten(-2)


def _column_sums(t: torch.Tensor) -> torch.Tensor:
    """Sums over ``kx`` of tap maps (3 kx, 3 ky, B, C, h, r, W) shifted by their column tap, reflected at the sides.

    Returns (3 ky, B, C, h r, W). ``t`` may be any strided view (such as the unshuffled maps of
    :func:`_tap_maps`): reading it is its only copy.
    """
    u = t.new_empty(t.shape[1:])
    torch.add(t[1][..., 1:], t[0][..., :-1], out=u[..., 1:])
    torch.add(t[1][..., 0], t[0][..., 1], out=u[..., 0])
    u[..., :-1] += t[2][..., 1:]
    u[..., -1] += t[2][..., -2]
    return u.flatten(-3, -2)


def _rows(x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows ``start:stop`` of a (B, H, W, C) map, or the map itself when that is all of it."""
    return x if start == 0 and stop == x.shape[1] else x[:, start:stop]


def _window(r0: int, r1: int, halo: int, height: int) -> tuple[int, int, int, int]:
    """Rows ``[lo, hi)`` of a map of ``height`` rows that band ``[r0, r1)`` needs with ``halo`` rows on each side.

    Also returns how many of those rows lie beyond the top and the bottom of the map (to be reflected).
    """
    lo, hi = max(r0 - halo, 0), min(r1 + halo, height)
    return lo, hi, lo - (r0 - halo), r1 + halo - hi


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
