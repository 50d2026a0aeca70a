"""SSIU losses: registration, published FFT loss, SSIM against BasicSR's metric, MoE load balancing."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from basicsr.losses import build_loss
from basicsr.metrics import calculate_ssim
from basicsr.metrics.psnr_ssim import calculate_ssim_pt
from basicsr.utils.registry import LOSS_REGISTRY
from ssiu_arch.losses import FFTLoss, MoELoadBalancingLoss, SSIMUnfoldingLoss, gaussian_kernel1d, ssim

BENCHMARK = Path(__file__).parent / 'data' / 'benchmark'


def test_the_losses_import_on_their_own():
    """``from ssiu_arch.losses import ...`` in a fresh process, before ``ssiu_arch.models``: basicsr 1.4.2 does not
    import beside current torchvision without the compatibility fixes, which the package applies first."""
    code = ('from ssiu_arch.losses import FFTLoss\n'
            'from basicsr.utils.registry import LOSS_REGISTRY\n'
            'assert LOSS_REGISTRY.get("FFTLoss") is FFTLoss and "SSIMUnfoldingLoss" in LOSS_REGISTRY\n')
    run = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


def to_tensor(img_bgr: np.ndarray) -> torch.Tensor:
    """HWC BGR uint8 -> (1, 3, H, W) RGB float in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(img_bgr[..., ::-1])).permute(2, 0, 1)[None].float() / 255


def bicubic_pairs(scale: int, names: tuple[str, ...] | None = None) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(name, bicubic upscale of the benchmark LR, HR cropped to LR * scale) as HWC BGR uint8."""
    pairs = []
    for hr_path in sorted(BENCHMARK.glob('Set*/HR/*.png')):
        if names is not None and hr_path.stem not in names:
            continue
        lr_path = hr_path.parents[1] / 'LR_bicubic' / f'X{scale}' / f'{hr_path.stem}x{scale}.png'
        lr = cv2.imread(str(lr_path), cv2.IMREAD_COLOR)
        h, w = lr.shape[:2]
        hr = cv2.imread(str(hr_path), cv2.IMREAD_COLOR)[:h * scale, :w * scale]
        pairs.append((hr_path.stem, cv2.resize(lr, (w * scale, h * scale), interpolation=cv2.INTER_CUBIC), hr))
    return pairs


def hr_crops(n: int = 2, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of real image crops: HR and the bicubic upscale of the X2 LR."""
    pairs = bicubic_pairs(2, ('baby', 'bird', 'butterfly', 'comic')[:n])
    up = torch.cat([to_tensor(p[1][:size, :size]) for p in pairs])
    hr = torch.cat([to_tensor(p[2][:size, :size]) for p in pairs])
    return up, hr


def test_registered_and_built_from_options():
    for name, cls in [('FFTLoss', FFTLoss), ('SSIMUnfoldingLoss', SSIMUnfoldingLoss),
                      ('MoELoadBalancingLoss', MoELoadBalancingLoss)]:
        assert LOSS_REGISTRY.get(name) is cls
    loss = build_loss({'type': 'SSIMUnfoldingLoss', 'loss_weight': 0.5, 'step_weights': [0, 0.1, 0.2],
                       'y_channel': True})
    assert isinstance(loss, SSIMUnfoldingLoss) and loss.step_weights == [0.0, 0.1, 0.2]


@pytest.mark.parametrize('cls', [FFTLoss, SSIMUnfoldingLoss, MoELoadBalancingLoss])
def test_bad_reduction(cls):
    with pytest.raises(ValueError, match='reduction'):
        cls(reduction='avg')


# FFT loss -------------------------------------------------------------------------------------------------------------

def test_fft_loss_equals_published_formula():
    pred, target = torch.rand(2, 3, 17, 20), torch.rand(2, 3, 17, 20)
    pred_fft, target_fft = torch.fft.rfft2(pred, dim=(-2, -1)), torch.fft.rfft2(target, dim=(-2, -1))
    published = torch.nn.L1Loss()(torch.stack([pred_fft.real, pred_fft.imag], dim=-1),
                                  torch.stack([target_fft.real, target_fft.imag], dim=-1))
    assert torch.equal(FFTLoss()(pred, target), published)
    assert torch.equal(FFTLoss(loss_weight=0.01)(pred, target), 0.01 * published)


