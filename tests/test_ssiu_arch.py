"""SSIU architecture: registration, size, published numerics, any input size, gradients, aux outputs."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import yaml
from basicsr.archs import build_network
from basicsr.utils.registry import ARCH_REGISTRY
from conftest import REFERENCES, load_reference
from reference_ssiu import reference_forward

from ssiu_arch.archs.ssiu_arch import SSIU, expert_steps_for, pad_to_multiple


def tiny(upscale=2, num_block=3, num_feat=16, **kw) -> SSIU:
    return SSIU(upscale=upscale, num_feat=num_feat, num_block=num_block, **kw).eval()


def test_registered_and_built_from_yaml():
    assert ARCH_REGISTRY.get('SSIU') is SSIU
    for scale in (2, 3, 4):
        opt = yaml.safe_load(f'{{type: SSIU, upscale: {scale}, num_in_ch: 3, num_out_ch: 3, num_feat: 16, '
                             'num_block: 3, num_heads: 4, block_size: 8, halo: 1, attn_downsample: 2}')
        net = build_network(opt)
        assert isinstance(net, SSIU)
        assert net(torch.rand(1, 3, 12, 10)).shape == (1, 3, 12 * scale, 10 * scale)


@pytest.mark.parametrize('scale, expected', [(2, 777_827), (3, 798_627), (4, 794_467)])
def test_parameter_count_matches_paper(scale, expected):
    assert sum(p.numel() for p in SSIU(upscale=scale).parameters()) == expected


@pytest.mark.parametrize('scale, expected_g', [(2, 167.2), (3, 76.6), (4, 48.9)])
def test_multiply_adds_at_720p_output(scale, expected_g):
    from ssiu_arch.utils.profiling import count_macs, lr_size_for

    h, w = lr_size_for((720, 1280), scale)
    macs = count_macs(SSIU(upscale=scale), (h, w)) / 1e9
    assert abs(macs - expected_g) / expected_g < 0.02, macs


@pytest.mark.parametrize('use_engine', [True, False], ids=['engine', 'reference'])
@pytest.mark.parametrize('path', REFERENCES, ids=lambda p: p.stem)
def test_published_reference_outputs(path, use_engine, tmp_path):
    from ssiu_arch.utils.weights import load_ssiu

    ref = load_reference(path)
    config = convert_and_check(path, tmp_path)
    assert config['upscale'] == ref['config']['scale']
    assert config['num_feat'] == ref['config']['n_feats']
    assert config['num_block'] == ref['config']['n_blocks']
    net = load_ssiu(tmp_path / 'net.pth').eval()
    net.use_engine = use_engine  # the CPU engine where installed and applicable, else the modules themselves
    with torch.no_grad():
        out = net(ref['input'])
    assert (out - ref['output']).abs().max() <= 1e-4


def convert_and_check(path, tmp_path) -> dict:
    """Write the published checkpoint of a fixture to disk, convert it, check the BasicSR layout."""
    from ssiu_arch.tools.convert import convert

    src = tmp_path / 'official.pt'
    torch.save(load_reference(path)['official_checkpoint'], src)
    config = convert(src, tmp_path / 'net.pth')
    saved = torch.load(tmp_path / 'net.pth', weights_only=True)
    assert list(saved) == ['params', 'network_g'] and saved['network_g'] == config
    SSIU(**{k: v for k, v in config.items() if k != 'type'}).load_state_dict(saved['params'], strict=True)
    return config


@pytest.mark.parametrize('scale, num_feat, num_block, batch, size', [
    (2, 16, 3, 2, (17, 23)),
    (3, 32, 4, 1, (9, 30)),
    (4, 16, 6, 1, (33, 19)),
    (2, 24, 7, 2, (40, 41)),
    (3, 16, 8, 1, (16, 16)),
    (4, 32, 10, 1, (21, 13)),
])
def test_matches_published_formulation_on_other_configs(scale, num_feat, num_block, batch, size):
    torch.manual_seed(scale * 100 + num_block)
    net = tiny(scale, num_block, num_feat)
    for p in net.parameters():  # weights large enough that every branch matters
        p.data.normal_(0, 0.2)
    x = torch.rand(batch, 3, *size)
    with torch.no_grad():
        out = net(x)
    ref = reference_forward(x, net.state_dict(), scale, num_block)
    skip = F.interpolate(x, scale_factor=scale, mode='bilinear')
    assert (out - skip).abs().mean() > 0.1  # the body contributes
    assert (out - ref).abs().max() <= 1e-4


def test_expert_steps_follow_published_rule():
    assert expert_steps_for(9) == (3, 6, 9)
    assert expert_steps_for(3) == (1, 2, 3)
    assert expert_steps_for(4) == (2, 3, 4)
    assert expert_steps_for(7) == (4, 6, 7)
    assert expert_steps_for(10) == (6, 9, 10)
    # documented choices where the published code ignores steps (5) or divides by zero (1, 2)
    assert expert_steps_for(5) == (3, 4, 5)
    assert expert_steps_for(2) == (0, 1, 2)
    assert expert_steps_for(1) == (0, 0, 1)
    with pytest.raises(ValueError, match='num_block'):
        expert_steps_for(0)


@pytest.mark.parametrize('num_block', [1, 2, 5])
def test_short_unfoldings_run_and_use_the_last_steps(num_block):
    net = tiny(num_block=num_block)
    out, aux = net(torch.rand(1, 3, 9, 11), return_aux=True)
    assert out.shape == (1, 3, 18, 22) and torch.isfinite(out).all()
    assert net.expert_steps[-1] == num_block


@pytest.mark.parametrize('size', [(1, 1), (5, 7), (8, 8), (1, 20), (16, 3), (2, 2)])
def test_any_input_size(size):
    net = tiny(upscale=3)
    x = torch.rand(1, 3, *size)
    with torch.no_grad():
        out = net(x)
    assert out.shape == (1, 3, size[0] * 3, size[1] * 3)
    assert torch.isfinite(out).all()
    # small sides are handled as the mirror-extended image cropped back, like sizes the published code runs
    extended = pad_to_multiple(x, 16)
    with torch.no_grad():
        out_extended = net(extended)[..., : size[0] * 3, : size[1] * 3]
    assert (out - out_extended).abs().max() <= 1e-5


def test_padding_matches_reflect_where_published_code_runs():
    x = torch.rand(1, 3, 9, 13)
    assert torch.equal(pad_to_multiple(x, 16), F.pad(x, (0, 3, 0, 7), mode='reflect'))
    small = torch.arange(5.0).view(1, 1, 1, 5)
    # whole-sample symmetric extension with period 2 * (5 - 1)
    assert pad_to_multiple(small, 16)[0, 0, 0].tolist() == [0, 1, 2, 3, 4, 3, 2, 1, 0, 1, 2, 3, 4, 3, 2, 1]
    assert pad_to_multiple(torch.ones(1, 1, 1, 1), 16).shape == (1, 1, 16, 16)


def test_sizes_just_above_padding_limit_match_published():
    net = tiny()
    for p in net.parameters():
        p.data.normal_(0, 0.2)
    x = torch.rand(1, 3, 9, 10)  # smallest sides where one reflection reaches 16
    with torch.no_grad():
        out = net(x)
    assert (out - reference_forward(x, net.state_dict(), 2, 3)).abs().max() <= 1e-4


def test_every_parameter_gets_a_finite_gradient():
    net = tiny(upscale=4, num_block=4).train()
    lr, hr = torch.rand(2, 3, 20, 20), torch.rand(2, 3, 80, 80)
    F.l1_loss(net(lr), hr).backward()
    for name, p in net.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_aux_outputs_leave_output_and_state_dict_unchanged():
    net = tiny(upscale=2, num_block=4)
    keys = list(net.state_dict())
    x = torch.rand(2, 3, 13, 21)
    with torch.no_grad():
        plain = net(x)
        out, aux = net(x, return_aux=True)
    assert torch.equal(plain, out)
    assert list(net.state_dict()) == keys
    gates = aux['gates']
    assert gates.shape == (2, 3, 16, 13, 21)
    assert torch.allclose(gates.sum(dim=1), torch.ones(()), atol=1e-6)
    assert len(aux['step_outputs']) == 3
    assert all(s.shape == out.shape for s in aux['step_outputs'])


def test_bad_hyper_parameters_are_rejected():
    with pytest.raises(ValueError, match='num_heads'):
        SSIU(num_feat=30, num_heads=4)
    with pytest.raises(ValueError, match='pad_multiple'):
        SSIU(pad_multiple=12)
    with pytest.raises(ValueError, match='expert_steps'):
        SSIU(num_block=3, expert_steps=(1, 2, 7))
    with pytest.raises(ValueError, match='upscale'):
        SSIU(upscale=0)


def test_convert_cli_prints_config_and_writes_basicsr_checkpoint(tmp_path, capsys):
    from ssiu_arch.tools.cli import ssiu_main

    src = tmp_path / 'official.pt'
    torch.save(load_reference(REFERENCES[0])['official_checkpoint'], src)
    assert ssiu_main(['convert', str(src), str(tmp_path / 'out.pth')]) == 0
    printed = capsys.readouterr().out
    assert 'upscale=2' in printed and 'num_feat=16' in printed and 'num_block=3' in printed
    with pytest.raises(SystemExit, match='exists'):
        ssiu_main(['convert', str(src), str(tmp_path / 'out.pth')])


@pytest.mark.parametrize('content, message', [
    (lambda p: p.write_bytes(b'not a checkpoint'), 'not a readable PyTorch checkpoint'),
    (lambda p: torch.save([1, 2, 3], p), 'expected a dict checkpoint'),
    (lambda p: torch.save({'optimizer': {'lr': 1}}, p), 'none of'),
    (lambda p: torch.save({'model_state_dict': {'module.conv.weight': torch.zeros(1)}}, p), 'not an SSIU state dict'),
])
def test_convert_rejects_bad_files_by_name(tmp_path, content, message):
    from ssiu_arch.tools.convert import convert
    from ssiu_arch.utils.weights import CheckpointError

    bad = tmp_path / 'bad.pt'
    content(bad)
    with pytest.raises(CheckpointError, match=message) as err:
        convert(bad, tmp_path / 'out.pth')
    assert str(bad) in str(err.value)
    assert not (tmp_path / 'out.pth').exists()


def test_convert_rejects_truncated_checkpoint(tmp_path):
    from ssiu_arch.tools.convert import convert
    from ssiu_arch.utils.weights import CheckpointError

    whole = tmp_path / 'whole.pt'
    torch.save(load_reference(REFERENCES[0])['official_checkpoint'], whole)
    truncated = tmp_path / 'truncated.pt'
    truncated.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(CheckpointError, match='truncated.pt'):
        convert(truncated, tmp_path / 'out.pth')
    missing = tmp_path / 'missing.pt'
    with pytest.raises(CheckpointError, match='no such checkpoint file'):
        convert(missing, tmp_path / 'out.pth')


def test_convert_rejects_a_state_dict_that_does_not_fit(tmp_path):
    from ssiu_arch.tools.convert import convert
    from ssiu_arch.utils.weights import CheckpointError

    state = SSIU(upscale=2, num_feat=16, num_block=3).state_dict()
    del state['body.0.s3.rel_w']
    src = tmp_path / 'partial.pth'
    torch.save({'params': state}, src)
    with pytest.raises(CheckpointError, match='does not fit'):
        convert(src, tmp_path / 'out.pth')
