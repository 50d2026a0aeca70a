"""The CPU engine's training path: the reference network's modules, with some of their parts as compiled kernels.

Where autograd needs gradients of an SSIU on the CPU (float32, no autocast), :class:`ssiu_arch.cpu.engine.Engine`
runs :func:`forward`. It is the reference forward pass, module for module, except for the parts whose eager
PyTorch form is many small passes over the maps, computed here by kernels with their own backward formulas:

- ESAM's halo attention (:class:`HaloAttention`): gathering the windows, the two batched products and the
  softmax are one kernel forward and one backward, which recomputes the scores from q and k instead of storing
  the probabilities;
- MSGM's gate ``GELU(W_1 x) * W_3 DW(W_2 x)`` and its output projection ``W_o`` (:class:`GatedConv1x1`): the gate in
  one pass forward, where eager PyTorch makes two, and backward one pass for the gradients of ``W_o`` and of the
  gate's inputs, where eager PyTorch makes four;
- the reflect-padded depthwise convolutions of MSGM and ESAM (:class:`DepthwiseReflect`): no padded copy of the
  map forward, and one pass backward for the input, weight and bias gradients;
- the 1x1 convolutions of MSGM and ESAM's qkv projection (:class:`Conv1x1`, :class:`SharedInputConv1x1`):
  oneDNN's convolution forward, with the residual sums after MSGM_1, MSGM_4 and MSGM_ffn in its epilogue, and the
  input, weight and bias gradients in one kernel pass where that beats oneDNN's backward on the CPU (timed on the
  first backward pass of each shape, :func:`backward_choices`); convolutions that read one map add their input
  gradients in that pass;
- ``v + ESAM(v) - b`` with ESAM's upsampling in one pass (:class:`UpsampleUpdate`);
- MoE-FS's softmax over the experts and gated sum, with the residual sums after it (:class:`MoEMix`), and its 1x1
  convolutions as :class:`Conv1x1`;
- the tail without full-width maps at the output's resolution (:func:`tail`, :class:`TapSum`);
- the LayerNorm over channels (:class:`ChannelNorm`) and ESAM's max-pooling (:class:`PoolKeep`).

The head is the module's own call, so its parameters get their gradients from the same operators as in the
reference. ``tests/test_engine.py`` checks outputs and gradients against the reference forward.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import TypeVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ssiu_arch.archs.ssiu_arch import ESAM, MSGM, SSIU, MoEFeatureSelector, SSRMStep, pad_to_multiple
from ssiu_arch.cpu import kernels
from ssiu_arch.utils.cpu_features import fastest_times

__all__ = ['ChannelNorm', 'Conv1x1', 'DepthwiseReflect', 'GatedConv1x1', 'HaloAttention', 'MoEMix', 'PoolKeep',
           'SharedInputConv1x1', 'TapSum', 'UpsampleUpdate', 'backward_choices', 'forward', 'supported']

# Kernel limits of the attention's backward pass: heads of 16, 32, ... 128 channels, windows of at most 128 keys.
MAX_HEAD_DIM = 128
MAX_KEYS = 128
T = TypeVar('T')


class HaloAttention(torch.autograd.Function):
    """ESAM's attention on a channels-last qkv map (B, h, w, 3 C) with key embedding (window, window, C / heads)
    -> (B, h, w, C); see :func:`ssiu_arch.cpu.kernels.halo_attention`."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, embedding: torch.Tensor, heads: int, block: int,
                halo: int) -> torch.Tensor:
        qkv, embedding = qkv.contiguous(), embedding.contiguous()
        ctx.save_for_backward(qkv, embedding)
        ctx.layout = (heads, block, halo)
        return torch.ops.ssiu.halo_attention(qkv, embedding, heads, block, halo, False)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        qkv, embedding = ctx.saved_tensors
        dqkv, dembedding = torch.ops.ssiu.halo_attention_backward(grad.contiguous(), qkv, embedding, *ctx.layout)
        return dqkv, dembedding, None, None, None