def test_fft_loss_against_numpy_and_reductions():
    up, hr = hr_crops()
    diff = np.fft.rfft2(up.double().numpy()) - np.fft.rfft2(hr.double().numpy())
    elementwise = np.stack([np.abs(diff.real), np.abs(diff.imag)], axis=-1)
    none = FFTLoss(reduction='none')(up, hr)
    assert none.shape == (2, 3, 32, 17, 2)
    np.testing.assert_allclose(none.numpy(), elementwise, rtol=1e-4, atol=1e-4)
    assert FFTLoss()(up, hr).item() == pytest.approx(elementwise.mean(), rel=1e-5)
    assert FFTLoss(reduction='sum')(up, hr).item() == pytest.approx(elementwise.sum(), rel=1e-5)
    assert FFTLoss()(hr, hr).item() == 0


def test_fft_loss_gradient_and_bad_input():
    pred = torch.rand(1, 3, 8, 8, requires_grad=True)
    FFTLoss()(pred, torch.rand(1, 3, 8, 8)).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    with pytest.raises(ValueError, match='shapes differ'):
        FFTLoss()(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError, match=r'\(N, C, H, W\)'):
        FFTLoss()(torch.rand(3, 8, 8), torch.rand(3, 8, 8))


# SSIM -----------------------------------------------------------------------------------------------------------------

def test_gaussian_window_is_opencv_window():
    np.testing.assert_allclose(gaussian_kernel1d(11, 1.5).numpy(), cv2.getGaussianKernel(11, 1.5)[:, 0], rtol=1e-12)


@pytest.mark.parametrize('scale, names', [(2, ('baby', 'bird', 'butterfly', 'head', 'woman', 'bridge')),
                                          (4, ('baboon', 'comic', 'face', 'lenna', 'zebra'))])
def test_ssim_y_matches_basicsr_calculate_ssim_on_bicubic_pairs(scale, names):
    """Acceptance: SSIM on Y equals BasicSR's calculate_ssim(crop_border=0, test_y_channel=True) within 2e-4."""
    pairs = bicubic_pairs(scale, names)
    assert len(pairs) == len(names)
    for name, up, hr in pairs:
        reference = calculate_ssim(up, hr, crop_border=0, test_y_channel=True)
        value = ssim(to_tensor(up), to_tensor(hr), y_channel=True).item()
        assert abs(value - reference) < 2e-4, (name, value, reference)


@pytest.mark.parametrize('y_channel', [False, True])
def test_ssim_matches_basicsr_calculate_ssim_pt_per_image(y_channel):
    up, hr = hr_crops(n=3, size=40)
    reference = calculate_ssim_pt(up, hr, crop_border=0, test_y_channel=y_channel)
    torch.testing.assert_close(ssim(up, hr, y_channel=y_channel, float64=True), reference, rtol=0, atol=1e-10)
    torch.testing.assert_close(ssim(up, hr, y_channel=y_channel), reference.float(), rtol=0, atol=5e-5)


def test_ssim_is_one_for_identical_images_and_differentiable():
    _, hr = hr_crops()
    torch.testing.assert_close(ssim(hr, hr), torch.ones(2))
    x = torch.rand(1, 2, 13, 12, dtype=torch.float64, requires_grad=True)
    y = torch.rand(1, 2, 13, 12, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a: ssim(a, y, float64=True), (x,), fast_mode=True)


def test_ssim_bad_input():
    with pytest.raises(ValueError, match='smaller than the 11x11 window'):
        ssim(torch.rand(1, 3, 10, 32), torch.rand(1, 3, 10, 32))
    with pytest.raises(ValueError, match='shapes differ'):
        ssim(torch.rand(1, 3, 16, 16), torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match='y_channel needs RGB'):
        ssim(torch.rand(1, 4, 16, 16), torch.rand(1, 4, 16, 16), y_channel=True)


def test_ssim_loss_final_output_and_reductions():
    up, hr = hr_crops()
    per_image = 1 - ssim(up, hr)
    torch.testing.assert_close(SSIMUnfoldingLoss(reduction='none')(up, hr), per_image)
    torch.testing.assert_close(SSIMUnfoldingLoss()(up, hr), per_image.mean())
    torch.testing.assert_close(SSIMUnfoldingLoss(loss_weight=2, reduction='sum')(up, hr), 2 * per_image.sum())
    assert SSIMUnfoldingLoss()(hr, hr).abs().item() < 1e-6
    # without step weights, step outputs are ignored
    torch.testing.assert_close(SSIMUnfoldingLoss()(up, hr, step_outputs=[hr, up]), per_image.mean())


