"""``ssiu infer`` and ``upscale_image``: formats, tiling accuracy, skipping, errors, checkpoint layouts."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from ssiu_arch.archs.ssiu_arch import SSIU
from ssiu_arch.tools.cli import ssiu_main
from ssiu_arch.tools.infer import check_tiling, tile_spans, upscale_image

SET14 = Path(__file__).parent / 'data' / 'benchmark' / 'Set14' / 'HR'


def tiny_net(scale: int = 2, num_feat: int = 16, num_block: int = 3, num_heads: int = 4) -> SSIU:
    torch.manual_seed(1)
    return SSIU(upscale=scale, num_feat=num_feat, num_block=num_block, num_heads=num_heads).eval()


def cli_net() -> SSIU:
    """The smallest SSIU with every part, for the file-handling tests."""
    return tiny_net(num_feat=8, num_block=1, num_heads=2)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(-10 * np.log10(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)))


@pytest.fixture
def weights(tmp_path) -> Path:
    """A tiny random x2 SSIU saved the way BasicSR saves it."""
    path = tmp_path / 'net_g.pth'
    torch.save({'params': cli_net().state_dict()}, path)
    return path


@pytest.fixture
def inputs(tmp_path) -> Path:
    """Small crops of Set14 in every supported layout, plus a corrupt file."""
    folder = tmp_path / 'lr'
    folder.mkdir()
    bgr = cv2.imread(str(SET14 / 'monarch.png'))[100:130, 200:244]
    cv2.imwrite(str(folder / 'rgb.png'), bgr)
    cv2.imwrite(str(folder / 'gray.png'), cv2.imread(str(SET14 / 'bridge.png'), cv2.IMREAD_UNCHANGED)[:26, :35])
    alpha = np.linspace(0, 255, bgr.shape[1], dtype=np.float32).round().astype(np.uint8)[None].repeat(30, 0)
    cv2.imwrite(str(folder / 'rgba.png'), np.dstack([bgr, alpha]))
    cv2.imwrite(str(folder / 'deep.png'), bgr.astype(np.uint16) * 257)
    cv2.imwrite(str(folder / 'photo.jpg'), bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
    (folder / 'corrupt.png').write_bytes(b'\x89PNG\r\n\x1a\n' + bytes(range(256)) * 4)
    return folder


def run(*args) -> int:
    return ssiu_main(['infer', *map(str, args)])


def test_folder_of_mixed_formats(weights, inputs, tmp_path, capsys):
    out = tmp_path / 'sr'
    assert run(inputs, '-w', weights, '-o', out, '--tile', 32, '--tile-overlap', 16) == 1
    captured = capsys.readouterr()
    assert 'corrupt.png' in captured.err
    assert '5 written' in captured.out and '1 failed' in captured.out and 'corrupt.png' in captured.out
    assert sorted(p.name for p in out.iterdir()) == [
        f'{name}_SSIUx2.png' for name in ('deep', 'gray', 'photo', 'rgb', 'rgba')]

    def read(name):
        return cv2.imread(str(out / f'{name}_SSIUx2.png'), cv2.IMREAD_UNCHANGED)

    rgb = read('rgb')
    assert rgb.shape == (60, 88, 3) and rgb.dtype == np.uint8
    assert read('photo').shape == (60, 88, 3)
    lr = cv2.imread(str(inputs / 'rgb.png'))
    np.testing.assert_array_equal(rgb, upscale_image(cli_net(), lr, 2, tile=32, tile_overlap=16))

    gray = read('gray')
    assert gray.shape == (52, 70) and gray.dtype == np.uint8
    gray_lr = cv2.imread(str(inputs / 'gray.png'), cv2.IMREAD_UNCHANGED)
    as_color = upscale_image(cli_net(), np.dstack([gray_lr] * 3).astype(np.float32) / 255, 2, tile=32,
                             tile_overlap=16)
    assert np.abs(gray.astype(np.float32) - as_color.mean(axis=2) * 255).max() <= 0.5 + 1e-3

    rgba = read('rgba')
    assert rgba.shape == (60, 88, 4) and rgba.dtype == np.uint8
    np.testing.assert_array_equal(rgba[..., :3], rgb)
    alpha = cv2.imread(str(inputs / 'rgba.png'), cv2.IMREAD_UNCHANGED)[..., 3]
    np.testing.assert_array_equal(rgba[..., 3], cv2.resize(alpha, (88, 60), interpolation=cv2.INTER_CUBIC))

    deep = read('deep')
    assert deep.shape == (60, 88, 3) and deep.dtype == np.uint16
    # Processed in float from [0, 65535]: the 16-bit result is the 8-bit one before its rounding.
    assert np.abs(deep / 257 - rgb).max() <= 0.5 + 1e-3
    assert len(np.unique(deep % 257)) > 100
    assert not list(out.glob('.*')), 'temporary files left behind'


def test_existing_outputs_need_overwrite(weights, inputs, tmp_path, capsys):
    src, out = inputs / 'rgb.png', tmp_path / 'sr'
    assert run(src, '-w', weights, '-o', out, '--suffix', '_sr') == 0
    target = out / 'rgb_sr.png'
    assert cv2.imread(str(target)).shape == (60, 88, 3)
    target.write_bytes(b'kept')
    capsys.readouterr()
    assert run(src, '-w', weights, '-o', out, '--suffix', '_sr') == 0
    captured = capsys.readouterr()
    assert target.read_bytes() == b'kept'
    assert 'rgb_sr.png exists' in captured.err and '0 written' in captured.out and '1 skipped' in captured.out
    assert run(src, '-w', weights, '-o', out, '--suffix', '_sr', '--overwrite') == 0
    assert cv2.imread(str(target)).shape == (60, 88, 3)


def test_output_never_replaces_its_input(weights, inputs, capsys):
    assert run(inputs / 'rgb.png', '-w', weights, '-o', inputs, '--suffix', '', '--overwrite') == 1
    assert 'would replace' in capsys.readouterr().err
    assert cv2.imread(str(inputs / 'rgb.png')).shape == (30, 44, 3)


def test_missing_input_is_reported_and_others_processed(weights, inputs, tmp_path, capsys):
    assert run(inputs / 'nope.png', inputs / 'rgb.png', '-w', weights, '-o', tmp_path / 'sr') == 1
    captured = capsys.readouterr()
    assert 'nope.png' in captured.err and '1 written' in captured.out
    assert (tmp_path / 'sr' / 'rgb_SSIUx2.png').is_file()


def test_published_checkpoint_layout(weights, inputs, tmp_path):
    published = tmp_path / 'SSIU_x2.pt'
    state = torch.load(weights, weights_only=True)['params']
    torch.save({'epoch': 1, 'model_state_dict': {f'module.{k}': v for k, v in state.items()}}, published)
    assert run(inputs / 'rgb.png', '-w', weights, '-o', tmp_path / 'a') == 0
    assert run(inputs / 'rgb.png', '-w', published, '-o', tmp_path / 'b', '--scale', 2) == 0
    a, b = (cv2.imread(str(tmp_path / d / 'rgb_SSIUx2.png')) for d in 'ab')
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize('argv, message', [
    (['--scale', '3'], '--scale 3 does not match'),
    (['--device', 'cuda'], 'CUDA is not available'),
    (['--half', '--device', 'cpu'], 'precision fp16 needs a CUDA device'),
    (['--precision', 'fp16', '--device', 'cpu'], 'precision fp16 needs a CUDA device'),
    (['--tile', '40', '--tile-overlap', '32'], 'must exceed tile_overlap'),
])
def test_bad_options_are_clear_errors(weights, inputs, tmp_path, monkeypatch, argv, message):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    with pytest.raises(SystemExit, match=message):
        run(inputs / 'rgb.png', '-w', weights, '-o', tmp_path / 'sr', *argv)
    assert not (tmp_path / 'sr').exists()


def test_unreadable_weights_named(inputs, tmp_path):
    bad = tmp_path / 'broken.pth'
    bad.write_bytes(b'not a checkpoint')
    with pytest.raises(SystemExit, match='broken.pth'):
        run(inputs / 'rgb.png', '-w', bad, '-o', tmp_path / 'sr')


@pytest.mark.parametrize('length, tile, overlap, align', [(512, 256, 32, 16), (203, 48, 16, 16), (100, 30, 7, 1),
                                                          (64, 64, 16, 16), (17, 0, 8, 16)])
def test_tile_spans_cover_with_aligned_overlap(length, tile, overlap, align):
    spans = tile_spans(length, tile, overlap, align)
    assert spans[0][0] == 0 and spans[-1][1] == length
    assert all(start % align == 0 and end - start <= (tile or length) for start, end in spans)
    assert all(prev_end - start >= overlap for (_, prev_end), (start, _) in zip(spans, spans[1:]))


def test_tile_must_exceed_overlap_by_alignment():
    assert check_tiling(48, 32, 16) == 16
    with pytest.raises(ValueError, match='tile_overlap'):
        check_tiling(47, 32, 16)


def test_tiled_matches_untiled_on_real_image():
    """Default tiles (384, overlap 32: 2x2 tiles) on a 512x512 image (Set14 baboon, mirror-padded), float in and out."""
    img = cv2.imread(str(SET14 / 'baboon.png'))
    img = cv2.copyMakeBorder(img, 0, 512 - img.shape[0], 0, 512 - img.shape[1], cv2.BORDER_REFLECT_101)
    img = img.astype(np.float32) / 255
    net = tiny_net()
    whole = upscale_image(net, img, 2, tile=0)
    assert whole.shape == (1024, 1024, 3) and whole.dtype == np.float32
    assert psnr(upscale_image(net, img, 2), whole) >= 50


def test_small_tiles_on_ragged_sizes():
    """Twelve small tiles (48, overlap 16) with ragged last row and column at x3 on a 99x137 crop of Set14 comic."""
    img = cv2.imread(str(SET14 / 'comic.png'))[:99, :137].astype(np.float32) / 255
    scale, net = 3, tiny_net(3)
    rows, cols = tile_spans(99, 48, 16, 16), tile_spans(137, 48, 16, 16)
    assert (len(rows), len(cols)) == (3, 4) and rows[-1] == (64, 99) and cols[-1] == (96, 137)
    tiled = upscale_image(net, img, scale, tile=48, tile_overlap=16)
    assert tiled.shape == (99 * scale, 137 * scale, 3)
    assert psnr(tiled, upscale_image(net, img, scale, tile=0)) >= 50


def test_channel_order_and_dtypes():
    rgb = cv2.cvtColor(cv2.imread(str(SET14 / 'pepper.png'))[:20, :24], cv2.COLOR_BGR2RGB)
    net = cli_net()
    from_rgb = upscale_image(net, rgb, 2, bgr=False)
    np.testing.assert_array_equal(upscale_image(net, rgb[..., ::-1], 2), from_rgb[..., ::-1])
    with pytest.raises(ValueError, match='dtype'):
        upscale_image(net, rgb.astype(np.int32), 2)
    with pytest.raises(ValueError, match='shape'):
        upscale_image(net, np.zeros((4, 4, 5), np.uint8), 2)