class DepthwiseReflect(torch.autograd.Function):
    """A reflect-padded depthwise convolution of a channels-last map (B, H, W, C) with weight (C, 1, k, k) and bias
    (C) -> (B, H, W, C); see :func:`ssiu_arch.cpu.kernels.depthwise_reflect`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x, weight)
        return torch.ops.ssiu.depthwise_reflect(x, weight, bias, 0, x.shape[1])

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        return torch.ops.ssiu.depthwise_reflect_backward(grad.contiguous(), x, weight)


class Conv1x1(torch.autograd.Function):
    """``conv(x)``, or ``conv(x) + other`` with the sum in oneDNN's epilogue, for a 1x1 convolution of channels-last
    NCHW maps. Forward is oneDNN's; the backward is one pass of :func:`ssiu_arch.cpu.kernels.conv1x1_backward`
    over the output's gradient and the input where that beats oneDNN's backward on the CPU at these shapes
    (:func:`fastest`), else oneDNN's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                other: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _conv1x1_forward(x, weight, bias, other)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        needs_x, needs_weight, needs_bias, needs_other = ctx.needs_input_grad

        def kernel() -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
            dx, dweight, dbias = kernels.conv1x1_backward(grad, x, weight if needs_x else None)
            return dx, dweight.view_as(weight), dbias

        def onednn() -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
            return _onednn_backward(grad, x, weight, needs_x)

        key = ('conv1x1', tuple(x.shape), f'-> {weight.shape[0]}' + ('' if needs_x else ', no dx'))
        dx, dweight, dbias = fastest(key, {'kernel': kernel, 'onednn': onednn})
        return dx, dweight if needs_weight else None, dbias if needs_bias else None, grad if needs_other else None


class SharedInputConv1x1(torch.autograd.Function):
    """``(conv_1(x), ..., conv_n(x))`` for 1x1 convolutions of one channels-last NCHW map, given as ``x, residual,
    weight_1, bias_1, ..., weight_n, bias_n``, and ``x + residual`` after them if ``residual`` is a map, ``x`` itself if
    it is True (for another use of x, whose gradient then arrives here): as n :class:`Conv1x1` (and a sum), except that
    the input's gradients are summed (the other use's included) where they are computed, in one kernel pass over ``x``
    where that is the faster at these shapes (:func:`fastest`), else in one oneDNN backward of the convolutions as one
    (their gradients concatenated), where autograd would sum the input gradients in passes of their own."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, residual: torch.Tensor | bool | None,
                *params: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
        weights, biases = params[::2], params[1::2]
        ctx.save_for_backward(x, *weights)
        outs = tuple(F.conv2d(x, weight, bias) for weight, bias in zip(weights, biases))
        if residual is None or residual is False:
            return outs
        return (*outs, x if residual is True else x + residual)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads: torch.Tensor):
        x, *weights = ctx.saved_tensors
        needs = ctx.needs_input_grad
        outputs = list(grads[:len(weights)])
        summed = grads[len(weights)] if len(grads) > len(weights) else None
        sizes = [w.shape[0] for w in weights]

        def kernel() -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:  # one pass for all of them
            dx, dweights, dbiases = kernels.shared_conv1x1_backward(outputs, x, weights, summed)
            return dx, [d.view_as(w) for d, w in zip(dweights, weights)], dbiases

        def onednn() -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor]]:
            # oneDNN's backward of the convolutions as one, their outputs' gradients concatenated: x read once
            dx, dweight, dbias = _onednn_backward(torch.cat(outputs, 1), x, torch.cat(weights), needs[0])
            dx = dx + summed if dx is not None and summed is not None else dx
            return dx, dweight.split(sizes), dbias.split(sizes)

        key = ('shared', tuple(x.shape), f'-> {"+".join(map(str, sizes))}' + ('' if summed is None else ', + dx'))
        dx, dweights, dbiases = fastest(key, {'kernel': kernel, 'onednn': onednn}) if needs[0] else onednn()
        params = [g if needs[2 + index] else None for index, g in
                  enumerate(t for pair in zip(dweights, dbiases) for t in pair)]
        return dx, summed if needs[1] else None, *params


def _conv1x1_forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     other: torch.Tensor | None) -> torch.Tensor:
    """``conv(x)``, plus ``other`` in oneDNN's epilogue if given."""
    if other is None:
        return F.conv2d(x, weight, bias)
    return torch.ops.mkldnn._convolution_pointwise.binary(x, other, weight, bias, [0, 0], [1, 1], [1, 1], 1, 'add',
                                                          None, None, [], None)


