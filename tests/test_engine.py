"""CPU inference engine: the reference network's function, and the one decision of when it runs."""
from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from conftest import REFERENCES, load_reference
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ssiu_arch.archs.ssiu_arch import ESAM, MSGM, SSIU, SSRMStep
from ssiu_arch.cpu import engine, kernels, training
from ssiu_arch.cpu.engine import ENGINE


def tiny(upscale=2, num_block=4, num_feat=32, std=0.15, **kw) -> SSIU:
    """A small network with weights large enough that every branch matters (``std`` None: default init)."""
    net = SSIU(upscale=upscale, num_feat=num_feat, num_block=num_block, **kw).eval()
    for p in net.parameters() if std else ():
        p.data.normal_(0, std)
    return net


def reference(net: SSIU, x: torch.Tensor, return_aux: bool = False):
    """The reference forward (the network's own modules) of ``net``."""
    net.use_engine = False
    try:
        with torch.no_grad():
            return net(x, return_aux=return_aux)
    finally:
        net.use_engine = True


NEEDS_BF16 = pytest.mark.skipif(not kernels.bf16_available(), reason='the CPU lacks avx512_bf16 (bfloat16 kernels)')


def assert_same(got, expected, tol=1e-5):
    (out, aux), (ref, ref_aux) = got, expected
    assert (out - ref).abs().max() <= tol
    assert aux['gates'].shape == ref_aux['gates'].shape
    assert (aux['gates'] - ref_aux['gates']).abs().max() <= 1e-6
    assert len(aux['step_outputs']) == len(ref_aux['step_outputs']) == 3
    for a, b in zip(aux['step_outputs'], ref_aux['step_outputs']):
        assert (a - b).abs().max() <= tol


def test_engine_is_installed_and_the_network_file_is_the_checked_one():
    assert SSIU.engine is ENGINE
    assert kernels.available(), 'compiled kernels missing: install with a C++ compiler (pip install -e .)'
    assert engine.network_digest() == engine.NETWORK_DIGEST, (
        'ssiu_arch/archs/ssiu_arch.py changed: check that the engine still computes the network (tests/test_engine.py)'
        ', then set engine.NETWORK_DIGEST to engine.network_digest()')


