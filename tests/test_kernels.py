"""Compiled CPU kernels: each equals the modules or standard operators it replaces, and bad input is refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssiu_arch.archs.ssiu_arch import ESAM, MSGM
from ssiu_arch.cpu import kernels


def nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1)


def nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def test_kernels_are_built():
    assert kernels.available(), f'compiled kernels missing: {kernels.status()[1]}'


@pytest.mark.parametrize('k, channels, size', [(3, 64, (13, 21)), (5, 20, (9, 7)), (1, 16, (4, 5)), (7, 33, (8, 8))])
def test_depthwise_reflect_matches_padded_convolution(k, channels, size):
    x = torch.randn(2, *size, channels)
    weight, bias = torch.randn(channels, 1, k, k), torch.randn(channels)
    p = k // 2
    ref = F.conv2d(F.pad(x.permute(0, 3, 1, 2), (p,) * 4, mode='reflect'), weight, bias, groups=channels)
    ref = ref.permute(0, 2, 3, 1)
    assert (kernels.depthwise_reflect(x, weight, bias, 0, size[0]) - ref).abs().max() <= 1e-5
    # Rows r.. of the map: a band with its halo above and the map's bottom border, where rows are reflected.
    r = p + 1
    out = kernels.depthwise_reflect(x[:, r - p:].contiguous(), weight, None, p, size[0] - r)
    assert (out + bias - ref[:, r:]).abs().max() <= 1e-5


def test_depthwise_reflect_refuses_bad_input():
    x = torch.randn(1, 2, 9, 16)
    with pytest.raises(RuntimeError, match='too small to reflect-pad'):
        kernels.depthwise_reflect(x, torch.randn(16, 1, 5, 5), None, 0, 2)
    with pytest.raises(RuntimeError, match='weight must be'):
        kernels.depthwise_reflect(x, torch.randn(8, 1, 3, 3), None, 0, 2)
    with pytest.raises(RuntimeError, match='outside the 2 input rows'):
        kernels.depthwise_reflect(x, torch.randn(16, 1, 3, 3), None, 1, 2)
    with pytest.raises(RuntimeError, match='kernel size must be'):
        kernels.depthwise_reflect(torch.randn(1, 12, 12, 4), torch.randn(4, 1, 9, 9), None, 0, 12)


@pytest.mark.parametrize('low_hw, height', [((4, 6), 8), ((5, 7), 10), ((1, 3), 2)])
def test_upsample_combine_matches_resize_plus_update(low_hw, height):
    low = torch.randn(2, *low_hw, 24)
    width = low_hw[1] * 2
    v, b = torch.randn(2, height, width, 24), torch.randn(2, height, width, 24)
    up = F.interpolate(low.permute(0, 3, 1, 2), size=(height, width), mode='bilinear', align_corners=True)
    ref = up.permute(0, 2, 3, 1) + v - b
    assert (kernels.upsample_combine(low, v, b, 0, height) - ref).abs().max() <= 1e-5
    rows = slice(1, height)
    part = kernels.upsample_combine(low, v[:, rows].contiguous(), b[:, rows].contiguous(), 1, height)
    assert (part - ref[:, rows]).abs().max() <= 1e-5


@pytest.mark.parametrize('channels, heads, block, halo, size', [
    (64, 4, 8, 1, (16, 24)), (32, 2, 4, 2, (8, 12)), (40, 5, 8, 1, (8, 8)), (96, 3, 8, 0, (16, 16)),
])
def test_halo_attention_matches_the_attention_module(channels, heads, block, halo, size):
    esam = ESAM(channels, heads, block, halo, downsample=1).eval()  # no pooling: the attention alone
    x = torch.randn(2, channels, *size) * 3  # peaked softmax: exercises the exp and the maximum
    window, half = block + 2 * halo, channels // heads // 2
    embedding = torch.cat([esam.rel_h[0].expand(-1, window, -1), esam.rel_w[0].expand(window, -1, -1)], dim=-1)
    assert embedding.shape == (window, window, 2 * half)
    with torch.no_grad():
        qkv = nhwc(esam.qkv_conv(x)).contiguous()
        out = kernels.halo_attention(qkv, embedding, heads, block, halo)
        assert (out - nhwc(esam(x))).abs().max() <= 2e-5


def test_halo_attention_refuses_bad_input():
    qkv = torch.randn(1, 12, 16, 48)
    with pytest.raises(RuntimeError, match='not made of 8x8 blocks'):
        kernels.halo_attention(qkv, torch.randn(10, 10, 4), 4, 8, 1)
    with pytest.raises(RuntimeError, match='embedding must be'):
        kernels.halo_attention(torch.randn(1, 8, 8, 48), torch.randn(9, 9, 4), 4, 8, 1)


@pytest.mark.parametrize('channels, heads, block, halo, size', [
    (64, 4, 8, 1, (16, 24)), (32, 2, 4, 2, (8, 12)), (32, 1, 8, 1, (8, 16)), (96, 3, 8, 0, (16, 16)),
])
def test_halo_attention_backward_is_the_gradient_of_the_attention_module(channels, heads, block, halo, size):
    torch.manual_seed(0)
    esam = ESAM(channels, heads, block, halo, downsample=1)  # no pooling: the attention alone
    x = torch.randn(2, channels, *size) * 2
    qkv = nhwc(esam.qkv_conv(x)).detach().contiguous().requires_grad_()
    window = block + 2 * halo
    embedding = esam.key_embedding()  # (window², head_dim), a function of rel_h and rel_w
    out = nhwc(esam.LocalProp(esam_attention_of(esam, qkv, embedding)))
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, (qkv, esam.rel_h, esam.rel_w), grad)
    dqkv, dembedding = torch.ops.ssiu.halo_attention_backward(grad, qkv.detach(), embedding.detach().view(
        window, window, -1), heads, block, halo)
    got = (dqkv, *torch.autograd.grad(embedding, (esam.rel_h, esam.rel_w), dembedding.view(window * window, -1)))
    for g, e in zip(got, expected):
        assert (g - e).norm() <= 2e-6 * e.norm()


def esam_attention_of(esam: ESAM, qkv: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
    """The attention module's product and softmax on a channels-last qkv map, in standard operators (NCHW out)."""
    c, heads, block, window = qkv.shape[-1] // 3, esam.num_heads, esam.block_size, esam.block_size + 2 * esam.halo
    q, k, v = nchw(qkv).split(c, dim=1)
    b, _, h, w = q.shape
    q = q.reshape(b, heads, c // heads, h // block, block, w // block, block).permute(0, 3, 5, 1, 4, 6, 2)
    q = q.reshape(-1, heads, block * block, c // heads) * esam.scale
    k, v = (esam.windows(t).reshape(b, heads, c // heads, h // block, window, w // block, window)
            .permute(0, 3, 5, 1, 4, 6, 2).reshape(-1, heads, window * window, c // heads) for t in (k, v))
    out = ((q @ (k + embedding).transpose(-2, -1)).softmax(-1) @ v)
    out = out.reshape(b, h // block, w // block, heads, block, block, c // heads).permute(0, 3, 6, 1, 4, 2, 5)
    return out.reshape(b, c, h, w)


def test_halo_attention_backward_refuses_what_it_was_not_written_for():
    qkv, grad = torch.randn(1, 8, 8, 96), torch.randn(1, 8, 8, 32)
    with pytest.raises(RuntimeError, match='heads of 16, 32'):
        torch.ops.ssiu.halo_attention_backward(grad, qkv, torch.randn(10, 10, 8), 4, 8, 1)
    with pytest.raises(RuntimeError, match='at most 128 keys'):
        torch.ops.ssiu.halo_attention_backward(grad, qkv, torch.randn(12, 12, 16), 2, 8, 2)
    with pytest.raises(RuntimeError, match='grad must be'):
        torch.ops.ssiu.halo_attention_backward(grad[..., :16], qkv, torch.randn(10, 10, 16), 2, 8, 1)


@pytest.mark.parametrize('k, channels, size', [(3, 64, (13, 21)), (5, 32, (9, 7)), (1, 16, (4, 5)), (7, 48, (8, 11)),
                                             (3, 16, (2, 3))])
def test_depthwise_reflect_backward_is_the_gradient_of_the_padded_convolution(k, channels, size):
    conv = torch.nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels, padding_mode='reflect').double()
    x = torch.randn(3, channels, *size, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(3, channels, *size, dtype=torch.float64)
    expected = torch.autograd.grad(conv(x), (x, conv.weight, conv.bias), grad)  # float64: the exact gradient
    got = torch.ops.ssiu.depthwise_reflect_backward(nhwc(grad).float().contiguous(),
                                                   nhwc(x.detach()).float().contiguous(), conv.weight.detach().float())
    for g, e in zip((nchw(got[0]), got[1], got[2]), expected):
        assert (g.double() - e).norm() <= 1e-6 * e.norm()


def test_depthwise_reflect_backward_refuses_bad_input():
    x, w = torch.randn(1, 6, 6, 32), torch.randn(32, 1, 3, 3)
    with pytest.raises(RuntimeError, match='C a multiple of 16'):
        torch.ops.ssiu.depthwise_reflect_backward(x[..., :20], x[..., :20], w[:20])
    with pytest.raises(RuntimeError, match='shaped as x'):
        torch.ops.ssiu.depthwise_reflect_backward(x[:, :5], x, w)
    with pytest.raises(RuntimeError, match='kernel size must be'):
        torch.ops.ssiu.depthwise_reflect_backward(x, x, torch.randn(32, 1, 4, 4))
    with pytest.raises(RuntimeError, match='too small'):
        torch.ops.ssiu.depthwise_reflect_backward(x[:, :2], x[:, :2], torch.randn(32, 1, 5, 5))


@pytest.mark.parametrize('pixels, c_in, c_out', [(8 * 33 * 17, 64, 64), (4099, 48, 192), (130, 80, 5), (3, 16, 7),
                                                  (20000, 32, 13)])
@pytest.mark.parametrize('threads', [1, 2])
def test_linear_backward_is_the_gradient_of_a_linear_map(pixels, c_in, c_out, threads):
    """Every column width (1-4 vectors of 16, and past 64), row tiles of 6 and their remainders, chunks of 64 rows
    and their remainder, one partial sum per thread: against float64."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x, g, w = torch.randn(pixels, c_in), torch.randn(pixels, c_out), torch.randn(c_out, c_in)
        dx, dw, db = torch.ops.ssiu.linear_backward(g, x, w)
        no_dx, dw_alone, _ = torch.ops.ssiu.linear_backward(g, x, None)
    finally:
        torch.set_num_threads(saved)
    ref_x, ref_w, ref_b = g.double() @ w.double(), g.double().t() @ x.double(), g.double().sum(0)
    assert dx.shape == (pixels, c_in) and dw.shape == (c_out, c_in) and db.shape == (c_out,)
    assert (dx.double() - ref_x).abs().max() <= 1e-5 * ref_x.abs().max()
    assert (dw.double() - ref_w).norm() <= 1e-6 * ref_w.norm()  # sums of chunk sums: no long float32 chains
    assert (db.double() - ref_b).abs().max() <= 1e-5 * ref_b.abs().max()
    assert no_dx is None and torch.equal(dw_alone, dw)


def test_conv1x1_backward_is_the_convolution_gradient():
    """The NCHW wrapper: channels-last maps read in place, other layouts copied; against oneDNN's backward."""
    x = torch.randn(3, 32, 11, 9).contiguous(memory_format=torch.channels_last)
    g = torch.randn(3, 24, 11, 9).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(24, 32, 1, 1)
    ref = torch.ops.aten.convolution_backward(g, x, weight, [24], [1, 1], [0, 0], [1, 1], False, [0, 0], 1,
                                              [True, True, True])
    for a, b in ((x, g), (x.contiguous(), g.contiguous())):
        dx, dweight, dbias = kernels.conv1x1_backward(b, a, weight)
        assert dx.shape == x.shape and dx.is_contiguous(memory_format=torch.channels_last)
        for got, expected in zip((dx, dweight.view_as(weight), dbias), ref):
            assert (got - expected).abs().max() <= 1e-4
    assert kernels.conv1x1_backward(g, x, None)[0] is None


@pytest.mark.parametrize('outs, with_add', [((64, 64, 64, 64), True), ((24,), False), ((48, 16), False)])
def test_shared_conv1x1_backward_sums_the_input_gradients(outs, with_add):
    x = torch.randn(3, 32, 29, 31).contiguous(memory_format=torch.channels_last).requires_grad_()
    weights = [torch.randn(o, 32, 1, 1).requires_grad_() for o in outs]
    biases = [torch.randn(o).requires_grad_() for o in outs]
    outputs = [F.conv2d(x, w, b) for w, b in zip(weights, biases)]
    grads = [torch.randn_like(out) for out in outputs]
    add = torch.randn_like(x) if with_add else None
    expected = torch.autograd.grad(outputs, [x, *weights, *biases], grads)
    dx, dweights, dbiases = kernels.shared_conv1x1_backward(grads, x.detach(), [w.detach() for w in weights], add)
    assert dx.is_contiguous(memory_format=torch.channels_last)
    got = [dx - (add if with_add else 0), *(d.view_as(w) for d, w in zip(dweights, weights)), *dbiases]
    for a, b in zip(got, expected):
        assert (a - b).abs().max() <= 1e-5 * (1 + float(b.abs().max()))


def test_linear_backward_shared_refuses_bad_input():
    x = torch.randn(10, 16)
    with pytest.raises(RuntimeError, match='one weight for each'):
        torch.ops.ssiu.linear_backward_shared([torch.randn(10, 4)], x, [], None)
    with pytest.raises(RuntimeError, match='multiple of 16'):
        torch.ops.ssiu.linear_backward_shared([torch.randn(10, 4)], torch.randn(10, 24), [torch.randn(4, 24)], None)
    with pytest.raises(RuntimeError, match="x's 10 rows"):
        torch.ops.ssiu.linear_backward_shared([torch.randn(9, 4)], x, [torch.randn(4, 16)], None)
    with pytest.raises(RuntimeError, match='weight 1 must be'):
        torch.ops.ssiu.linear_backward_shared([torch.randn(10, 4)] * 2, x, [torch.randn(4, 16), torch.randn(5, 16)],
                                              None)
    with pytest.raises(RuntimeError, match='add must be'):
        torch.ops.ssiu.linear_backward_shared([torch.randn(10, 4)], x, [torch.randn(4, 16)], torch.randn(9, 16))


def test_linear_backward_refuses_bad_input():
    with pytest.raises(RuntimeError, match='multiple of 16'):
        torch.ops.ssiu.linear_backward(torch.randn(10, 4), torch.randn(10, 24), None)
    with pytest.raises(RuntimeError, match='same rows'):
        torch.ops.ssiu.linear_backward(torch.randn(10, 4), torch.randn(11, 16), None)
    with pytest.raises(RuntimeError, match='float32'):
        torch.ops.ssiu.linear_backward(torch.randn(10, 4).double(), torch.randn(10, 16).double(), None)
    with pytest.raises(RuntimeError, match='weight must be'):
        torch.ops.ssiu.linear_backward(torch.randn(10, 4), torch.randn(10, 16), torch.randn(16, 4))


@pytest.mark.parametrize('batch, c_in, c_out, size', [(3, 32, 24, (11, 9)), (2, 48, 64, (40, 50))])
def test_gated_conv1x1_backward_is_the_gradient_of_the_projected_gate(batch, c_in, c_out, size):
    h = (torch.randn(batch, c_in, *size) * 3).contiguous(memory_format=torch.channels_last).requires_grad_()
    u = torch.randn(batch, c_in, *size).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(c_out, c_in, 1, 1).requires_grad_()
    bias = torch.randn(c_out).requires_grad_()
    gate = F.gelu(h) * u
    out = F.conv2d(gate, weight, bias)
    grad = torch.randn_like(out)
    expected = torch.autograd.grad(out, (h, u, weight, bias), grad)
    dh, du, dweight, dbias = kernels.gated_conv1x1_backward(grad, *(t.detach() for t in (gate, h, u, weight)))
    assert dh.is_contiguous(memory_format=torch.channels_last) and du.shape == u.shape
    for got, ref in zip((dh, du, dweight.view_as(weight), dbias), expected):
        assert (got - ref).abs().max() <= 1e-5 * (1 + float(ref.abs().max()))


def test_gated_linear_backward_refuses_bad_input():
    g, x, w = torch.randn(10, 4), torch.randn(10, 16), torch.randn(4, 16)
    with pytest.raises(RuntimeError, match='multiple of 16'):
        torch.ops.ssiu.gated_linear_backward(g, torch.randn(10, 24), torch.randn(10, 24), torch.randn(10, 24),
                                             torch.randn(4, 24))
    with pytest.raises(RuntimeError, match='rows'):
        torch.ops.ssiu.gated_linear_backward(torch.randn(9, 4), x, x, x, w)
    with pytest.raises(RuntimeError, match='one shape'):
        torch.ops.ssiu.gated_linear_backward(g, x, torch.randn(10, 32), x, w)
    with pytest.raises(RuntimeError, match='weight must be'):
        torch.ops.ssiu.gated_linear_backward(g, x, x, x, torch.randn(16, 4))


@pytest.mark.parametrize('pixels, channels', [(37, 64), (4100, 32)])
def test_layer_norm_rows_and_backward_match_layer_norm(pixels, channels):
    x = (torch.randn(pixels, channels) * 3 + 1).requires_grad_()
    weight, bias = torch.randn(channels).requires_grad_(), torch.randn(channels).requires_grad_()
    ref = F.layer_norm(x, (channels,), weight, bias, 1e-6)
    grad = torch.randn_like(ref)
    expected = torch.autograd.grad(ref, (x, weight, bias), grad)
    out, mean, rstd = torch.ops.ssiu.layer_norm_rows_forward(x.detach(), weight.detach(), bias.detach(), 1e-6)
    assert (out - ref).abs().max() <= 1e-5
    got = torch.ops.ssiu.layer_norm_rows_backward(grad, x.detach(), mean, rstd, weight.detach())
    for a, b in zip(got, expected):
        assert (a - b).abs().max() <= 1e-5 * (1 + float(b.abs().max()))


def test_layer_norm_rows_refuses_bad_input():
    x, w = torch.randn(8, 24), torch.randn(24)
    with pytest.raises(RuntimeError, match='multiple of 16'):
        torch.ops.ssiu.layer_norm_rows_forward(x, w, w, 1e-6)
    x, w = torch.randn(8, 16), torch.randn(16)
    with pytest.raises(RuntimeError, match='weight and bias'):
        torch.ops.ssiu.layer_norm_rows_forward(x, w[:8], w, 1e-6)
    with pytest.raises(RuntimeError, match='of one shape'):
        torch.ops.ssiu.layer_norm_rows_backward(torch.randn(7, 16), x, torch.ones(8), torch.ones(8), w)
    with pytest.raises(RuntimeError, match='mean and rstd'):
        torch.ops.ssiu.layer_norm_rows_backward(x, x, torch.ones(7), torch.ones(8), w)


@pytest.mark.parametrize('size, stride', [((8, 12), 2), ((9, 7), 2), ((11, 10), 3)])
def test_max_pool2_and_its_backward_match_max_pooling(size, stride):
    x = torch.randn(2, 32, *size).contiguous(memory_format=torch.channels_last).requires_grad_()
    ref = F.max_pool2d(x, 2, stride)
    grad, other = torch.randn_like(ref), torch.randn_like(x)
    expected, = torch.autograd.grad(ref, x, grad)
    out, argmax = torch.ops.ssiu.max_pool2(nhwc(x.detach()), stride)
    assert torch.equal(nchw(out), ref)
    got = torch.ops.ssiu.max_pool2_backward(nhwc(grad), argmax, None, *size, stride)
    assert torch.equal(nchw(got), expected)
    summed = torch.ops.ssiu.max_pool2_backward(nhwc(grad), argmax, nhwc(other), *size, stride)
    assert torch.allclose(nchw(summed), expected + other, atol=1e-6)
    x = torch.zeros(1, 2, 2, 16)  # ties: the first of equal values, as ATen
    x[0, 1, 1, :8] = 1
    assert torch.ops.ssiu.max_pool2(x, 2)[1].flatten().tolist() == [3] * 8 + [0] * 8


def test_max_pool2_refuses_bad_input():
    with pytest.raises(RuntimeError, match='multiple of 16'):
        torch.ops.ssiu.max_pool2(torch.randn(1, 4, 4, 8), 2)
    with pytest.raises(RuntimeError, match='stride of 2 or more'):
        torch.ops.ssiu.max_pool2(torch.randn(1, 4, 4, 16), 1)
    out, argmax = torch.ops.ssiu.max_pool2(torch.randn(1, 4, 4, 16), 2)
    with pytest.raises(RuntimeError, match='does not come from'):
        torch.ops.ssiu.max_pool2_backward(out, argmax, None, 6, 4, 2)
    with pytest.raises(RuntimeError, match='add must be'):
        torch.ops.ssiu.max_pool2_backward(out, argmax, torch.randn(1, 4, 5, 16), 4, 4, 2)
    with pytest.raises(RuntimeError, match='argmax int32'):
        torch.ops.ssiu.max_pool2_backward(out, argmax.float(), None, 4, 4, 2)


def test_gelu_gate_and_its_backward_match_autograd():
    h = (torch.randn(2, 7, 5, 32) * 4).requires_grad_()  # GELU's whole range, tails included
    u = torch.randn(2, 7, 5, 32).requires_grad_()
    ref = F.gelu(h) * u
    grad = torch.randn_like(ref)
    dh, du = torch.autograd.grad(ref, (h, u), grad)
    assert (torch.ops.ssiu.gelu_gate(h.detach(), u.detach()) - ref).abs().max() <= 2e-6
    got_dh, got_du = torch.ops.ssiu.gelu_gate_backward(grad, h.detach(), u.detach())
    assert (got_dh - dh).abs().max() <= 2e-6 * dh.abs().max()
    assert (got_du - du).abs().max() <= 2e-6 * du.abs().max()
    with pytest.raises(RuntimeError, match='of one shape'):
        torch.ops.ssiu.gelu_gate(h.detach(), u.detach()[:1])
    with pytest.raises(RuntimeError, match='contiguous'):
        torch.ops.ssiu.gelu_gate(h.detach().transpose(1, 2), u.detach().transpose(1, 2))


@pytest.mark.parametrize('channels, residual', [(64, True), (20, False)])
def test_moe_combine_matches_softmax_gating(channels, residual):
    logits = [torch.randn(2, 5, 7, channels) * 4 for _ in range(3)]
    experts = [torch.randn(2, 5, 7, channels) for _ in range(3)]
    skip = torch.randn(2, 5, 7, channels) if residual else None
    gates_ref = torch.stack(logits, dim=-2).softmax(dim=-2)
    out_ref = sum(gates_ref[..., i, :] * e for i, e in enumerate(experts))
    out, summed, gates = kernels.moe_combine(logits, experts, skip, True)
    assert (out - out_ref).abs().max() <= 1e-5
    assert (summed - (out_ref if skip is None else out_ref + skip)).abs().max() <= 1e-5
    assert (gates - gates_ref).abs().max() <= 1e-6
    assert kernels.moe_combine(logits, experts, skip, False)[2] is None


@pytest.mark.parametrize('channels, n, with_skip, with_gates', [(64, 3, True, True), (20, 3, False, False),
                                                                  (48, 2, True, False)])
def test_moe_combine_backward_is_the_gradient_of_softmax_gating(channels, n, with_skip, with_gates):
    logits = [(torch.randn(2, 5, 7, channels) * 4).requires_grad_() for _ in range(n)]
    experts = [torch.randn(2, 5, 7, channels).requires_grad_() for _ in range(n)]
    gates = torch.stack(logits, dim=-2).softmax(dim=-2)
    out = sum(gates[..., i, :] * e for i, e in enumerate(experts))
    grad, grad_skip, grad_gates = torch.randn_like(out), torch.randn_like(out), torch.randn_like(gates)
    total = (out * grad).sum() + (out * grad_skip).sum() * with_skip + (gates * grad_gates).sum() * with_gates
    expected = torch.autograd.grad(total, logits + experts)
    dlogits, dexperts = kernels.moe_combine_backward(grad, grad_skip if with_skip else None, gates.detach(),
                                                     grad_gates if with_gates else None, [e.detach() for e in experts])
    for got, ref in zip(dlogits + dexperts, expected):
        assert (got - ref).abs().max() <= 1e-5


def test_moe_combine_backward_refuses_bad_input():
    grad, gates, experts = torch.randn(1, 4, 4, 16), torch.rand(1, 4, 4, 3, 16), [torch.randn(1, 4, 4, 16)] * 3
    with pytest.raises(RuntimeError, match='gates must be'):
        torch.ops.ssiu.moe_combine_backward(grad, None, gates[..., :2, :], None, experts)
    with pytest.raises(RuntimeError, match='every expert must be'):
        torch.ops.ssiu.moe_combine_backward(grad, None, gates, None, experts[:2] + [torch.randn(1, 4, 5, 16)])
    with pytest.raises(RuntimeError, match='grad_skip must be'):
        torch.ops.ssiu.moe_combine_backward(grad, grad.double(), gates, None, experts)
    with pytest.raises(RuntimeError, match='1 to 8 experts'):
        torch.ops.ssiu.moe_combine_backward(grad, None, gates, None, [])


def msgm_weights(msgm: MSGM) -> list[torch.Tensor]:
    """The fused kernel's weight arguments from an MSGM: matrices and the depthwise kernel, up to ``W_o``."""
    reduce, depthwise, expand = msgm.project_in2
    return [t.detach() for t in (msgm.project_in1.weight.flatten(1), msgm.project_in1.bias, reduce.weight.flatten(1),
                                 reduce.bias, depthwise.weight, depthwise.bias, expand.weight.flatten(1), expand.bias,
                                 msgm.project_out.weight.flatten(1))]


@pytest.mark.parametrize('channels, expansion, k, size', [(64, 1.0, 3, (20, 24)), (32, 2.0, 5, (9, 7)),
                                                          (48, 1.0, 3, (5, 33))])
def test_fused_msgm_matches_the_module(channels, expansion, k, size):
    msgm = MSGM(channels, expansion, k).eval()
    x, add = torch.randn(2, *size, channels), torch.randn(2, size[0] - 3, size[1], channels)
    weights, bias = msgm_weights(msgm), msgm.project_out.bias.detach()
    p = k // 2
    band = x[:, 3 - p:].contiguous()  # rows 3.. with the halo above them, reflected at the bottom
    with torch.no_grad():
        expected = nhwc(msgm(nchw(x)))
        whole = kernels.msgm(x, *weights, bias, None, False, 0, size[0], 1536)
        banded = kernels.msgm(band, *weights, bias, add, True, p, size[0] - 3, 1536)
        norm = torch.nn.LayerNorm(channels, eps=1e-6)
        norm.weight.normal_(1, 0.2), norm.bias.normal_(0, 0.2)
        normed = kernels.msgm(x, *weights, None, None, True, 0, size[0], 64, norm=norm)
        expected_normed = norm(x) + nhwc(msgm(nchw(norm(x)))) - bias
    assert (whole - expected).abs().max() <= 1e-5
    assert (banded - expected[:, 3:] - add - x[:, 3:]).abs().max() <= 1e-5
    assert (normed - expected_normed).abs().max() <= 1e-5


def test_fused_msgm_refuses_bad_input():
    args = msgm_weights(MSGM(16).eval())
    with pytest.raises(RuntimeError, match='weight shapes do not fit a 8-channel input'):
        kernels.msgm(torch.randn(1, 6, 6, 8), *args, None, None, False, 0, 6, 1536)
    with pytest.raises(RuntimeError, match='add must be'):
        kernels.msgm(torch.randn(1, 6, 6, 16), *args, None, torch.randn(1, 5, 6, 16), False, 0, 6, 1536)


def test_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv('SSIU_NO_KERNELS', '1')
    monkeypatch.setattr(kernels, '_LOADED', None)
    assert not kernels.available()


NEEDS_BF16 = pytest.mark.skipif(not kernels.bf16_available(), reason='the CPU lacks avx512_bf16 (bfloat16 kernels)')


def bf16(t: torch.Tensor) -> torch.Tensor:
    """``t`` rounded to bfloat16 (nearest even), as float32."""
    return t.bfloat16().float()


def test_bf16_support_is_the_cpus():
    from ssiu_arch.utils.cpu_features import cpu_flags

    flags = cpu_flags()
    if flags is None or not {'avx512f', 'sse2'} & flags:
        pytest.skip('not an x86 Linux CPU')
    assert torch.ops.ssiu.bf16_supported() == ('avx512_bf16' in flags)
    assert ('bfloat16 products: yes' in kernels.status_line()) == kernels.bf16_available()


@NEEDS_BF16
@pytest.mark.parametrize('shape, c_out', [((2, 37, 45, 64), 192), ((7, 16), 32), ((1, 1, 5, 32), 16)])
def test_linear_bf16_is_the_product_of_rounded_operands(shape, c_out):
    x, weight, bias = torch.randn(shape), torch.randn(c_out, shape[-1]) * 0.2, torch.randn(c_out)
    expected = bf16(x) @ bf16(weight).T + bias  # float32 accumulation of the exact products
    add = torch.randn(expected.shape)
    assert (kernels.linear_bf16(x, weight, bias) - expected).abs().max() <= 1e-4
    assert (kernels.linear_bf16(x, weight, None) - expected + bias).abs().max() <= 1e-4
    assert (kernels.linear_bf16(x, weight, bias, add=add) - expected - add).abs().max() <= 1e-4
    assert (kernels.linear_bf16(x, weight, bias, gelu=True) - F.gelu(expected)).abs().max() <= 1e-4
    assert (kernels.linear_bf16(x, weight, bias) - (x @ weight.T + bias)).abs().max() > 1e-4  # really bfloat16


@NEEDS_BF16
@pytest.mark.parametrize('pixels, c1, c2, n', [(2 * 9 * 13, 256, 64, 32), (7, 64, 16, 16), (61, 96, 32, 48)])
def test_gelu_product_bf16_is_two_products_of_rounded_operands(pixels, c1, c2, n):
    x, w1, b1, w2 = torch.randn(pixels, 32), torch.randn(c1, 32) * 0.2, torch.randn(c1), torch.randn(n, c2) * 0.2
    hidden = F.gelu(bf16(x) @ bf16(w1).T + b1).reshape(-1, c2)
    expected = bf16(hidden) @ bf16(w2).T
    exact = F.gelu(x @ w1.T + b1).reshape(-1, c2) @ w2.T
    got = kernels.gelu_product_bf16(x, w1, b1, w2)
    assert got.shape == (pixels * c1 // c2, n)
    # The kernel's GELU is within 2e-5 of the exact one, so a hidden value next to a rounding boundary may round to
    # the neighbouring bfloat16 value: rare one-unit changes, and no farther from float32 math than `expected`.
    assert (got - expected).abs().mean() <= 1e-4
    assert (got - exact).abs().max() <= 1.05 * (expected - exact).abs().max()
    assert (got - exact).abs().mean() <= 1.01 * (expected - exact).abs().mean()
    with pytest.raises(RuntimeError, match='do not fit'):
        kernels.gelu_product_bf16(x, w1, b1, torch.randn(n, 40))


@NEEDS_BF16
def test_bf16_gelu_is_within_2e_5_of_exact():
    """The bfloat16 path's GELU (interpolated, for outputs only bfloat16 products read) over [-12, 12]."""
    x = torch.linspace(-12, 12, 16 * 6001).bfloat16().float().reshape(-1, 16)
    got = kernels.linear_bf16(x, torch.eye(16), None, gelu=True)  # identity weights: exact in bfloat16
    assert (got - F.gelu(x)).abs().max() <= 2e-5
    assert got[x < -5].eq(0).all() and torch.equal(got[x > 6], x[x > 6])


def attention_with_rounded_operands(esam: ESAM, qkv: torch.Tensor) -> torch.Tensor:
    """ESAM's attention (no pooling) on an NCHW qkv map, with the operands of both products rounded to bfloat16
    (queries, keys plus embedding, the softmax's exps, values) and float32 elsewhere: (B, h, w, C)."""
    q, k, v = qkv.chunk(3, dim=1)
    heads, block = esam.num_heads, esam.block_size
    window, dim = block + 2 * esam.halo, q.shape[1] // heads
    blocks = q.reshape(q.shape[0], heads, dim, q.shape[2] // block, block, q.shape[3] // block, block)
    blocks = blocks.permute(0, 3, 5, 1, 4, 6, 2)  # b y x n i j d
    shape = blocks.shape
    q = blocks.reshape(-1, heads, block * block, dim)
    k, v = (esam.windows(t).reshape(t.shape[0], heads, dim, -1, window, t.shape[3] // block, window)
            .permute(0, 3, 5, 1, 4, 6, 2).reshape(-1, heads, window * window, dim) for t in (k, v))
    scores = bf16(q) @ bf16(k + esam.key_embedding()).transpose(-2, -1) * dim ** -0.5
    exps = (scores - scores.amax(-1, keepdim=True)).exp()
    out = (bf16(exps) @ bf16(v)) / exps.sum(-1, keepdim=True)
    out = out.reshape(shape).permute(0, 1, 4, 2, 5, 3, 6)  # b y i x j n d
    return out.reshape(shape[0], shape[1] * block, shape[2] * block, heads * dim)


@NEEDS_BF16
@pytest.mark.parametrize('channels, heads, block, halo, size', [
    (64, 4, 8, 1, (16, 24)), (64, 2, 4, 2, (8, 12)), (96, 3, 8, 0, (16, 16)), (32, 2, 8, 1, (8, 8)),
    (64, 4, 5, 1, (10, 15)),  # 49 keys: an odd count leaves the last key without a partner
])
def test_halo_attention_bf16_rounds_only_the_product_operands(channels, heads, block, halo, size):
    esam = ESAM(channels, heads, block, halo, downsample=1).eval()
    x = torch.randn(2, channels, *size) * 3
    window = block + 2 * halo
    embedding = torch.cat([esam.rel_h[0].expand(-1, window, -1), esam.rel_w[0].expand(window, -1, -1)], dim=-1)
    with torch.no_grad():
        qkv = esam.qkv_conv(x)
        got = kernels.halo_attention(nhwc(qkv).contiguous(), embedding, heads, block, halo, bf16=True)
        expected = attention_with_rounded_operands(esam, qkv)
        exact = nhwc(esam(x))
    assert (got - expected).abs().max() <= 1e-4 * expected.abs().max()
    assert (got - exact).abs().max() > 1e-4  # really bfloat16


def test_halo_attention_bf16_steps_aside_for_heads_it_was_not_written_for():
    """Heads of 8 channels: float32, the same numbers as without bf16 (on any CPU)."""
    qkv, embedding = torch.randn(1, 8, 8, 3 * 40), torch.randn(10, 10, 8)
    assert torch.equal(kernels.halo_attention(qkv, embedding, 5, 8, 1, bf16=True),
                       kernels.halo_attention(qkv, embedding, 5, 8, 1))


@NEEDS_BF16
def test_linear_bf16_refuses_bad_input():
    with pytest.raises(RuntimeError, match='multiples of 16'):
        kernels.linear_bf16(torch.randn(4, 32), torch.randn(27, 32), None)
    with pytest.raises(RuntimeError, match='GELU or an addend'):
        kernels.linear_bf16(torch.randn(4, 32), torch.randn(16, 32), None, add=torch.randn(4, 16), gelu=True)


@NEEDS_BF16
@pytest.mark.parametrize('channels, expansion, k, size', [(64, 1.0, 3, (20, 24)), (32, 2.0, 5, (9, 7))])
def test_fused_msgm_bf16_matches_the_module_with_rounded_operands(channels, expansion, k, size):
    """The bfloat16 MSGM equals the module computed with each product's operands, and the values the depthwise
    convolution reads (W_2's output), rounded to bfloat16 and everything else in float32, up to the kernel's GELU
    (within 2e-5, see test_bf16_gelu_is_within_2e_5_of_exact)."""
    msgm = MSGM(channels, expansion, k).eval()
    x, add = torch.randn(2, *size, channels), torch.randn(2, size[0] - 3, size[1], channels)
    weights, bias = msgm_weights(msgm), msgm.project_out.bias.detach()
    w1, b1, w2, b2, wd, bd, w3, b3, wo = weights
    norm = torch.nn.LayerNorm(channels, eps=1e-6)
    p = k // 2
    with torch.no_grad():
        norm.weight.normal_(1, 0.2), norm.bias.normal_(0, 0.2)
        xn = norm(x)
        value = nchw(bf16(bf16(xn) @ bf16(w2).T + b2))
        dw = nhwc(F.conv2d(F.pad(value, (p,) * 4, mode='reflect'), wd, bd, groups=wd.shape[0]))
        gated = (bf16(dw) @ bf16(w3).T + b3) * F.gelu(bf16(xn) @ bf16(w1).T + b1)
        expected = bf16(gated) @ bf16(wo).T + bias
        got = kernels.msgm(x, *weights, bias, None, False, 0, size[0], 64, norm=norm, bf16=True)
        band = kernels.msgm(x[:, 3 - p:].contiguous(), *weights, bias, add, True, p, size[0] - 3, 1536, norm=norm,
                            bf16=True)
        module = nhwc(msgm(nchw(xn)))
    # A gated value next to a rounding boundary may round to the neighbouring bfloat16 value: rare one-unit
    # changes, and no farther from the float32 module than `expected`.
    assert (got - expected).abs().mean() <= 1e-4 and (got - expected).abs().max() <= 1e-2
    assert (band - expected[:, 3:] - add - xn[:, 3:]).abs().mean() <= 1e-4
    assert (got - module).abs().mean() <= 1.01 * (expected - module).abs().mean()
    assert 1e-4 < (got - module).abs().max() <= 3e-2
