"""Compiled CPU kernels (``ssiu_arch/cpu/csrc/kernels.cpp``), registered as ``torch.ops.ssiu.*``.

They are built on first use into a per-user cache (:mod:`ssiu_arch.cpu.build`) when a C++ compiler is available;
``SSIU_NO_KERNELS=1`` turns them off and ``SSIU_KERNELS_REBUILD=1`` builds them afresh. Their bfloat16 products
(AVX512_BF16 ``vdpbf16ps``) run where the CPU has that instruction set (:func:`bf16_available`); ``SSIU_NO_BF16=1``
turns them off. Only the CPU engine
(:mod:`ssiu_arch.cpu.engine`) uses them; without them the network runs its own modules, about 2x slower for
inference, and says so once, as it does for tracing and ONNX export, since the kernels have no ONNX mapping.
The engine's training path (:mod:`ssiu_arch.cpu.training`) wraps the backward kernels in autograd functions: ESAM's
halo attention, MSGM's GELU gate, the reflect-padded depthwise convolution, MoE-FS's gated sum, the LayerNorm over
channels and the 1x1 convolution.
"""
from __future__ import annotations

import logging
import os

import torch

from ssiu_arch.cpu import build

_LOADED: bool | None = None
_STATUS = ''
_TOLD = False


def _switch(name: str) -> bool:
    return os.environ.get(name, '') not in ('', '0')


def _load() -> tuple[bool, str]:
    if _switch('SSIU_NO_KERNELS'):
        return False, 'switched off by SSIU_NO_KERNELS'
    try:
        path = build.library(rebuild=_switch('SSIU_KERNELS_REBUILD'))
        torch.ops.load_library(str(path))
    except (build.KernelBuildError, OSError, RuntimeError) as err:
        return False, str(err)
    return True, str(path)


def _state() -> tuple[bool, str]:
    global _LOADED, _STATUS
    if _LOADED is None:
        _LOADED, _STATUS = _load()
    return _LOADED, _STATUS


def available() -> bool:
    """Whether the compiled kernels are loaded, loading (or building) them on the first call. When they cannot
    be, the first call logs why, once per process, unless ``SSIU_NO_KERNELS`` switched them off."""
    global _TOLD
    loaded, _ = _state()
    if not loaded and not _TOLD and not _switch('SSIU_NO_KERNELS'):
        _TOLD = True
        logging.getLogger(__name__).warning(status_line())
    return loaded


def status() -> tuple[bool, str]:
    """(True, library path) when the compiled kernels are loaded, else (False, why not); loads them on the first
    call. Its caller reports the state, so :func:`available` does not log it again."""
    global _TOLD
    _TOLD = True
    return _state()


def bf16_available() -> bool:
    """Whether the kernels' bfloat16 products can run: the kernels are loaded, the CPU has AVX512_BF16 (detected
    at run time) and ``SSIU_NO_BF16`` is unset (or 0)."""
    return not _switch('SSIU_NO_BF16') and available() and bool(torch.ops.ssiu.bf16_supported())


def _bf16_state() -> str:
    if _switch('SSIU_NO_BF16'):
        return 'off (SSIU_NO_BF16)'
    return 'yes (AVX512_BF16)' if torch.ops.ssiu.bf16_supported() else 'no (the CPU lacks AVX512_BF16)'


def status_line() -> str:
    """The state in one line, as ``ssiu infer`` and ``ssiu bench`` print it."""
    loaded, detail = status()
    if loaded:
        return f'compiled CPU kernels: loaded ({detail}); bfloat16 products: {_bf16_state()}'
    return f'compiled CPU kernels: unavailable ({detail}); about 2x slower'


def depthwise_reflect(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, offset: int,
                      rows: int) -> torch.Tensor:
    """Reflect-padded depthwise convolution of a channels-last (B, N, W, C) map, rows ``offset:offset + rows``.

    ``weight`` is (C, 1, k, k). Output row ``i`` is centred on input row ``offset + i``; rows beyond the input's
    first or last row are reflected. Returns (B, rows, W, C).
    """
    return torch.ops.ssiu.depthwise_reflect(x, weight, bias, offset, rows)