def _onednn_backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor,
                     needs_x: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    return torch.ops.aten.convolution_backward(grad, x, weight, [weight.shape[0]], [1, 1], [0, 0], [1, 1], False,
                                               [0, 0], 1, [needs_x, True, True])


# 'kernel' or 'onednn' to run every 1x1 convolution backward one way (tests, A/B timings); None: the faster one.
FORCED_BACKWARD: str | None = None
# Input shapes per backward pattern that fastest() times; later shapes reuse the nearest one's choice.
MAX_TIMED_SHAPES = 4
_CHOICES: dict[tuple, tuple[str, dict[str, float]]] = {}


def fastest(key: tuple, runs: dict[str, Callable[[], T]]) -> T:
    """``runs[name]()`` for the ``name`` that runs fastest on this CPU: the engine's kernel or oneDNN's convolution
    backward, for one pattern of 1x1 convolution backward at one input shape (``key``: pattern, shape, detail). The
    first call with a key (and thread count) times each run on the call's own tensors, the fastest of three
    interleaved repeats after a warm-up (:func:`~ssiu_arch.utils.cpu_features.fastest_times`), and keeps the choice
    for the process: which one wins depends on the CPU, the pattern and the shape (``bench_train.py`` prints them).
    Once :data:`MAX_TIMED_SHAPES` shapes of a pattern are timed, further shapes (training on whole images of
    varying sizes, say) take the choice of the timed shape nearest in size instead of being timed each."""
    if FORCED_BACKWARD is not None:
        return runs[FORCED_BACKWARD]()
    pattern, shape, detail = key
    key = (pattern, shape, detail, torch.get_num_threads())
    if key not in _CHOICES:
        timed = [(k[1], choice) for k, (choice, _) in _CHOICES.items() if (k[0], *k[2:]) == (pattern, *key[2:])]
        if len(timed) >= MAX_TIMED_SHAPES:
            size = math.prod(shape)
            return runs[min(timed, key=lambda item: abs(math.log(math.prod(item[0]) / size)))[1]]()
        times = fastest_times(runs, repeats=4)
        _CHOICES[key] = min(times, key=times.get), times
    return runs[_CHOICES[key][0]]()


def backward_choices() -> dict[tuple, tuple[str, dict[str, float]]]:
    """The choices :func:`fastest` has made in this process: ``(pattern, input shape, detail, thread count)`` -> (the
    run chosen, seconds of each run). Patterns: ``conv1x1`` (detail: output channels, ``no dx`` where the input needs
    no gradient), ``shared`` (each convolution's output channels, ``+ dx`` where a second use's gradient is added) and
    ``gated`` (output channels)."""
    return dict(_CHOICES)


