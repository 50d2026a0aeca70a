"""IDSA-Net architecture: registration, size, attention sharing, any input size, gradients, option files."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from basicsr.archs import build_network
from basicsr.utils.registry import ARCH_REGISTRY
from torch.utils.flop_counter import FlopCounterMode

from ssiu_arch.archs.idsanet_arch import ASDB, AttentionMap, IDSANet, channel_shuffle, window_partition, window_reverse
from ssiu_arch.utils.profiling import count_params

OPTIONS = Path(__file__).parent.parent / 'options'
TINY = {'num_feat': 16, 'num_block': 4, 'share_group': 2, 'num_stages': 2, 'num_heads': 2, 'window_size': 4}


def tiny(upscale: int = 2, **kw) -> IDSANet:
    return IDSANet(upscale=upscale, **{**TINY, **kw}).eval()


def count_attention_maps(net: IDSANet, x: torch.Tensor) -> int:
    """Calls of AttentionMap modules during one forward pass of ``net`` on ``x``."""
    calls = []
    maps = [m for m in net.modules() if isinstance(m, AttentionMap)]
    handles = [m.register_forward_hook(lambda *_: calls.append(1)) for m in maps]
    with torch.no_grad():
        net(x)
    for handle in handles:
        handle.remove()
    return len(calls)


def test_registered_and_built_from_yaml():
    assert ARCH_REGISTRY.get('IDSANet') is IDSANet
    for scale in (2, 3, 4):
        opt = yaml.safe_load(f'{{type: IDSANet, upscale: {scale}, num_in_ch: 3, num_out_ch: 3, num_feat: 16, '
                             'num_block: 4, share_group: 2, num_stages: 2, num_heads: 2, window_size: 4}')
        net = build_network(opt)
        assert isinstance(net, IDSANet)
        assert net(torch.rand(1, 3, 12, 10)).shape == (1, 3, 12 * scale, 10 * scale)


def test_default_x4_parameter_count_within_5_percent_of_paper():
    params = count_params(IDSANet(upscale=4))
    assert abs(params - 752_000) / 752_000 < 0.05, params


@pytest.mark.parametrize('scale, expected', [(2, 737_140), (3, 745_795), (4, 757_912)])
def test_default_parameter_counts(scale, expected):
    assert count_params(IDSANet(upscale=scale)) == expected


@pytest.mark.parametrize('num_block, share_group', [(4, 2), (4, 4), (5, 2), (3, 1), (6, 3), (8, 2)])
def test_attention_matrix_computed_once_per_group(num_block, share_group):
    net = tiny(num_block=num_block, share_group=share_group)
    expected = math.ceil(num_block / share_group)
    assert sum(isinstance(m, AttentionMap) for m in net.modules()) == expected
    assert count_attention_maps(net, torch.rand(2, 3, 9, 11)) == expected


def test_sharing_saves_exactly_the_skipped_attention_computations():
    """Multiply-adds with and without sharing differ by the attention matrices that sharing skips."""
    def flops(module, *inputs) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            module(*inputs)
        return counter.get_total_flops()

    x = torch.rand(1, 3, 16, 12)
    shared, unshared = tiny(share_group=2), tiny(share_group=1)
    one_map = flops(AttentionMap(16, 2, 4), torch.rand(4 * 3, 4 * 4, 16))  # 4x3 windows of 4x4 tokens
    assert flops(unshared, x) - flops(shared, x) == (4 - 2) * one_map > 0


def test_following_block_needs_the_group_matrix():
    block = ASDB(16, computes_attention=False, num_heads=2, window_size=4)
    with pytest.raises(ValueError, match='attn'):
        block(torch.rand(1, 16, 8, 8))


@pytest.mark.parametrize('scale, size', [(2, (1, 1)), (3, (5, 7)), (4, (13, 9)), (2, (4, 4)), (3, (17, 6))])
def test_any_input_size(scale, size):
    net = tiny(upscale=scale)
    with torch.no_grad():
        out = net(torch.rand(2, 3, *size))
    assert out.shape == (2, 3, size[0] * scale, size[1] * scale)
    assert torch.isfinite(out).all()


def test_batch_items_are_independent():
    net = tiny()
    x = torch.rand(3, 3, 10, 7)
    with torch.no_grad():
        batched = net(x)
        single = net(x[1:2])
    torch.testing.assert_close(batched[1:2], single, rtol=1e-4, atol=1e-5)


def test_channels_last_matches_contiguous():
    net = tiny()
    x = torch.rand(1, 3, 12, 9)
    with torch.no_grad():
        ref = net(x)
        out = net.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_every_parameter_gets_finite_nonzero_gradient():
    net = tiny(upscale=3).train()
    x, target = torch.rand(2, 3, 7, 10), torch.rand(2, 3, 21, 30)
    F.l1_loss(net(x), target).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_window_partition_layout_and_inverse():
    x = torch.arange(2 * 3 * 8 * 12, dtype=torch.float32).reshape(2, 3, 8, 12)
    tokens = window_partition(x, 4)
    assert tokens.shape == (2 * 2 * 3, 16, 3)
    torch.testing.assert_close(tokens[1], x[0, :, :4, 4:8].flatten(1).t())  # second window of the first image
    torch.testing.assert_close(tokens[6], x[1, :, :4, :4].flatten(1).t())
    torch.testing.assert_close(window_reverse(tokens, 4, 8, 12), x)
    assert window_reverse(tokens, 4, 8, 12).is_contiguous(memory_format=torch.channels_last)


def test_channel_shuffle_interleaves_groups():
    x = torch.arange(8, dtype=torch.float32).reshape(1, 8, 1, 1)
    assert channel_shuffle(x, 4).flatten().tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    x = torch.rand(2, 8, 3, 5)
    shuffled = channel_shuffle(x.contiguous(memory_format=torch.channels_last), 2)
    assert shuffled.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(shuffled, x[:, [0, 4, 1, 5, 2, 6, 3, 7]])


@pytest.mark.parametrize('kw, option', [
    ({'num_feat': 18, 'num_heads': 4}, 'num_heads'),
    ({'share_group': 0}, 'share_group'),
    ({'num_block': 0}, 'num_block'),
    ({'upscale': 0}, 'upscale'),
    ({'distill_ratio': 0.01}, 'distill_ratio'),
])
def test_bad_configuration_names_the_option(kw, option):
    with pytest.raises(ValueError, match=option):
        IDSANet(**kw)


def load_options(name: str) -> dict:
    with open(OPTIONS / name, encoding='utf-8') as f:
        return yaml.safe_load(f)


@pytest.mark.parametrize('name', ['train_IDSANet_x4.yml', 'test_IDSANet_x4.yml'])
def test_option_files_build_the_network_at_their_scale(name):
    opt = load_options(name)
    assert opt['model_type'] == 'SSIUModel'
    assert opt['network_g']['type'] == 'IDSANet' and opt['network_g']['upscale'] == opt['scale'] == 4
    net = build_network(opt['network_g'])
    assert count_params(net) == count_params(IDSANet(upscale=4))
    for phase, dataset in opt['datasets'].items():
        if phase.startswith(('val', 'test')):
            assert dataset['dataroot_lq'].endswith('/X4') and dataset['filename_tmpl'] == '{}x4', phase
    assert all(m['crop_border'] == 4 and m['test_y_channel'] for m in opt['val']['metrics'].values())


def test_test_options_cover_the_five_benchmarks_with_repo_layout():
    opt = load_options('test_IDSANet_x4.yml')
    sets = [d['name'] for d in opt['datasets'].values()]
    assert sets == ['Set5', 'Set14', 'B100', 'Urban100', 'Manga109']
    for dataset in opt['datasets'].values():
        assert dataset['dataroot_gt'] == f'datasets/benchmark/{dataset["name"]}/HR'
        assert dataset['io_backend']['type'] == 'disk'