@pytest.mark.parametrize('maps', ['whole', 'bands'])
@pytest.mark.parametrize('scale, size', [(2, (17, 23)), (3, (9, 30)), (4, (33, 19))])
def test_engine_matches_the_reference(scale, size, maps, monkeypatch):
    net = tiny(scale)
    x = torch.rand(2, 3, *size)
    if maps == 'bands':  # 3 rows per band: several bands, a short last one
        monkeypatch.setattr(ENGINE, 'whole_map_bytes', 0)
        monkeypatch.setattr(ENGINE, 'band_bytes', 3 * 48 * 32 * 4)
    padded = torch.empty(1, 3, -(-size[0] // 16) * 16, 48)
    assert ENGINE.band_rows(net, padded) == (3 if maps == 'bands' else None)
    with torch.no_grad():
        assert ENGINE.accepts(net, x)
        got = net(x, return_aux=True)
        assert torch.equal(net(x), got[0])
    expected = reference(net, x, return_aux=True)
    assert (expected[0] - F.interpolate(x, scale_factor=scale, mode='bilinear')).abs().mean() > 0.2  # the body counts
    assert_same(got, expected)


@pytest.mark.parametrize('kw', [dict(kernel_size=5, num_feat=16), dict(expansion=2.0, num_heads=2),
                                dict(attn_downsample=1, block_size=8), dict(halo=2, block_size=4, pad_multiple=8),
                                dict(num_block=2)])
def test_engine_matches_the_reference_on_other_hyper_parameters(kw, monkeypatch):
    net = tiny(**{'upscale': 3, 'std': None, **kw})
    x = torch.rand(1, 3, 21, 18)
    with torch.no_grad():
        assert ENGINE.accepts(net, x)
        got = net(x, return_aux=True)
    assert_same(got, reference(net, x, return_aux=True))
    monkeypatch.setattr(ENGINE, 'whole_map_bytes', 0)
    monkeypatch.setattr(ENGINE, 'band_bytes', 1)  # one row per band
    with torch.no_grad():
        assert_same(net(x, return_aux=True), got)


@pytest.mark.parametrize('bands', [False, True], ids=['whole', 'bands'])
@pytest.mark.parametrize('path', REFERENCES, ids=lambda p: p.stem)
def test_published_reference_outputs_on_the_engine(path, bands, tmp_path, monkeypatch):
    from ssiu_arch.tools.convert import convert
    from ssiu_arch.utils.weights import load_ssiu

    ref = load_reference(path)
    torch.save(ref['official_checkpoint'], tmp_path / 'official.pt')
    convert(tmp_path / 'official.pt', tmp_path / 'net.pth')
    net = load_ssiu(tmp_path / 'net.pth').eval()
    if bands:
        monkeypatch.setattr(ENGINE, 'whole_map_bytes', 0)
        monkeypatch.setattr(ENGINE, 'band_bytes', 1)
    with torch.no_grad():
        assert ENGINE.accepts(net, ref['input'])
        out = net(ref['input'])
    assert (out - ref['output']).abs().max() <= 1e-4


@pytest.mark.parametrize('retained', [True, False])
def test_row_bands_where_allocations_would_fault(monkeypatch, retained):
    monkeypatch.setattr(engine, 'freed_memory_retained', lambda: retained)
    net = SSIU(upscale=2)
    assert ENGINE.band_rows(net, torch.empty(1, 3, 256, 256)) is None  # 16 MiB maps
    # 64 MiB maps: above every mmap threshold, whole only where freed memory stays with the process
    assert ENGINE.band_rows(net, torch.empty(1, 3, 512, 512)) == (None if retained else 64)
    assert ENGINE.band_rows(net, torch.empty(1, 3, 1024, 1024)) == 32  # 256 MiB maps: 8 MiB bands in any case
    monkeypatch.setattr(ENGINE, 'band_bytes', 0)
    assert ENGINE.band_rows(net, torch.empty(1, 3, 1024, 1024)) is None


@pytest.mark.parametrize('bf16', [False, pytest.param(True, marks=NEEDS_BF16)], ids=['fp32', 'bf16'])
@pytest.mark.parametrize('scale', [2, 3, 4])
def test_tail_tap_sums_match_the_tail_modules(monkeypatch, scale, bf16):
    """Tap sums of the tail, in bands of any number of rows, equal ``tail``'s own modules on NCHW maps (in
    bfloat16, within 1e-2 of outputs of about 1)."""
    net = tiny(upscale=scale, num_feat=64, std=None)
    for (batch, h, w), rows in [((2, 9, 13), (1, 2, 3, 4, 9)), ((1, 7, 5), (2, 3, 6)), ((1, 2, 3), (1, 2))]:
        feat = torch.randn(batch, h, w, 64)
        with torch.no_grad():
            expected = net.tail(feat.permute(0, 3, 1, 2))
        for band_rows in rows:  # bands of 2 rows at least; a last band of one row joins the one before
            monkeypatch.setattr(ENGINE, 'tail_band_pixels', band_rows * w * scale * scale)
            with torch.inference_mode():
                got = ENGINE._reconstruct(net, feat, bf16)
            assert (got - expected).abs().max() <= (1e-2 if bf16 else 1e-5), (batch, h, w, band_rows)


class HookedMSGM(MSGM):
    pass


class OtherESAM(ESAM):
    def forward(self, x):
        return super().forward(x) * 0.5


class PlainStep(SSRMStep):
    pass


def _grad_input(net, x):
    return x.requires_grad_()


def _grad_parameter(net, x):
    net.body[1].s2.project_out.weight.requires_grad_()
    return x


def _trainable_esam(net, x):
    net.requires_grad_(False)
    for p in net.body[0].s3.parameters():
        p.requires_grad_()
    return x


def _subclass(name):
    def swap(net, x):
        step = net.body[1]
        if name == 'step':
            new = PlainStep(32, kernel_size=3)
            new.load_state_dict(step.state_dict())
            net.body[1] = new
        else:
            old = getattr(step, name)
            new = (HookedMSGM(32) if name == 's2' else OtherESAM(32))
            new.load_state_dict(old.state_dict())
            setattr(step, name, new)
        return x
    return swap


def _replaced_module(net, x):
    net.body[1].s1.act = nn.ReLU()
    return x


def _approximate_gelu(net, x):
    net.tail[2].approximate = 'tanh'
    return x


def _hook(where, pre):
    def register(net, x):
        module = net if where == 'net' else net.body[0].s3.qkv_conv
        if pre:
            module.register_forward_pre_hook(lambda m, args: None)
        else:
            module.register_forward_hook(lambda m, args, out: None)
        return x
    return register


def _no_kernels(net, x):
    kernels.available()
    kernels._LOADED = False
    return x


def _switched_off(net, x):
    net.use_engine = False
    return x


def _backward_hook(net, x):
    net.body[0].s1.register_full_backward_hook(lambda m, grad_in, grad_out: None)
    return x


REFUSED = {  # tiny() has ESAM heads of 8 channels, which the training path's attention kernel does not cover
    'input requires grad, heads of 8': _grad_input,
    'a parameter requires grad, heads of 8': _grad_parameter,
    'frozen trunk, trainable ESAM, heads of 8': _trainable_esam,
    'backward hook on a submodule': _backward_hook,
    'float64': lambda net, x: (net.double(), x.double())[1],
    'bfloat16 input': lambda net, x: x.bfloat16(),
    'kernels not loaded': _no_kernels,
    'use_engine False': _switched_off,
    'forward hook on the net': _hook('net', False),
    'forward pre-hook on the net': _hook('net', True),
    'forward hook on a submodule': _hook('sub', False),
    'forward pre-hook on a submodule': _hook('sub', True),
    'MSGM subclass': _subclass('s2'),
    'ESAM subclass': _subclass('s3'),
    'SSRMStep subclass': _subclass('step'),
    'replaced submodule': _replaced_module,
    'approximate GELU in the tail': _approximate_gelu,
}


@pytest.mark.parametrize('case', REFUSED)
def test_engine_stands_aside(case, monkeypatch):
    monkeypatch.setattr(kernels, '_LOADED', kernels.available())  # restored after the test
    net = tiny(num_block=2).requires_grad_(False)
    x = torch.rand(1, 3, 16, 16)
    assert ENGINE.accepts(net, x)  # autograd is on, but nothing needs a gradient
    x = REFUSED[case](net, x)
    assert not ENGINE.accepts(net, x)
    if x.dtype == torch.bfloat16:  # the reference refuses it too
        return
    out = net(x)
    use_engine, net.use_engine = net.use_engine, False
    assert torch.equal(out, net(x))  # the refused call is the reference forward
    net.use_engine = use_engine


def _graph_nodes(t: torch.Tensor) -> set[str]:
    """Names of the autograd nodes ``t`` was computed by."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(type(node).__name__)
        todo.extend(next_node for next_node, _ in node.next_functions)
    return names


def _loss(out, aux):
    """A loss that reaches every output: the image, the step outputs and the gates."""
    return out.square().mean() + sum(s.abs().mean() for s in aux['step_outputs']) + aux['gates'].var()


def _pool_gap(net: SSIU, x: torch.Tensor) -> float:
    """Smallest gap between the largest and second-largest value of any ESAM max-pooling window in ``net(x)``."""
    gaps = []

    def measure(module, args, out):
        t = args[0]
        b, c, h, w = t.shape
        windows = t.reshape(b, c, h // 2, 2, w // 2, 2).transpose(3, 4).reshape(b, c, h // 2, w // 2, 4)
        top = windows.topk(2, dim=-1).values
        gaps.append(float((top[..., 0] - top[..., 1]).min()))

    handles = [step.s3.pool.register_forward_hook(measure) for step in net.body
               if isinstance(step.s3.pool, nn.MaxPool2d)]
    try:
        reference(net, x)
    finally:
        for handle in handles:
            handle.remove()
    return min(gaps, default=float('inf'))


def _input_without_pool_ties(net: SSIU, shape: tuple[int, ...]) -> torch.Tensor:
    """A random input on which no max-pooling window is within float32 rounding of a tie: there the gradient is
    discontinuous, and two float32 computations (or float32 and float64) may route it to different pixels."""
    for _ in range(20):
        x = torch.rand(shape)
        if _pool_gap(net, x) > 5e-6:
            return x
    raise AssertionError('no input without max-pooling near-ties in 20 draws')


TRAINABLE = {
    'all parameters': lambda net, x: x,
    'input and parameters': lambda net, x: x.requires_grad_(),
    'only ESAM': lambda net, x: (net.requires_grad_(False), [p.requires_grad_() for p in net.body[0].s3.parameters()],
                                 x)[-1],
}


KERNEL_NODES = {'HaloAttentionBackward', 'GatedConv1x1Backward', 'DepthwiseReflectBackward', 'Conv1x1Backward',
                'SharedInputConv1x1Backward', 'UpsampleUpdateBackward', 'MoEMixBackward', 'TapSumBackward',
                'ChannelNormBackward', 'PoolKeepBackward'}


@pytest.mark.parametrize('kw', [dict(num_feat=32, num_heads=2),
                                dict(num_feat=32, num_heads=2, upscale=4, block_size=4, halo=2, pad_multiple=8),
                                dict(num_feat=64, num_block=3, upscale=3),
                                dict(num_feat=32, num_heads=2, attn_downsample=1, pad_multiple=8),
                                dict(num_feat=32, num_heads=2, kernel_size=7, expansion=1.5),
                                dict(num_feat=32, num_heads=2, num_block=1)])  # experts: the head's map twice
@pytest.mark.parametrize('trainable', TRAINABLE)
def test_training_path_gives_the_reference_outputs_and_gradients(kw, trainable, monkeypatch):
    monkeypatch.setattr(training, 'FORCED_BACKWARD', 'kernel')  # whichever this CPU would choose
    _check_training_path(kw, trainable)


@pytest.mark.parametrize('trainable', TRAINABLE)
def test_training_path_with_onednn_1x1_backward(trainable, monkeypatch):
    """Where oneDNN's 1x1 backward is the faster one on the CPU, the training path uses it, input gradients of
    convolutions that read one map summed by the shared function."""
    monkeypatch.setattr(training, 'FORCED_BACKWARD', 'onednn')
    _check_training_path(dict(num_feat=32, num_heads=2), trainable)


def test_1x1_backward_is_timed_per_pattern_and_shape_on_the_first_pass(monkeypatch):
    """Each pattern of 1x1 convolution backward is timed both ways on its first call at a shape, on the call's own
    tensors, and the faster runs from then on; the caller's random stream stays untouched."""
    monkeypatch.setattr(training, '_CHOICES', {})
    torch.manual_seed(0)
    net, x = tiny(num_feat=32, num_heads=2).train(), torch.rand(2, 3, 16, 16)
    state = torch.get_rng_state()
    net(x).square().mean().backward()
    assert torch.equal(torch.get_rng_state(), state)
    choices = training.backward_choices()
    assert {key[0] for key in choices} == {'conv1x1', 'shared', 'gated'}
    for key, (chosen, times) in choices.items():
        assert key[-1] == torch.get_num_threads()
        assert set(times) == {'kernel', 'onednn'} and all(0 < t < 1 for t in times.values())
        assert chosen == min(times, key=times.get)
    assert ('shared', (2, 32, 16, 16), '-> 32+32+32+32, + dx', torch.get_num_threads()) in choices  # LN(a)'s four
    net(x).square().mean().backward()
    assert training.backward_choices() == choices  # nothing timed again


def test_1x1_backward_times_a_few_shapes_per_pattern_then_reuses_the_nearest(monkeypatch):
    """Training on images of many sizes does not time every backward pass: past MAX_TIMED_SHAPES shapes of a pattern,
    a new shape runs the choice of the nearest timed one, and the gradients are the reference's still."""
    monkeypatch.setattr(training, '_CHOICES', {})
    monkeypatch.setattr(training, 'MAX_TIMED_SHAPES', 2)
    torch.manual_seed(0)
    net = tiny(num_feat=32, num_heads=2, num_block=1).train()
    for size in (16, 32, 48):
        x = torch.rand(1, 3, size, size)
        got = torch.autograd.grad(net(x).square().mean(), list(net.parameters()))
    groups = {}
    for pattern, shape, detail, _ in training.backward_choices():
        groups.setdefault((pattern, detail), []).append(shape)
    assert groups and all(len(shapes) <= 2 for shapes in groups.values())
    assert not any(shape[-1] == 48 for shapes in groups.values() for shape in shapes)  # the third size: not timed
    net.use_engine = False
    expected = torch.autograd.grad(net(x).square().mean(), list(net.parameters()))
    got, expected = (torch.cat([g.flatten() for g in grads]) for grads in (got, expected))
    assert (got - expected).norm() <= 1e-5 * expected.norm()


def _check_training_path(kw: dict, trainable: str) -> None:
    torch.manual_seed(0)
    net = tiny(**kw).train()
    x = TRAINABLE[trainable](net, _input_without_pool_ties(net, (2, 3, 19, 26)))
    assert ENGINE.accepts(net, x)
    out, aux = net(x, return_aux=True)
    nodes = _graph_nodes(out)
    expected_nodes = KERNEL_NODES - ({'UpsampleUpdateBackward', 'PoolKeepBackward'} if kw.get('attn_downsample') == 1
                                     else set())
    if trainable == 'only ESAM' and kw.get('num_block') == 1:  # no gradient reaches the first LayerNorm or pooling
        expected_nodes -= {'ChannelNormBackward', 'PoolKeepBackward'}
    assert expected_nodes <= nodes  # the kernels ran
    leaves = [t for t in [x, *net.parameters()] if t.requires_grad]
    got = torch.autograd.grad(_loss(out, aux), leaves)
    net.use_engine = False
    ref_out, ref_aux = net(x, return_aux=True)
    assert not KERNEL_NODES & _graph_nodes(ref_out)
    expected = torch.autograd.grad(_loss(ref_out, ref_aux), leaves)
    assert (out - ref_out).abs().max() <= 1e-5
    for a, b in zip(aux['step_outputs'], ref_aux['step_outputs']):
        assert (a - b).abs().max() <= 1e-5
    assert (aux['gates'] - ref_aux['gates']).abs().max() <= 1e-6
    # Float32 rounding differs between the two (kernels sum in other orders), and these small random-weight networks
    # amplify it (at x4 with 4x4 blocks the float32 modules are 1-2e-5 from float64): both are held to the float64
    # gradient, the kernels as close to it as the modules.
    net64 = copy.deepcopy(net).double()
    leaves64 = [t for t in [x.detach().double().requires_grad_(x.requires_grad), *net64.parameters()]
                if t.requires_grad]
    exact = torch.autograd.grad(_loss(*net64(leaves64[0] if x.requires_grad else x.double(), return_aux=True)),
                                leaves64)
    flat = [torch.cat([g.double().flatten() for g in grads]) for grads in (got, expected, exact)]
    err_engine, err_reference = ((f - flat[2]).norm() / flat[2].norm() for f in flat[:2])
    assert err_engine <= 1.5 * err_reference + 1e-6
    assert all(g.abs().sum() > 0 for g in got)


def test_training_path_stands_aside_where_its_kernels_do_not_apply():
    net, x = tiny(num_feat=32, num_heads=2), torch.rand(1, 3, 16, 16)
    assert ENGINE.accepts(net, x)  # gradients needed, heads of 16 channels
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not ENGINE.accepts(net, x)  # autocast training: the reference forward, as autocast has it
    assert not ENGINE.accepts(tiny(num_feat=32, num_heads=4), x)  # heads of 8 channels
    assert not ENGINE.accepts(tiny(num_feat=32, num_heads=1, block_size=10, pad_multiple=20), x)  # 144 keys
    out = net(x)
    net.use_engine = False
    assert torch.allclose(out, net(x), atol=1e-5)


def test_engine_stands_aside_for_a_global_hook():
    net, x = tiny(), torch.rand(1, 3, 16, 16)
    fired = []
    for register in (nn.modules.module.register_module_forward_hook,
                     nn.modules.module.register_module_forward_pre_hook):
        fired.clear()
        handle = register(lambda m, *args: fired.append(type(m)))
        try:
            with torch.no_grad():
                assert not ENGINE.accepts(net, x)
                net(x)
        finally:
            handle.remove()
        assert nn.Conv2d in fired
    with torch.no_grad():
        assert ENGINE.accepts(net, x)


def test_freed_memory_retained_reads_the_malloc_environment(monkeypatch):
    from ssiu_arch.cpu import memory

    monkeypatch.setattr(memory, '_RETAINED', False)
    for key in ('MALLOC_MMAP_THRESHOLD_', 'MALLOC_TRIM_THRESHOLD_', 'LD_PRELOAD'):
        monkeypatch.delenv(key, raising=False)
    assert not memory.freed_memory_retained()
    monkeypatch.setenv('LD_PRELOAD', '/usr/lib/libjemalloc.so.2')
    assert memory.freed_memory_retained()
    monkeypatch.delenv('LD_PRELOAD')
    monkeypatch.setenv('MALLOC_TRIM_THRESHOLD_', '1000000000')
    assert memory.freed_memory_retained()


def test_engine_stands_aside_for_the_environment_switch(monkeypatch):
    net, x = tiny(), torch.rand(1, 3, 16, 16)
    monkeypatch.setenv('SSIU_NO_KERNELS', '1')
    with torch.no_grad():
        assert not ENGINE.accepts(net, x)
    monkeypatch.setenv('SSIU_NO_KERNELS', '0')
    with torch.no_grad():
        assert ENGINE.accepts(net, x)


def test_engine_runs_under_bf16_autocast_exactly_where_its_bf16_kernels_can(monkeypatch):
    net, x = tiny(), torch.rand(1, 3, 16, 16)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.float16):
        assert not ENGINE.accepts(net, x)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert ENGINE.accepts(net, x) == kernels.bf16_available()
    monkeypatch.setenv('SSIU_NO_BF16', '1')  # bfloat16 kernels off: the reference forward runs under autocast
    assert not kernels.bf16_available()
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert not ENGINE.accepts(net, x)
        out = net(x)
    with torch.no_grad():
        assert ENGINE.accepts(net, x)  # float32 is unaffected
        assert torch.isfinite(out).all() and not torch.equal(out, net(x))
    monkeypatch.setenv('SSIU_NO_KERNELS', '1')
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert not ENGINE.accepts(net, x)


@NEEDS_BF16
def test_engine_refusals_hold_under_bf16_autocast():
    net, x = tiny(), torch.rand(1, 3, 16, 16)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not ENGINE.accepts(net, x.clone().requires_grad_())  # autograd on and a gradient needed
        with torch.no_grad():
            assert ENGINE.accepts(net, x)
            assert not ENGINE.accepts(net, x.double())
            handle = net.body[0].register_forward_hook(lambda *args: None)
            assert not ENGINE.accepts(net, x)
            handle.remove()
            net.body[0].s3.scale = 1.0
            assert not ENGINE.accepts(net, x)
            net = tiny()
            net.use_engine = False
            assert not ENGINE.accepts(net, x)


@NEEDS_BF16
@pytest.mark.parametrize('maps', ['whole', 'bands'])
@pytest.mark.parametrize('scale, size', [(2, (17, 23)), (3, (9, 30)), (4, (33, 19))])
def test_bf16_engine_close_to_the_float32_reference(scale, size, maps, monkeypatch):
    """bfloat16 operands in the products only: float32 output within 3e-2 (mean 4e-3) of the float32 reference on
    outputs of about 2, and closer than the reference network under the same autocast."""
    net = tiny(scale)
    x = torch.rand(2, 3, *size)
    if maps == 'bands':
        monkeypatch.setattr(ENGINE, 'whole_map_bytes', 0)
        monkeypatch.setattr(ENGINE, 'band_bytes', 3 * 48 * 32 * 4)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        assert ENGINE.accepts(net, x)
        out, aux = net(x, return_aux=True)
        assert torch.equal(net(x), out)
    ref, ref_aux = reference(net, x, return_aux=True)
    net.use_engine = False
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        autocast_error = (net(x).float() - ref).abs().mean()
    assert out.dtype == torch.float32 and out.shape == ref.shape
    error = (out - ref).abs()
    assert 0 < error.mean() <= min(4e-3, autocast_error) and error.max() <= 3e-2
    assert (aux['gates'] - ref_aux['gates']).abs().max() <= 2e-2
    for a, b in zip(aux['step_outputs'], ref_aux['step_outputs']):
        assert (a - b).abs().max() <= 3e-2


def test_engine_stands_aside_under_a_flop_counter():
    net, x = tiny(), torch.rand(1, 3, 16, 16)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        assert not ENGINE.accepts(net, x)
        net(x)
    assert counter.get_total_flops() > 0


def test_engine_stands_aside_when_tracing_compiling_or_exporting(monkeypatch):
    net, x = tiny(), torch.rand(1, 3, 16, 16)
    seen = []
    accepts = ENGINE.accepts
    monkeypatch.setattr(ENGINE, 'accepts', lambda n, t: seen.append(accepts(n, t)) or seen[-1])
    with torch.no_grad():
        traced = torch.jit.trace(net, x, check_trace=False)
        assert seen == [False]
        assert (traced(x) - reference(net, x)).abs().max() <= 1e-5
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    with torch.no_grad():
        assert not accepts(net, x)
    monkeypatch.undo()
    monkeypatch.setattr(torch.onnx, 'is_in_onnx_export', lambda: True)
    with torch.no_grad():
        assert not accepts(net, x)


def test_engine_stands_aside_inside_torch_compile(monkeypatch):
    net, x = tiny(num_block=1), torch.rand(1, 3, 16, 16)
    monkeypatch.setattr(ENGINE, 'run', lambda *args: pytest.fail('the engine ran inside torch.compile'))
    try:
        with torch.no_grad():
            out = torch.compile(net, backend='eager')(x)
    finally:
        torch._dynamo.reset()  # later compiles of SSIU.forward start from static shapes again
    assert (out - reference(net, x)).abs().max() <= 1e-5


def _random_configurations(count: int, seed: int) -> list[tuple[dict, tuple[int, ...]]]:
    """``count`` (hyper-parameters, input shape) pairs drawn over what SSIU accepts: the engine runs some and stands
    aside for the others (heads narrower than its kernels, unsupported kernel sizes, ...)."""
    rng = random.Random(seed)
    drawn = []
    while len(drawn) < count:
        heads, feat, block, downsample = rng.choice([1, 2, 4]), rng.choice([16, 32, 48, 64]), rng.choice([4, 8]), \
            rng.choice([1, 2])
        if (feat // heads) % 2:
            continue
        channels = rng.choice([1, 3])
        kw = dict(upscale=rng.choice([1, 2, 3, 4]), num_feat=feat, num_block=rng.choice([1, 2, 3]), num_heads=heads,
                  block_size=block, halo=rng.choice([0, 1, 2]), attn_downsample=downsample,
                  expansion=rng.choice([1.0, 1.5, 2.0]), kernel_size=rng.choice([3, 5, 7]), num_in_ch=channels,
                  num_out_ch=channels, pad_multiple=block * downsample * rng.choice([1, 2]))
        drawn.append((kw, (rng.choice([1, 2]), channels, rng.randint(5, 40), rng.randint(5, 40))))
    return drawn


RANDOM_CONFIGURATIONS = _random_configurations(8, seed=2)


def test_random_configurations_reach_the_engine():
    """The draw below is not all refusals: the engine runs the float32 inference of most and trains some."""
    inference = training_path = 0
    for kw, shape in RANDOM_CONFIGURATIONS:
        net, x = tiny(**kw), torch.rand(shape)
        with torch.no_grad():
            inference += ENGINE.accepts(net, x)
        training_path += ENGINE.accepts(net.train(), x)
    assert inference >= 4 and training_path >= 2


@pytest.mark.parametrize('kw, shape', RANDOM_CONFIGURATIONS, ids=[
    f"x{kw['upscale']}-feat{kw['num_feat']}-heads{kw['num_heads']}-block{kw['block_size']}-halo{kw['halo']}-"
    f"k{kw['kernel_size']}-{'x'.join(map(str, shape))}" for kw, shape in RANDOM_CONFIGURATIONS])
def test_engine_matches_the_reference_on_random_configurations(kw, shape):
    """Whatever the engine does with a network, running it or standing aside, the result is the modules': float32
    outputs in inference, outputs and all gradients in training."""
    torch.manual_seed(0)
    net, x = tiny(**kw), torch.rand(shape)
    with torch.no_grad():
        out, ref = net(x), reference(net, x)
    assert (out - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max().item())
    net.train()
    x.requires_grad_()
    leaves = [x, *net.parameters()]
    got = torch.autograd.grad(net(x).square().mean(), leaves)
    net.use_engine = False
    expected = torch.autograd.grad(net(x).square().mean(), leaves)
    got, expected = (torch.cat([g.flatten() for g in grads]) for grads in (got, expected))
    assert (got - expected).norm() <= 1e-5 * expected.norm()


@pytest.mark.parametrize('kw', [dict(num_feat=24, num_heads=4), dict(kernel_size=9, num_feat=16),
                                dict(expansion=1.5, num_feat=16)])
def test_engine_stands_aside_for_unsupported_hyper_parameters(kw):
    net = SSIU(upscale=2, num_block=2, **kw).eval()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert not ENGINE.accepts(net, x)
        out = net(x)
    assert (out - reference(net, x)).abs().max() == 0


def test_engine_stands_aside_for_changed_attributes():
    net, x = tiny(), torch.rand(1, 3, 16, 16)
    net.body[0].s3.scale = 1.0
    with torch.no_grad():
        assert not ENGINE.accepts(net, x)
    net = tiny()
    net.tail[-1].padding_mode = 'zeros'
    with torch.no_grad():
        assert not ENGINE.accepts(net, x)
    net = tiny()
    net.body[0].norm.body = nn.LayerNorm(32, elementwise_affine=False)
    with torch.no_grad():
        assert not ENGINE.accepts(net, x)


def test_engine_stands_aside_for_a_changed_network_file(monkeypatch):
    net, x = tiny(), torch.rand(1, 3, 16, 16)
    monkeypatch.setattr(engine, '_NETWORK_KNOWN', False)
    with torch.no_grad():
        assert not ENGINE.accepts(net, x)


def test_engine_runs_under_inference_mode_and_with_frozen_weights():
    net = tiny().requires_grad_(False)
    x = torch.rand(1, 3, 16, 16)
    assert ENGINE.accepts(net, x)  # autograd on, but nothing needs a gradient
    with torch.inference_mode():
        assert ENGINE.accepts(net, x)
        out = net(x)
    assert (out - reference(net, x)).abs().max() <= 1e-5


@NEEDS_BF16
def test_bf16_engine_sees_weight_changes():
    """bfloat16 weights are rounded from the parameters on every call: an in-place change is never missed."""
    net, x = tiny(), torch.rand(1, 3, 16, 16)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        before = net(x)
        net.body[0].s1.project_out.weight.mul_(-2)
        net.tail[-1].weight.add_(0.1)
        after = net(x)
    ref = reference(net, x)
    assert (before - ref).abs().mean() > 0.05 and (after - ref).abs().mean() <= 4e-3