class ChannelNorm(torch.autograd.Function):
    """LayerNorm over the channels of a channels-last NCHW map (``ChannelLayerNorm``), forward and backward one pass
    each (:func:`ssiu_arch.cpu.kernels` ``layer_norm_rows_forward`` and ``_backward``), the backward's weight and bias
    gradients included, where ATen's takes more passes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
        b, c, h, w = x.shape
        rows = kernels.pixel_rows(x)
        out, mean, rstd = torch.ops.ssiu.layer_norm_rows_forward(rows, weight, bias, eps)
        ctx.save_for_backward(rows, mean, rstd, weight)
        return out.view(b, h, w, c).permute(0, 3, 1, 2)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        rows, mean, rstd, weight = ctx.saved_tensors
        b, c, h, w = grad.shape
        dx, dweight, dbias = torch.ops.ssiu.layer_norm_rows_backward(kernels.pixel_rows(grad), rows, mean, rstd, weight)
        return dx.view(b, h, w, c).permute(0, 3, 1, 2), dweight, dbias, None


class PoolKeep(torch.autograd.Function):
    """ESAM's max-pooling (2x2 windows at ``stride``) of a channels-last NCHW map v, returned with v itself:
    ``(pool(v), v)``. The step's later use of v takes the second, so both gradients of v arrive in this backward, which
    scatters the pooling's gradient into the other (:func:`ssiu_arch.cpu.kernels` ``max_pool2_backward``), where
    autograd would zero-fill a map for the pooling's gradient and add the two in a pass of its own."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
        pooled, argmax = torch.ops.ssiu.max_pool2(v.permute(0, 2, 3, 1), stride)
        ctx.save_for_backward(argmax)
        ctx.size, ctx.stride = v.shape[-2:], stride
        ctx.set_materialize_grads(False)
        return pooled.permute(0, 3, 1, 2), v

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_pooled: torch.Tensor | None, grad_v: torch.Tensor | None):
        argmax, = ctx.saved_tensors
        if grad_pooled is None:
            return grad_v, None
        nhwc = None if grad_v is None else grad_v.permute(0, 2, 3, 1)
        dv = torch.ops.ssiu.max_pool2_backward(grad_pooled.permute(0, 2, 3, 1), argmax, nhwc, *ctx.size, ctx.stride)
        return dv.permute(0, 3, 1, 2), None


class UpsampleUpdate(torch.autograd.Function):
    """``bilinear(low) + v - b`` in one pass: ``low`` (B, C, h, w) resized with aligned corners to the size of the
    (B, C, H, W) maps ``v`` and ``b``, all channels-last; see :func:`ssiu_arch.cpu.kernels.upsample_combine`. Returns
    ``b`` itself too, for the step's later use of it: both of b's gradients then arrive here and become one in one
    pass, where autograd would negate one and add them in two."""

    @staticmethod
    def forward(ctx, low: torch.Tensor, v: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.sizes = (low.shape, v.shape[-2:])
        ctx.set_materialize_grads(False)
        nhwc = [t.permute(0, 2, 3, 1) for t in (low, v, b)]
        return torch.ops.ssiu.upsample_combine(*nhwc, 0, v.shape[-2]).permute(0, 3, 1, 2), b

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor | None, grad_b: torch.Tensor | None):
        if grad is None:
            return None, None, grad_b
        low_shape, size = ctx.sizes
        dlow = torch.ops.aten.upsample_bilinear2d_backward(grad, list(size), list(low_shape), True)
        return dlow, grad, grad.neg() if grad_b is None else grad_b - grad


class MoEMix(torch.autograd.Function):
    """MoE-FS's gated sum on channels-last (B, H, W, C) maps, given as ``residual, logits_1..n, experts_1..n``:
    ``mixed = sum_i softmax_i(logits)_i * experts_i``, ``skip = mixed + residual`` and the gates (B, H, W, n, C),
    forward in one pass (:func:`ssiu_arch.cpu.kernels.moe_combine`) and backward in one
    (:func:`ssiu_arch.cpu.kernels.moe_combine_backward`), where eager PyTorch stacks, selects and zero-fills
    expert-sized maps in both directions."""

    @staticmethod
    def forward(ctx, residual: torch.Tensor, *maps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = len(maps) // 2
        ctx.set_materialize_grads(False)  # no zero-filled gradient for an unused output (the gates, mostly)
        mixed, skip, gates = kernels.moe_combine(list(maps[:n]), list(maps[n:]), residual, True)
        ctx.save_for_backward(gates, *maps[n:])
        return mixed, skip, gates

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_mixed: torch.Tensor | None, grad_skip: torch.Tensor | None,
                 grad_gates: torch.Tensor | None):
        gates, *experts = ctx.saved_tensors
        out_grads = [g for g in (grad_mixed, grad_skip) if g is not None]
        if not out_grads and grad_gates is None:
            return (None,) * (1 + 2 * len(experts))
        first = out_grads[0] if out_grads else torch.zeros_like(experts[0])
        dlogits, dexperts = kernels.moe_combine_backward(first, out_grads[1] if len(out_grads) > 1 else None, gates,
                                                         grad_gates, experts)
        return grad_skip, *dlogits, *dexperts


