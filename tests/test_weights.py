"""Weights in every layout and format: read, written, refused with one named line, loaded by SSIUModel."""
from __future__ import annotations

import os
import pickle

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from ssiu_arch import SSIU, IDSANet
from ssiu_arch.tools.cli import ssiu_main
from ssiu_arch.utils.weights import (
    CheckpointError,
    build_network,
    load_ssiu,
    network_options,
    read_checkpoint,
    save_weights,
)

# An SSIU whose hyper-parameters differ from the paper's where the shapes cannot tell.
ODD_SSIU = {'type': 'SSIU', 'upscale': 3, 'num_feat': 16, 'num_block': 4, 'num_heads': 2, 'block_size': 4, 'halo': 2,
            'attn_downsample': 4, 'pad_multiple': 32, 'expert_steps': [1, 2, 4]}


def _tiny_ssiu(**kwargs) -> SSIU:
    return SSIU(**{'upscale': 2, 'num_feat': 16, 'num_block': 3, **kwargs}).eval()


def _forward(net: torch.nn.Module, size=(13, 21)) -> torch.Tensor:
    torch.manual_seed(1)
    with torch.no_grad():
        return net.eval()(torch.rand(1, net.head.in_channels, *size))


@pytest.mark.parametrize('suffix', ['.pth', '.safetensors'])
def test_hyper_parameters_travel_with_the_weights(suffix, tmp_path):
    net = SSIU(**{k: v for k, v in ODD_SSIU.items() if k != 'type'}).eval()
    path = tmp_path / f'odd{suffix}'
    save_weights(path, net.state_dict(), ODD_SSIU)
    loaded, options = build_network(path)
    assert options == {**network_options(net.state_dict()), **ODD_SSIU}
    assert torch.equal(_forward(loaded), _forward(net))
    # the same tensors without the options get the paper's defaults (documented in weights.DEFAULTS)
    bare = tmp_path / f'bare{suffix}'
    save_weights(bare, net.state_dict())
    _, defaults = build_network(bare)
    assert (defaults['halo'], defaults['block_size'], defaults['attn_downsample']) == (1, 6, 2)
    assert defaults['pad_multiple'] == 12 and defaults['expert_steps'] is None  # 16 is no multiple of 6 * 2


def test_every_layout_reads_the_same_weights(tmp_path):
    net = _tiny_ssiu()
    state = net.state_dict()
    zeros = {k: torch.zeros_like(v) for k, v in state.items()}
    layouts = {
        'published.pt': {'epoch': 290, 'model_state_dict': {f'module.{k}': v for k, v in state.items()}},
        'basicsr.pth': {'params': zeros, 'params_ema': state},  # params_ema preferred, as BasicSR tests do
        'bare.pth': state,
    }
    for name, obj in layouts.items():
        torch.save(obj, tmp_path / name)
    save_file(state, str(tmp_path / 'bare.safetensors'))
    for name in [*layouts, 'bare.safetensors']:
        read, stored = read_checkpoint(tmp_path / name)
        assert stored == {} and read.keys() == state.keys(), name
        assert all(torch.equal(read[k], state[k]) for k in state), name
    assert torch.equal(read_checkpoint(tmp_path / 'basicsr.pth', 'params')[0]['head.weight'], zeros['head.weight'])


def test_idsanet_weights_convert_both_ways(tmp_path):
    net = IDSANet(upscale=3, num_feat=16, num_block=3, num_stages=2, share_group=3, window_size=4).eval()
    torch.save({'params': net.state_dict()}, tmp_path / 'idsa.pth')
    assert ssiu_main(['convert', str(tmp_path / 'idsa.pth'), str(tmp_path / 'idsa.safetensors')]) == 0
    loaded, options = build_network(tmp_path / 'idsa.safetensors')
    assert isinstance(loaded, IDSANet)
    assert (options['upscale'], options['share_group'], options['window_size'], options['num_stages']) == (3, 3, 4, 2)
    assert torch.equal(_forward(loaded, (8, 12)), _forward(net, (8, 12)))
    with pytest.raises(CheckpointError, match='holds IDSANet weights, not SSIU'):
        load_ssiu(tmp_path / 'idsa.safetensors')


def test_convert_format_option(tmp_path, capsys):
    src = tmp_path / 'net.pth'
    torch.save({'params': _tiny_ssiu().state_dict()}, src)
    assert ssiu_main(['convert', str(src), str(tmp_path / 'out.safetensors'), '--format', 'safetensors']) == 0
    assert 'type=SSIU upscale=2' in capsys.readouterr().out
    from safetensors import safe_open

    with safe_open(str(tmp_path / 'out.safetensors'), 'pt') as f:
        assert '"attn_downsample": 2' in f.metadata()['network_g']
    with pytest.raises(SystemExit, match='--format pth writes .pth files; name the output out.pth'):
        ssiu_main(['convert', str(src), str(tmp_path / 'out.safetensors'), '--format', 'pth'])
    assert ssiu_main(['convert', str(tmp_path / 'out.safetensors'), str(tmp_path / 'back.pth')]) == 0
    saved = torch.load(tmp_path / 'back.pth', weights_only=True)
    assert sorted(saved) == ['network_g', 'params'] and saved['network_g']['type'] == 'SSIU'
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]  # no temporary file left


