"""Compiled CPU kernels: each equals the standard-operator computation it replaces, and bad input is refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssiu_arch.archs.ssiu_arch import ESAM, MSGM, SSIU, MoEFeatureSelector
from ssiu_arch.cpu import kernels


@pytest.fixture
def without_kernels(monkeypatch):
    """Run the standard-operator path: what training, tracing and a build without a compiler use."""
    kernels.available()
    monkeypatch.setattr(kernels, '_LOADED', False)


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
def test_halo_attention_matches_sdpa(channels, heads, block, halo, size):
    esam = ESAM(channels, heads, block, halo).eval()
    qkv = torch.randn(2, *size, 3 * channels) * 3  # peaked softmax: exercises the exp and the maximum
    with torch.no_grad():
        out = kernels.halo_attention(qkv, esam.key_embedding(), heads, block, halo)
        assert (out - esam._attention(qkv)).abs().max() <= 2e-5


def test_halo_attention_refuses_bad_input():
    qkv = torch.randn(1, 12, 16, 48)
    with pytest.raises(RuntimeError, match='not made of 8x8 blocks'):
        kernels.halo_attention(qkv, torch.randn(10, 10, 4), 4, 8, 1)
    with pytest.raises(RuntimeError, match='embedding must be'):
        kernels.halo_attention(torch.randn(1, 8, 8, 48), torch.randn(9, 9, 4), 4, 8, 1)


@pytest.mark.parametrize('channels, residual', [(64, True), (20, False)])
def test_moe_combine_matches_softmax_gating(channels, residual, without_kernels):
    moe = MoEFeatureSelector(channels).eval()
    experts = [torch.randn(2, 5, 7, channels) * 4 for _ in range(3)]
    skip = torch.randn(2, 5, 7, channels) if residual else None
    with torch.no_grad():
        ref, ref_gates = moe(experts, skip)
        kernels._LOADED = True
        out, gates = moe(experts, skip)
        assert moe(experts, skip, with_gates=False)[1] is None
    assert (out - ref).abs().max() <= 1e-5
    assert (gates - ref_gates).abs().max() <= 1e-6


@pytest.mark.parametrize('channels, expansion, k, size', [(64, 1.0, 3, (20, 24)), (32, 2.0, 5, (9, 7)),
                                                          (48, 1.0, 3, (5, 33))])
def test_fused_msgm_matches_the_module(channels, expansion, k, size, without_kernels):
    msgm = MSGM(channels, expansion, k).eval()
    x, add = torch.randn(2, *size, channels), torch.randn(2, size[0] - 3, size[1], channels)
    p = k // 2
    band = x[:, 3 - p:].contiguous()  # rows 3.. with the halo above them, reflected at the bottom
    with torch.no_grad():
        whole_ref = msgm(x)
        band_ref = msgm.project(band, 0, p, bias=msgm.project_out.bias, add=add, residual=True)
        kernels._LOADED = True
        whole = msgm(x)
        banded = msgm.project(band, 0, p, bias=msgm.project_out.bias, add=add, residual=True)
    assert (whole - whole_ref).abs().max() <= 1e-5
    assert (banded - band_ref).abs().max() <= 1e-5
    assert (banded - whole_ref[:, 3:] - add - x[:, 3:]).abs().max() <= 1e-5


def test_fused_msgm_refuses_bad_input():
    msgm = MSGM(16).eval()
    args = [t.detach() for t in (msgm.project_in1.weight.flatten(1), msgm.project_in1.bias,
                                 msgm.project_in2[0].weight.flatten(1), msgm.project_in2[0].bias,
                                 msgm.project_in2[1].weight, msgm.project_in2[1].bias,
                                 msgm.project_in2[2].weight.flatten(1), msgm.project_in2[2].bias,
                                 msgm.project_out.weight.flatten(1))]
    with pytest.raises(RuntimeError, match='weight shapes do not fit a 8-channel input'):
        kernels.msgm(torch.randn(1, 6, 6, 8), *args, None, None, False, 0, 6, 1536)
    with pytest.raises(RuntimeError, match='add must be'):
        kernels.msgm(torch.randn(1, 6, 6, 16), *args, None, torch.randn(1, 5, 6, 16), False, 0, 6, 1536)


@pytest.mark.parametrize('scale, size, batch', [(2, (17, 23), 2), (3, (9, 30), 1), (4, (33, 19), 1)])
def test_network_equals_its_standard_operator_path(scale, size, batch, without_kernels):
    net = SSIU(upscale=scale, num_feat=32, num_block=4).eval()
    x = torch.rand(batch, 3, *size)
    with torch.no_grad():
        ref, ref_aux = net(x, return_aux=True)
        kernels._LOADED = True
        out, aux = net(x, return_aux=True)
    assert (out - ref).abs().max() <= 1e-5
    assert (aux['gates'] - ref_aux['gates']).abs().max() <= 1e-6
    for a, b in zip(aux['step_outputs'], ref_aux['step_outputs']):
        assert (a - b).abs().max() <= 1e-5


def test_gradients_reach_every_weight_in_eval_mode():
    # Eval mode with autograd on: the kernels, which have no backward, must stand aside even for an input that
    # needs no gradient.
    for module, x in ((MSGM(16).eval(), torch.rand(1, 8, 8, 16)),
                      (SSIU(upscale=2, num_feat=16, num_block=3).eval(), torch.rand(1, 3, 16, 16))):
        module(x).mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())
    # Only ESAM's key embeddings and depthwise convolution trainable: the maps reaching them need no gradient,
    # the weights still get theirs.
    net = SSIU(upscale=2, num_feat=16, num_block=3).eval().requires_grad_(False)
    esam = net.body[0].s3
    trained = [esam.rel_h, esam.rel_w, *esam.LocalProp.parameters()]
    for p in trained:
        p.requires_grad_(True)
    net(torch.rand(1, 3, 16, 16)).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)


def test_kernels_can_be_switched_off(monkeypatch):
    monkeypatch.setenv('SSIU_NO_KERNELS', '1')
    monkeypatch.setattr(kernels, '_LOADED', None)
    assert not kernels.available()
    assert not kernels.applies(torch.rand(1, 2, 2, 16))