class GatedConv1x1(torch.autograd.Function):
    """``conv(GELU(h) * u)``, or plus ``other`` in oneDNN's epilogue: MSGM's gate and output projection, for
    channels-last NCHW maps. Forward: the gate in one pass, then oneDNN's convolution. Backward: one pass of
    :func:`ssiu_arch.cpu.kernels.gated_conv1x1_backward` for the gradients of the weight, the bias, h and u, or
    oneDNN's backward and then the gate's backward in one pass, whichever is the faster at these shapes
    (:func:`fastest`)."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, u: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                other: torch.Tensor | None) -> torch.Tensor:
        gate = _flat(torch.ops.ssiu.gelu_gate, h, u)[0]
        ctx.save_for_backward(gate, h, u, weight)
        return _conv1x1_forward(gate, weight, bias, other)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        gate, h, u, weight = ctx.saved_tensors

        def kernel() -> tuple[torch.Tensor, ...]:
            dh, du, dweight, dbias = kernels.gated_conv1x1_backward(grad, gate, h, u, weight)
            return dh, du, dweight.view_as(weight), dbias

        def onednn() -> tuple[torch.Tensor, ...]:
            dgate, dweight, dbias = _onednn_backward(grad, gate, weight, True)
            return *_flat(torch.ops.ssiu.gelu_gate_backward, dgate, h, u), dweight, dbias

        key = ('gated', tuple(h.shape), f'-> {weight.shape[0]}')
        dh, du, dweight, dbias = fastest(key, {'kernel': kernel, 'onednn': onednn})
        return dh, du, dweight, dbias, grad if ctx.needs_input_grad[4] else None


def _flat(op, *maps: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``op`` on the memory of NCHW ``maps`` seen as channels-last (B, H, W, C) buffers; results back as NCHW."""
    flat = [m.permute(0, 2, 3, 1).contiguous() for m in maps]
    out = op(*flat)
    return tuple(t.permute(0, 3, 1, 2) for t in (out if isinstance(out, (tuple, list)) else (out,)))


