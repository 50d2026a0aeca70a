"""spandrel loads SSIU and IDSA-Net files of every layout this project meets, and no other network's."""
from __future__ import annotations

import pytest
import torch

from ssiu_arch import SSIU, IDSANet
from ssiu_arch.utils.weights import network_options, save_weights

ssiu_spandrel = pytest.importorskip('ssiu_arch.spandrel', reason='needs the spandrel extra', exc_type=ImportError)
import spandrel  # noqa: E402  (after ssiu_arch.spandrel, which makes torchvision importable)

ssiu_spandrel.register()


def _write(layout: str, net: torch.nn.Module, tmp_path) -> object:
    """``net``'s weights in one of the layouts spandrel users meet; returns the path."""
    state = net.state_dict()
    if layout == 'convert':  # ssiu convert output: {'params': ..., 'network_g': ...}
        from ssiu_arch.tools.convert import convert

        src = tmp_path / 'published.pt'
        torch.save({'epoch': 1, 'model_state_dict': {f'module.{k}': v for k, v in state.items()}}, src)
        path = tmp_path / 'converted.pth'
        convert(src, path)
    elif layout == 'basicsr':  # a training checkpoint: params and (preferred) params_ema
        path = tmp_path / 'net_g_1000.pth'
        torch.save({'params': {k: torch.zeros_like(v) for k, v in state.items()}, 'params_ema': state}, path)
    elif layout == 'published':
        path = tmp_path / 'model_x2_290.pt'
        torch.save({'epoch': 290, 'model_state_dict': {f'module.{k}': v for k, v in state.items()}}, path)
    else:
        path = tmp_path / 'net.safetensors'
        save_weights(path, state, network_options(state))
    return path


NETWORKS = {
    'SSIU x2': lambda: SSIU(upscale=2, num_feat=16, num_block=3),
    'SSIU x4 gray': lambda: SSIU(upscale=4, num_in_ch=1, num_out_ch=1, num_feat=16, num_block=2, num_heads=2),
    'IDSANet x3': lambda: IDSANet(upscale=3, num_feat=16, num_block=3, num_stages=2),
}


@pytest.mark.parametrize('layout', ['convert', 'basicsr', 'published', 'safetensors'])
@pytest.mark.parametrize('name', list(NETWORKS))
def test_spandrel_loads_every_layout(name, layout, tmp_path):
    net = NETWORKS[name]().eval()
    for p in net.parameters():  # not the initial values: the test must see which weights were loaded
        p.data.add_(0.01 * torch.randn_like(p))
    path = _write(layout, net, tmp_path)
    model = spandrel.ModelLoader().load_from_file(path)
    assert isinstance(model, spandrel.ImageModelDescriptor)
    assert model.architecture.id == type(net).__name__
    scale, channels = net.upscale, net.head.in_channels
    assert (model.scale, model.input_channels, model.output_channels) == (scale, channels, channels)
    assert model.size_requirements.none  # the networks pad any size themselves
    assert model.tiling == spandrel.ModelTiling.SUPPORTED
    assert model.supports_half and model.supports_bfloat16
    assert model.purpose == 'SR'
    x = torch.rand(1, channels, 13, 21)
    with torch.no_grad():
        expected = net(x).clamp(0, 1)
        got = model(x)
    assert got.shape == (1, channels, 13 * scale, 21 * scale)
    assert (got - expected).abs().max() <= 1e-5


def test_spandrel_descriptor_runs_in_bfloat16(tmp_path):
    net = SSIU(upscale=2, num_feat=16, num_block=3).eval()
    model = spandrel.ModelLoader().load_from_file(_write('safetensors', net, tmp_path)).bfloat16()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        got = model(x.bfloat16()).float()
        expected = net(x).clamp(0, 1)
    assert (got - expected).abs().max() < 0.05


def _other_architectures() -> dict[str, dict[str, torch.Tensor]]:
    """Tiny state dicts of three of spandrel's own architectures, built with its own classes."""
    from spandrel.architectures.ESRGAN import ESRGAN
    from spandrel.architectures.SAFMN import SAFMN
    from spandrel.architectures.SwinIR import SwinIR

    return {
        'ESRGAN': ESRGAN(num_filters=8, num_blocks=1, scale=2).state_dict(),
        'SwinIR': SwinIR(img_size=16, embed_dim=12, depths=[1], num_heads=[2], window_size=4, mlp_ratio=2,
                         upscale=2, upsampler='pixelshuffledirect').state_dict(),
        'SAFMN': SAFMN(dim=8, n_blocks=1, upscaling_factor=2).state_dict(),
    }


def test_spandrel_keeps_other_architectures(tmp_path):
    for arch, state in _other_architectures().items():
        assert not any(support.detect(state) for support in ssiu_spandrel.SUPPORTS), arch
        path = tmp_path / f'{arch}.pth'
        torch.save({'params': state}, path)
        assert spandrel.ModelLoader().load_from_file(path).architecture.id == arch


def test_register_is_idempotent():
    registry = spandrel.ArchRegistry()
    assert len(ssiu_spandrel.register(registry)) == 2
    assert ssiu_spandrel.register(registry) == []
    assert 'SSIU' in spandrel.MAIN_REGISTRY and 'IDSANet' in spandrel.MAIN_REGISTRY