class _Exploit:
    def __reduce__(self):
        return os.system, ('echo pwned',)


def _malformed(tmp_path) -> dict:
    """Files that must be refused, each with the words its one-line message must hold."""
    good = _tiny_ssiu().state_dict()
    cases = {}

    def pth(name, obj, words):
        torch.save(obj, tmp_path / name)
        cases[name] = words

    pth('missing_key.pth', {'params': {k: v for k, v in good.items() if k != 'moe.fuse.weight'}}, 'not an SSIU')
    pth('odd_shape.pth', {'params': {**good, 'body.0.s3.rel_h': torch.zeros(1, 10, 1, 3)}}, 'does not fit')
    pth('odd_index.pth', {'params': {**good, 'body.x.norm.weight': torch.zeros(1)}}, 'does not fit')
    pth('no_tail.pth', {'params': {k: v for k, v in good.items() if not k.startswith('tail.3')}}, 'SSIU')
    pth('not_tensor.pth', {'params': {**good, 'head.weight': [1, 2]}}, "'head.weight' is not a tensor")
    pth('nan.pth', {'params': {**good, 'moe.fc_a.bias': torch.full((16,), float('nan'))}}, 'moe.fc_a.bias holds NaN')
    pth('inf.pth', {'params': {**good, 'head.bias': torch.full((16,), float('inf'))}}, 'head.bias holds NaN or Inf')
    pth('contradiction.pth', {'params': good, 'network_g': {'num_feat': 32}}, 'network_g.num_feat is 32')
    pth('unknown_option.pth', {'params': good, 'network_g': {'colour': 1}}, 'does not take: colour')
    pth('wrong_type.pth', {'params': good, 'network_g': {'type': 'RRDBNet'}}, "type is 'RRDBNet'")
    pth('bad_option.pth', {'params': good, 'network_g': {'pad_multiple': 3}}, 'cannot build SSIU')
    pth('options_list.pth', {'params': good, 'network_g': [1]}, 'network_g entry is list')
    (tmp_path / 'pickle.pth').write_bytes(pickle.dumps({'params': _Exploit()}))
    cases['pickle.pth'] = 'not a readable PyTorch checkpoint'
    (tmp_path / 'garbage.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1}')
    cases['garbage.safetensors'] = 'not a readable safetensors file'
    save_file({**good, 'head.bias': torch.full((16,), float('-inf'))}, str(tmp_path / 'inf.safetensors'))
    cases['inf.safetensors'] = 'head.bias holds NaN or Inf'
    save_file(good, str(tmp_path / 'meta.safetensors'), metadata={'network_g': '{not json'})
    cases['meta.safetensors'] = 'metadata network_g is not JSON'
    return cases


def test_malformed_weights_get_one_named_line(tmp_path, capsys):
    for name, words in _malformed(tmp_path).items():
        path = tmp_path / name
        with pytest.raises(CheckpointError) as err:
            build_network(path)
        message = str(err.value)
        assert message.startswith(f'{path}: ') and words in message and '\n' not in message, message
        for argv in (['convert', str(path), str(tmp_path / 'out.pth')],
                     ['export', str(path), '--onnx', str(tmp_path / 'out.onnx')],
                     ['infer', str(tmp_path / 'missing.png'), '-w', str(path), '-o', str(tmp_path / 'sr')]):
            with pytest.raises(SystemExit) as exit_:
                ssiu_main(argv)
            assert str(path) in str(exit_.value) and words in str(exit_.value), (argv, exit_.value)
    assert 'pwned' not in capsys.readouterr().out
    assert not (tmp_path / 'out.pth').exists() and not (tmp_path / 'out.onnx').exists()


def test_infer_and_export_read_safetensors(tmp_path):
    net = _tiny_ssiu()
    weights = tmp_path / 'net.safetensors'
    save_weights(weights, net.state_dict(), network_options(net.state_dict()))
    image = (np.random.default_rng(0).random((12, 10, 3)) * 255).astype(np.uint8)
    cv2.imwrite(str(tmp_path / 'in.png'), image)
    assert ssiu_main(['infer', str(tmp_path / 'in.png'), '-w', str(weights), '-o', str(tmp_path / 'sr')]) == 0
    assert cv2.imread(str(next((tmp_path / 'sr').iterdir()))).shape == (24, 20, 3)
    assert ssiu_main(['export', str(weights), '--onnx', str(tmp_path / 'net.onnx'), '--no-verify']) == 0
    assert (tmp_path / 'net.onnx').stat().st_size > 0


# SSIUModel: pretrain_network_g in any layout or format, BasicSR's param_key/strict_load_g semantics, and the
# optional .safetensors copy of every saved network.

