"""ssiu export --onnx: dynamic-size ONNX models that onnxruntime runs like PyTorch, atomic writes, bad input."""
from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest
import torch

from ssiu_arch.archs.ssiu_arch import SSIU
from ssiu_arch.tools.cli import ssiu_main
from ssiu_arch.tools.export import ExportError, export_onnx


def tiny(scale: int) -> SSIU:
    torch.manual_seed(scale)
    return SSIU(upscale=scale, num_feat=16, num_block=3).eval()


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_onnx_matches_pytorch_on_any_size(scale, tmp_path):
    net = tiny(scale)
    path = tmp_path / 'ssiu.onnx'
    assert export_onnx(net, path) <= 1e-4  # checked on 17x23 and 31x40 before the file is moved into place
    session = ort.InferenceSession(str(path), providers=['CPUExecutionProvider'])
    # odd and unequal sides, a batch, sides below 9 (repeated mirror padding) and a single pixel
    for shape in [(2, 3, 17, 23), (1, 3, 31, 40), (1, 3, 48, 33), (1, 3, 5, 7), (1, 3, 8, 20), (1, 3, 1, 1)]:
        x = torch.rand(shape)
        with torch.inference_mode():
            expected = net(x)
        got = torch.from_numpy(session.run(['sr'], {'lr': x.numpy()})[0])
        assert got.shape == (shape[0], 3, shape[2] * scale, shape[3] * scale)
        assert (got - expected).abs().max() <= 1e-4, shape


def test_onnx_graph_declares_dynamic_batch_height_width(tmp_path):
    path = tmp_path / 'ssiu.onnx'
    export_onnx(tiny(2), path, verify_sizes=None)
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ['batch', 3, 'height', 'width']


def test_failed_verification_writes_nothing(tmp_path):
    path = tmp_path / 'ssiu.onnx'
    with pytest.raises(ExportError, match='differs from PyTorch'):
        export_onnx(tiny(2), path, atol=-1.0)  # no error can pass a negative tolerance
    assert list(tmp_path.iterdir()) == []


def test_cli_exports_a_checkpoint(tmp_path, capsys):
    ckpt, out = tmp_path / 'net.pth', tmp_path / 'net.onnx'
    torch.save({'params': tiny(4).state_dict()}, ckpt)
    assert ssiu_main(['export', str(ckpt), '--onnx', str(out)]) == 0
    printed = capsys.readouterr().out
    assert 'wrote' in printed and 'max abs difference' in printed
    x = torch.rand(1, 3, 19, 13)
    got = ort.InferenceSession(str(out), providers=['CPUExecutionProvider']).run(['sr'], {'lr': x.numpy()})[0]
    with torch.inference_mode():
        assert (torch.from_numpy(got) - tiny(4)(x)).abs().max() <= 1e-4


def test_cli_rejects_bad_checkpoint_and_keeps_existing_output(tmp_path):
    bad, out = tmp_path / 'bad.pth', tmp_path / 'net.onnx'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises(SystemExit, match='bad.pth'):
        ssiu_main(['export', str(bad), '--onnx', str(out)])
    assert not out.exists()
    with pytest.raises(SystemExit, match='missing.pth'):
        ssiu_main(['export', str(tmp_path / 'missing.pth'), '--onnx', str(out)])
    out.write_bytes(b'previous')
    ckpt = tmp_path / 'net.pth'
    torch.save({'params': tiny(2).state_dict()}, ckpt)
    with pytest.raises(SystemExit, match='exists'):
        ssiu_main(['export', str(ckpt), '--onnx', str(out)])
    assert out.read_bytes() == b'previous'
    with pytest.raises(SystemExit, match='folder does not exist'):
        ssiu_main(['export', str(ckpt), '--onnx', str(tmp_path / 'nowhere' / 'net.onnx')])