def test_ssim_loss_step_weights():
    up, hr = hr_crops()
    steps = [up.flip(-1), (up + hr) / 2, hr]
    loss = SSIMUnfoldingLoss(step_weights=[0.5, 0, 0.25], y_channel=True)(up, hr, step_outputs=steps)
    expected = (1 - ssim(up, hr, y_channel=True)) + 0.5 * (1 - ssim(steps[0], hr, y_channel=True)) \
        + 0.25 * (1 - ssim(steps[2], hr, y_channel=True))
    torch.testing.assert_close(loss, expected.mean())


def test_ssim_loss_bad_input():
    up, hr = hr_crops()
    loss = SSIMUnfoldingLoss(step_weights=[0.1, 0.1, 0.1])
    with pytest.raises(ValueError, match='3 step_weights need as many step_outputs, got none'):
        loss(up, hr)
    with pytest.raises(ValueError, match='got 2'):
        loss(up, hr, step_outputs=[up, up])
    with pytest.raises(ValueError, match='step_weights must be >= 0'):
        SSIMUnfoldingLoss(step_weights=[0.1, -1])
    with pytest.raises(ValueError, match='smaller than'):
        SSIMUnfoldingLoss()(up[..., :8, :], hr[..., :8, :])


# MoE load balancing ---------------------------------------------------------------------------------------------------

def skewed_gates(strength: float, shape=(2, 3, 4, 6, 5)) -> torch.Tensor:
    """Gates whose expert 0 gets ``strength`` more logit everywhere, plus per-pixel noise."""
    logits = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    logits[:, 0] += strength
    return logits.softmax(dim=1)


def test_moe_loss_zero_for_balanced_gates():
    assert MoELoadBalancingLoss()(torch.full((2, 3, 4, 6, 5), 1 / 3)).abs().item() < 1e-6
    # balanced on average, not per pixel: expert k takes every gate on channel k
    one_hot = F.one_hot(torch.arange(3), 3).float().T[None, :, :, None, None].expand(2, 3, 3, 4, 4)
    assert MoELoadBalancingLoss()(one_hot).abs().item() < 1e-6


def test_moe_loss_grows_with_skew_and_is_cv_squared():
    values = [MoELoadBalancingLoss()(skewed_gates(s)).item() for s in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert all(a < b for a, b in zip(values, values[1:])), values
    gates = skewed_gates(1.0)
    importance = gates.mean(dim=(2, 3, 4))
    cv2_ = importance.var(dim=1, unbiased=False) / importance.mean(dim=1).square()
    torch.testing.assert_close(MoELoadBalancingLoss(reduction='none')(gates), cv2_)
    torch.testing.assert_close(MoELoadBalancingLoss(loss_weight=3, reduction='sum')(gates), 3 * cv2_.sum())
    collapsed = torch.zeros(1, 3, 2, 4, 4)
    collapsed[:, 1] = 1
    assert MoELoadBalancingLoss()(collapsed).item() == pytest.approx(2.0)  # E - 1


def test_moe_loss_optimisation_balances_a_skewed_gate():
    logits = torch.randn(2, 3, 4, 6, 5, generator=torch.Generator().manual_seed(2))
    logits[:, 0] += 3
    logits.requires_grad_(True)
    criterion = MoELoadBalancingLoss()
    optimizer = torch.optim.Adam([logits], lr=0.1)
    before = criterion(logits.softmax(dim=1)).item()
    spread_before = np.ptp(logits.softmax(dim=1).mean(dim=(0, 2, 3, 4)).tolist())
    for _ in range(10):
        optimizer.zero_grad()
        criterion(logits.softmax(dim=1)).backward()
        optimizer.step()
    after = criterion(logits.softmax(dim=1)).item()
    spread_after = np.ptp(logits.softmax(dim=1).mean(dim=(0, 2, 3, 4)).tolist())
    assert after < 0.2 * before, (before, after)
    assert spread_after < 0.5 * spread_before, (spread_before, spread_after)


def test_moe_loss_bad_input():
    gates = skewed_gates(1.0)
    with pytest.raises(ValueError, match=r'\(N, E, C, H, W\)'):
        MoELoadBalancingLoss()(gates[:, :, 0])
    with pytest.raises(ValueError, match='summing to one'):
        MoELoadBalancingLoss()(torch.randn(2, 3, 4, 6, 5))
    with pytest.raises(ValueError, match='summing to one'):
        MoELoadBalancingLoss()(gates.transpose(1, 2))  # experts not on dim 1