def _model_opt(tmp_path, **path) -> dict:
    opt = {'name': 'tiny', 'model_type': 'SSIUModel', 'scale': 2, 'num_gpu': 0, 'is_train': True, 'dist': False,
           'rank': 0, 'world_size': 1, 'network_g': {'type': 'SSIU', 'upscale': 2, 'num_feat': 16, 'num_block': 3},
           'path': {'pretrain_network_g': None, 'strict_load_g': True, 'resume_state': None, **path},
           'logger': {'save_safetensors': True},
           'train': {'ema_decay': 0.999, 'optim_g': {'type': 'Adam', 'lr': 1e-3}, 'total_iter': 1,
                     'scheduler': {'type': 'MultiStepLR', 'milestones': [1], 'gamma': 0.5},
                     'pixel_opt': {'type': 'L1Loss', 'loss_weight': 1.0}}}
    for key in ('models', 'training_states', 'log', 'visualization'):
        opt['path'][key] = str(tmp_path / key)
        (tmp_path / key).mkdir(exist_ok=True)
    return opt


def test_ssiu_model_loads_pretrained_safetensors_and_published_layout(tmp_path):
    from basicsr.models import build_model

    net = _tiny_ssiu()
    save_weights(tmp_path / 'pre.safetensors', net.state_dict(), network_options(net.state_dict()))
    torch.save({'model_state_dict': {f'module.{k}': v for k, v in net.state_dict().items()}}, tmp_path / 'pub.pt')
    for name in ('pre.safetensors', 'pub.pt'):
        model = build_model(_model_opt(tmp_path, pretrain_network_g=str(tmp_path / name)))
        for loaded in (model.net_g, model.net_g_ema):
            assert all(torch.equal(v, net.state_dict()[k]) for k, v in loaded.state_dict().items()), name


def test_ssiu_model_keeps_strict_load_semantics(tmp_path):
    from basicsr.models import build_model

    state = _tiny_ssiu().state_dict()
    state['body.0.s3.rel_h'] = torch.zeros(1, 7, 1, 2)  # a size mismatch: ignored unless strict
    torch.save({'params': state}, tmp_path / 'odd.pth')
    with pytest.raises(CheckpointError, match='odd.pth: does not fit network_g SSIU'):
        build_model(_model_opt(tmp_path, pretrain_network_g=str(tmp_path / 'odd.pth')))
    model = build_model(_model_opt(tmp_path, pretrain_network_g=str(tmp_path / 'odd.pth'), strict_load_g=False))
    assert torch.equal(model.net_g.state_dict()['head.weight'], state['head.weight'])
    state['head.weight'][0, 0, 0, 0] = float('nan')
    torch.save({'params': state}, tmp_path / 'nan.pth')
    with pytest.raises(CheckpointError, match='nan.pth: weight head.weight holds NaN'):
        build_model(_model_opt(tmp_path, pretrain_network_g=str(tmp_path / 'nan.pth'), strict_load_g=False))


def test_ssiu_model_saves_safetensors_copies_on_request(tmp_path):
    from basicsr.models import build_model

    model = build_model(_model_opt(tmp_path))
    model.save(epoch=0, current_iter=3)
    models = tmp_path / 'models'
    assert sorted(p.name for p in models.iterdir()) == ['net_g_3.pth', 'net_g_3.safetensors']
    pth = torch.load(models / 'net_g_3.pth', weights_only=True)
    assert sorted(pth) == ['network_g', 'params', 'params_ema'] and pth['network_g']['num_block'] == 3
    net, options = build_network(models / 'net_g_3.safetensors')
    assert options['num_feat'] == 16
    ema = model.net_g_ema.state_dict()
    assert all(torch.equal(v, ema[k]) for k, v in net.state_dict().items())


def test_basicsr_test_refuses_bad_pretrained_weights_in_one_line(tmp_path, monkeypatch, data_dir):
    from ssiu_arch.tools.cli import basicsr_main

    state = _tiny_ssiu().state_dict()
    state['head.bias'][0] = float('inf')
    torch.save({'params': state}, tmp_path / 'inf.pth')
    set5 = data_dir / 'benchmark' / 'Set5'
    (tmp_path / 'test.yml').write_text(f"""
name: refuse_inf
model_type: SSIUModel
scale: 2
num_gpu: 0
datasets:
  test_1: {{name: Set5, type: PairedImageDataset, dataroot_gt: {set5 / 'HR'}, dataroot_lq: {set5 / 'LR_bicubic/X2'},
           filename_tmpl: '{{}}x2', io_backend: {{type: disk}}}}
network_g: {{type: SSIU, upscale: 2, num_feat: 16, num_block: 3}}
path: {{pretrain_network_g: {tmp_path / 'inf.pth'}, strict_load_g: true}}
val: {{save_img: false}}
""")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        basicsr_main(['test', '-opt', str(tmp_path / 'test.yml')])
    assert str(exit_.value) == f'basicsr test: {tmp_path / "inf.pth"}: weight head.bias holds NaN or Inf values'