class TapSum(torch.autograd.Function):
    """A k x k convolution's output from its k² tap maps: (B, k k C_out, H, W), channels ordered (ky, kx, o), each map
    the input's pixels times one tap's weights -> (B, C_out, H, W), the maps reflect-padded and summed, each shifted by
    its tap. Backward: each tap map's gradient is the output's gradient shifted back, so one zero-filled padded map
    takes the k² copies and the padding's backward folds its border in (autograd would zero-fill a padded map per
    tap)."""

    @staticmethod
    def forward(ctx, taps: torch.Tensor, k: int) -> torch.Tensor:
        _, _, height, width = taps.shape
        ctx.shape, ctx.k = taps.shape, k
        p = k // 2
        padded = F.pad(taps, (p, p, p, p), mode='reflect').unflatten(1, (k, k, -1))
        out = padded[:, 0, 0, :, :height, :width].clone()
        for ky, kx in ((ky, kx) for ky in range(k) for kx in range(k) if ky or kx):
            out += padded[:, ky, kx, :, ky:ky + height, kx:kx + width]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        b, n, height, width = ctx.shape
        k, p = ctx.k, ctx.k // 2
        padded = grad.new_zeros(b, k, k, n // (k * k), height + 2 * p, width + 2 * p)
        for ky in range(k):
            for kx in range(k):
                padded[:, ky, kx, :, ky:ky + height, kx:kx + width] = grad
        return torch.ops.aten.reflection_pad2d_backward(padded.flatten(1, 3), grad.new_empty(ctx.shape), [p] * 4), None


def supported(net: SSIU) -> bool:
    """Whether the kernels' backward formulas cover ``net``'s ESAMs (its other parts the engine has checked)."""
    for step in net.body:
        esam = step.s3
        dim, window = step.norm.body.normalized_shape[0] // esam.num_heads, esam.block_size + 2 * esam.halo
        if dim % 16 or dim > MAX_HEAD_DIM or window * window > MAX_KEYS:
            return False
    return True


def depthwise(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a reflect-padded depthwise convolution of a channels-last NCHW map."""
    return DepthwiseReflect.apply(x.permute(0, 2, 3, 1), conv.weight, conv.bias).permute(0, 3, 1, 2)


def conv1x1(conv: nn.Conv2d, x: torch.Tensor, add: torch.Tensor | None = None) -> torch.Tensor:
    """``conv(x)`` (plus ``add``) for a 1x1 convolution of a channels-last NCHW map (:class:`Conv1x1`)."""
    return Conv1x1.apply(x, conv.weight, conv.bias, add)


def input_projections(x: torch.Tensor, *msgms: MSGM, residual: torch.Tensor | None = None,
                      keep: bool = False) -> tuple[torch.Tensor, ...]:
    """``W_1 x`` and ``W_2 x`` of each MSGM reading ``x``, in order, then ``x + residual`` if given, or ``x`` itself
    with ``keep``, for another use of x (:class:`SharedInputConv1x1`)."""
    convs = [conv for m in msgms for conv in (m.project_in1, m.project_in2[0])]
    return SharedInputConv1x1.apply(x, residual if residual is not None else keep,
                                    *[p for conv in convs for p in (conv.weight, conv.bias)])


def msgm(m: MSGM, x: torch.Tensor, add: torch.Tensor | None = None,
         projections: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """:meth:`MSGM.forward` (plus ``add``), its depthwise convolution and gate kernels; ``projections`` are
    ``W_1 x`` and ``W_2 x`` where :func:`input_projections` computed them."""
    h, t = projections or input_projections(x, m)
    _, dw, w3 = m.project_in2
    u = conv1x1(w3, depthwise(dw, t))
    return GatedConv1x1.apply(h, u, m.project_out.weight, m.project_out.bias, add)


def esam_update(m: ESAM, v: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``v + ESAM(v) - b`` (:meth:`ESAM.forward`), its attention one kernel and its upsampling fused with the sums, and
    ``b`` for its later uses (see :class:`UpsampleUpdate`)."""
    if isinstance(m.pool, nn.MaxPool2d):  # 2x2 windows at a stride of 2 or more (the engine checked)
        pooled, v = PoolKeep.apply(v, m.pool.stride)
    else:
        pooled = m.pool(v)
    qkv = conv1x1(m.qkv_conv, pooled).permute(0, 2, 3, 1)  # (B, h, w, 3 C): the channels-last map's memory
    window = m.block_size + 2 * m.halo
    embedding = m.key_embedding().view(window, window, -1)
    out = HaloAttention.apply(qkv, embedding, m.num_heads, m.block_size, m.halo).permute(0, 3, 1, 2)
    if isinstance(m.LocalProp, nn.Identity):
        return v + out - b, b
    dw, _ = m.LocalProp  # then the bilinear upsampling (aligned corners) to v's size
    return UpsampleUpdate.apply(depthwise(dw, out), v, b)


def step(s: SSRMStep, a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """:meth:`SSRMStep.forward`, its residual sums in the convolutions' epilogues and the upsampling pass."""
    norm = s.norm.body
    a = ChannelNorm.apply(a, norm.weight, norm.bias, norm.eps)
    h1, t1, h2, t2, a_y = input_projections(a, s.s1, s.s2, residual=y)
    v = msgm(s.s1, a, add=a_y, projections=(h1, t1))  # a + z + y
    b = msgm(s.s2, a, projections=(h2, t2))
    w, b = esam_update(s.s3, v, b)  # v + ESAM(v) - b
    a = msgm(s.s4, w, add=b)  # MSGM_4(w) + b
    h, t, a_kept = input_projections(a, s.ffn, keep=True)
    return msgm(s.ffn, a, add=a_kept, projections=(h, t))  # a + MSGM_ffn(a)


def tail(t: nn.Sequential, feat: torch.Tensor) -> torch.Tensor:
    """``t(feat)`` for the tail's (1x1 convolution, PixelShuffle(r), GELU) stages and final k x k convolution, on a
    channels-last NCHW map, without a full-width map at the output's resolution: 1x1 products and GELU commute with
    pixel shuffling, so every stage runs on the unshuffled map (its weight's rows reordered to sub-pixel-major), the
    final convolution's k² taps are one more 1x1 product (:class:`Conv1x1`, k k C_out channels), and only those are
    shuffled, then summed shifted (:class:`TapSum`)."""
    *stages, last = t
    b, _, h, w = feat.shape
    factors = []
    for conv, shuffle in zip(stages[0::3], stages[1::3]):
        r = shuffle.upscale_factor
        c = conv.out_channels // (r * r)
        weight = conv.weight.view(c, r, r, -1).permute(1, 2, 0, 3).reshape(conv.out_channels, -1, 1, 1)
        bias = conv.bias.view(c, r, r).permute(1, 2, 0).reshape(-1)
        out = F.gelu(Conv1x1.apply(feat, weight, bias, None))  # (B, r r c, h, w R): memory (B, h, w, R, r, r, c)
        feat = out.permute(0, 2, 3, 1).reshape(b, h, -1, c).permute(0, 3, 1, 2)  # (B, c, h, w R r r)
        factors.append(r)
    k, o = last.kernel_size[0], last.out_channels
    taps = Conv1x1.apply(feat, last.weight.permute(2, 3, 0, 1).reshape(k * k * o, -1, 1, 1), None, None)
    # (B, h, w, i_1, j_1, i_2, j_2, ..., taps) -> (B, h, i_1, i_2, ..., w, j_1, j_2, ..., taps): the pixel shuffles
    n = len(factors)
    taps = taps.permute(0, 2, 3, 1).reshape(b, h, w, *(r for r in factors for _ in 'ij'), k * k * o)
    order = [0, 1, *range(3, 3 + 2 * n, 2), 2, *range(4, 4 + 2 * n, 2), 3 + 2 * n]
    scale = math.prod(factors)
    taps = taps.permute(order).reshape(b, h * scale, w * scale, -1).permute(0, 3, 1, 2)
    return TapSum.apply(taps, k) + last.bias.view(1, -1, 1, 1)


def moe(m: MoEFeatureSelector, experts: list[torch.Tensor], y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:meth:`MoEFeatureSelector.forward` plus ``y``, as the tail reads it: ``fuse(mixed) + mixed + y`` and the gates
    (B, 3, C, H, W), the gated sum and both residual sums in one pass (:class:`MoEMix`)."""
    def nhwc(t: torch.Tensor) -> torch.Tensor:
        return t.permute(0, 2, 3, 1)

    logits = [conv1x1(fc, e) for fc, e in zip((m.fc_a, m.fc_b, m.fc_c), experts)]
    mixed, skip, gates = MoEMix.apply(nhwc(y), *map(nhwc, logits), *map(nhwc, experts))
    return conv1x1(m.fuse, mixed.permute(0, 3, 1, 2), add=skip.permute(0, 3, 1, 2)), gates.permute(0, 3, 4, 1, 2)


def forward(net: SSIU, x: torch.Tensor, return_aux: bool = False):
    """:meth:`SSIU.forward` with the steps of :func:`step`."""
    h, w = x.shape[-2:]
    s = net.upscale
    x = pad_to_multiple(x, net.pad_multiple).contiguous(memory_format=torch.channels_last)
    y = net.head(x)
    a, estimates = y, {0: y}
    for index, block in enumerate(net.body, start=1):
        a = step(block, a, y)
        if index in net.expert_steps:
            estimates[index] = a
    experts = [estimates[index] for index in net.expert_steps]
    fused, gates = moe(net.moe, experts, y)
    skip = F.interpolate(x, scale_factor=s, mode='bilinear', align_corners=False)
    out = (tail(net.tail, fused) + skip)[..., :h * s, :w * s]
    if not return_aux:
        return out
    steps = [(tail(net.tail, e + y) + skip)[..., :h * s, :w * s] for e in experts]
    return out, {'gates': gates[..., :h, :w], 'step_outputs': steps}
