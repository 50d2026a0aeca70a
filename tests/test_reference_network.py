"""The reference network as tools see it: FLOP counters, hooks on every module, a self-contained file, compile."""
from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import ssiu_arch.archs.idsanet_arch
import ssiu_arch.archs.ssiu_arch
from ssiu_arch.archs.idsanet_arch import IDSANet
from ssiu_arch.archs.ssiu_arch import SSIU

CONTEXTS = pytest.mark.parametrize('context', [torch.no_grad, torch.inference_mode])


@CONTEXTS
def test_flop_counter_sees_every_multiply_add(context):
    net = SSIU(upscale=4).eval()
    with context(), FlopCounterMode(display=False) as counter:
        out = net(torch.rand(1, 3, 180, 320))
    assert out.shape == (1, 3, 720, 1280)
    macs = counter.get_total_flops() / 2e9
    assert abs(macs - 48.9) / 48.9 < 0.02, macs  # the paper's figure for x4 at a 1280x720 output


@CONTEXTS
@pytest.mark.parametrize('scale', [2, 3, 4])
def test_forward_hooks_fire_on_every_module(context, scale):
    net = SSIU(upscale=scale, num_feat=16, num_block=4).eval()
    called = []
    for module in net.modules():
        module.register_forward_hook(lambda m, args, out: called.append(m))
    with context():
        net(torch.rand(1, 3, 13, 21), return_aux=True)
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 1 + 4 * (4 * 5 + 2) + 4 + len(net.tail) // 3 + 1  # head, steps, MoE-FS, tail
    assert all(any(m is conv for m in called) for conv in convs)
    # print(net) lists only modules that run: every one but the list of steps was called
    never_called = [name for name, m in net.named_modules() if not any(m is c for c in called)]
    assert never_called == ['body']


def test_engine_is_asked_first_and_can_be_switched_off(monkeypatch):
    class Engine:
        def __init__(self):
            self.calls = []

        def accepts(self, net, x):
            return net.use_engine

        def run(self, net, x, return_aux):
            self.calls.append(return_aux)
            return 'engine result'

    net = SSIU(upscale=2, num_feat=16, num_block=3).eval()
    engine = Engine()
    monkeypatch.setattr(SSIU, 'engine', engine)
    x = torch.rand(1, 3, 8, 8)
    assert net(x, return_aux=True) == 'engine result' and engine.calls == [True]
    net.use_engine = False
    assert net(x).shape == (1, 3, 16, 16) and engine.calls == [True]


STANDALONE = '''
import importlib.util, sys
import torch
sys.modules['basicsr'] = None  # import basicsr fails
sys.modules['ssiu_arch'] = None  # and so does this package
try:
    import basicsr  # noqa: F401
    raise SystemExit('basicsr imported')
except ImportError:
    pass
spec = importlib.util.spec_from_file_location('network', sys.argv[1])
network = importlib.util.module_from_spec(spec)
spec.loader.exec_module(network)
saved = torch.load(sys.argv[2], weights_only=True)
net = getattr(network, sys.argv[3])(**saved['config']).eval()
net.load_state_dict(saved['params'], strict=True)
with torch.no_grad():
    torch.save(net(saved['input']), sys.argv[4])
'''


@pytest.mark.parametrize('module, cls, config', [
    (ssiu_arch.archs.ssiu_arch, SSIU, {'upscale': 3, 'num_feat': 16, 'num_block': 3}),
    (ssiu_arch.archs.idsanet_arch, IDSANet, {'upscale': 2, 'num_feat': 16, 'num_block': 2, 'num_heads': 2}),
])
def test_network_file_runs_alone_without_basicsr(tmp_path, module, cls, config):
    source = Path(module.__file__)
    folder = tmp_path / 'alone'
    folder.mkdir()
    shutil.copy(source, folder / source.name)
    net = cls(**config).eval()
    x = torch.rand(2, 3, 11, 17)
    torch.save({'config': config, 'params': net.state_dict(), 'input': x}, tmp_path / 'in.pt')
    (tmp_path / 'run.py').write_text(STANDALONE)
    result = subprocess.run([sys.executable, '-I', str(tmp_path / 'run.py'), str(folder / source.name),
                             str(tmp_path / 'in.pt'), cls.__name__, str(tmp_path / 'out.pt')],
                            cwd=folder, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    with torch.no_grad():
        expected = net(x)
    assert (torch.load(tmp_path / 'out.pt', weights_only=True) - expected).abs().max() <= 1e-5


@pytest.mark.slow
def test_compiled_training_survives_validation_at_odd_sizes_and_new_shapes():
    torch.manual_seed(0)
    eager = SSIU(upscale=2, num_feat=16, num_block=1)  # one step keeps compiling quick
    net = copy.deepcopy(eager)
    compiled = torch.compile(net)
    optimizers = {id(m): torch.optim.Adam(m.parameters(), 1e-3) for m in (net, eager)}

    def train_step(shape):
        lr, hr = torch.rand(shape), torch.rand(shape[0], 3, 2 * shape[2], 2 * shape[3])
        outs = []
        for model, params in ((compiled, net), (eager, eager)):
            model.train()
            optimizers[id(params)].zero_grad()
            out = model(lr)
            loss = F.l1_loss(out, hr)
            loss.backward()
            optimizers[id(params)].step()
            assert torch.isfinite(loss)
            outs.append(out.detach())
        assert (outs[0] - outs[1]).abs().max() <= 1e-4

    train_step((2, 3, 24, 24))
    x = torch.rand(1, 3, 19, 27)
    with torch.no_grad():
        assert (compiled.eval()(x) - eager.eval()(x)).abs().max() <= 1e-4
    train_step((3, 3, 32, 20))