def upsample_combine(low: torch.Tensor, v: torch.Tensor, b: torch.Tensor, r0: int, height: int) -> torch.Tensor:
    """Rows ``r0:r0 + N`` of ``bilinear(low) + v - b``: ``low`` (B, h, w, C) resized to ``height`` x W with aligned
    corners, ``v`` and ``b`` those (B, N, W, C) rows of full-size maps."""
    return torch.ops.ssiu.upsample_combine(low, v, b, r0, height)


def halo_attention(qkv: torch.Tensor, embedding: torch.Tensor, heads: int, block: int, halo: int,
                   bf16: bool = False) -> torch.Tensor:
    """ESAM's attention on its channels-last qkv map (B, h, w, 3 C): each ``block``² block of queries attends to
    the keys (plus ``embedding``, (window, window, C / heads)) and values of the block grown by ``halo`` pixels,
    zero outside the map. Returns (B, h, w, C). With ``bf16``, where :func:`bf16_available` and the heads are
    multiples of 16 channels over at most 128 keys, the scores and the weighted sum of the values take bfloat16
    operands (queries, keys, values and the softmax's exps rounded); accumulators, softmax and output stay
    float32."""
    return torch.ops.ssiu.halo_attention(qkv, embedding, heads, block, halo, bf16)


def moe_combine(logits: list[torch.Tensor], experts: list[torch.Tensor], residual: torch.Tensor | None,
                with_gates: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """MoE-FS gating of (B, H, W, C) maps: ``gates = softmax(logits)`` over the experts, ``out = sum(gates *
    experts)``, ``skip = out + residual``. Returns (out, skip, gates (B, H, W, E, C) or None)."""
    out, skip, gates = torch.ops.ssiu.moe_combine(logits, experts, residual, with_gates)
    return out, skip, gates if with_gates else None


def moe_combine_backward(grad: torch.Tensor, grad_skip: torch.Tensor | None, gates: torch.Tensor,
                         grad_gates: torch.Tensor | None,
                         experts: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Gradients of :func:`moe_combine`'s logits and experts, one (B, H, W, C) map each, from the gradients of its
    ``out`` and ``skip`` (None when skip is unused), the ``gates`` it returned (B, H, W, E, C) with their gradient
    (None if none) and the experts, in one pass over the maps."""
    dlogits, dexperts = torch.ops.ssiu.moe_combine_backward(grad, grad_skip, gates, grad_gates, experts)
    return list(dlogits), list(dexperts)


def msgm(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, wd: torch.Tensor,
         bd: torch.Tensor, w3: torch.Tensor, b3: torch.Tensor, wo: torch.Tensor, bo: torch.Tensor | None,
         add: torch.Tensor | None, residual: bool, offset: int, rows: int, tile_pixels: int,
         norm: torch.nn.LayerNorm | None = None, bf16: bool = False) -> torch.Tensor:
    """Fused MSGM ``W_o (GELU(W_1 x + b_1) * (W_3 DW(W_2 x + b_2) + b_3)) + b_o [+ add] [+ x]`` on rows
    ``offset:offset + rows`` of a channels-last (B, N, W, C) map, computed in cache-sized tiles of
    ``tile_pixels``; with ``norm``, ``x`` is ``norm`` of the input, computed in the tiles. Weights are (C_out, C_in)
    matrices and the (mid, 1, k, k) depthwise kernel; rows the depthwise convolution needs beyond the input are
    reflected. With ``bf16`` (only where :func:`bf16_available`) the four products take bfloat16 operands, with
    float32 accumulators; LayerNorm, GELU, the depthwise convolution and every map stay float32 (GELU interpolated
    within 2e-5, as its product is rounded to bfloat16)."""
    ln_weight, ln_bias, eps = (None, None, 0.0) if norm is None else (norm.weight, norm.bias, norm.eps)
    return torch.ops.ssiu.msgm(x, w1, b1, w2, b2, wd, bd, w3, b3, wo, bo, add, residual, ln_weight, ln_bias, eps,
                               offset, rows, tile_pixels, bf16)


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, add: torch.Tensor | None = None,
                gelu: bool = False) -> torch.Tensor:
    """``x @ weight.T + bias``, then GELU (``gelu``) or plus ``add``, on a channels-last float32 map (..., C_in),
    with bfloat16 operands and float32 accumulators and output (only where :func:`bf16_available`). ``weight`` is
    (C_out, C_in), both widths multiples of 16. The GELU, for maps that bfloat16 products read next, is
    interpolated within 2e-5 of the exact one."""
    return torch.ops.ssiu.linear_bf16(x, weight, bias, add, gelu)


def gelu_product_bf16(x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """``GELU(x @ w1.T + b1)``, its rows of C_1 values split into rows of C_2 (``w2``'s inputs), times ``w2.T``:
    (pixels C_1 / C_2, N), from bfloat16 operands with float32 accumulators, GELU (within 2e-5) and output (only where
    :func:`bf16_available`). ``x`` is a channels-last float32 map (..., C_in); ``w1`` (C_1, C_in), ``w2`` (N, C_2);
    the intermediate map exists only in cache-sized blocks."""
    return torch.ops.ssiu.gelu_product_bf16(x, w1, b1, w2)


def pixel_rows(t: torch.Tensor) -> torch.Tensor:
    """An NCHW map as a (pixels, channels) matrix: a view of channels-last memory, else a copy."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def conv1x1_backward(grad: torch.Tensor, x: torch.Tensor,
                     weight: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Gradients of a 1x1 convolution from its output's gradient ``grad`` (B, C_out, H, W) and its input ``x``
    (B, C_in, H, W), float32, C_in a multiple of 16: the input's (B, C_in, H, W) in channels-last memory where
    ``weight`` (C_out, C_in, 1, 1) is given (else None), the weight's
    (C_out, C_in) and the bias's (C_out), in one pass over the maps (channels-last memory is read in place, other
    layouts are copied to it first)."""
    flat = None if weight is None else weight.reshape(weight.shape[0], -1)
    dx, dweight, dbias = torch.ops.ssiu.linear_backward(pixel_rows(grad), pixel_rows(x), flat)
    if dx is not None:
        b, _, h, w = x.shape
        dx = dx.view(b, h, w, -1).permute(0, 3, 1, 2)
    return dx, dweight, dbias


def shared_conv1x1_backward(grads: list[torch.Tensor], x: torch.Tensor, weights: list[torch.Tensor],
                            add: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor],
                                                                      list[torch.Tensor]]:
    """Gradients of 1x1 convolutions ``conv_k(x)`` of one input, as :func:`conv1x1_backward` each, with the input's
    gradients summed (plus ``add`` if given) in the same pass: (dx (channels-last), [dweight_k (C_k, C_in)],
    [dbias_k]). Each chunk of ``x`` is read once for every convolution."""
    dx, dweights, dbiases = torch.ops.ssiu.linear_backward_shared(
        [pixel_rows(g) for g in grads], pixel_rows(x), [w.reshape(w.shape[0], -1) for w in weights],
        None if add is None else pixel_rows(add))
    b, _, h, w = x.shape
    return dx.view(b, h, w, -1).permute(0, 3, 1, 2), list(dweights), list(dbiases)


def gated_conv1x1_backward(grad: torch.Tensor, gate: torch.Tensor, h: torch.Tensor, u: torch.Tensor,
                           weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``conv(gate)``, a 1x1 convolution (``weight`` (C_out, C_in, 1, 1)) of MSGM's ``gate = GELU(h) *
    u``, from the output's gradient ``grad`` (B, C_out, H, W), the gate and its inputs (B, C_in, H, W), float32, C_in
    a multiple of 16: ``h``'s and ``u``'s (channels-last), the weight's (C_out, C_in) and the bias's (C_out), in one
    pass (channels-last memory is read in place, other layouts are copied to it first)."""
    dh, du, dweight, dbias = torch.ops.ssiu.gated_linear_backward(*map(pixel_rows, (grad, gate, h, u)),
                                                                  weight.reshape(weight.shape[0], -1))
    b, _, height, width = h.shape
    return (*(t.view(b, height, width, -1).permute(0, 3, 1, 2) for t in (dh, du)), dweight, dbias)
