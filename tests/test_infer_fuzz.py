"""``ssiu infer`` on files as people have them: ~50 odd inputs in one run, write failures, special files, EXIF."""
from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ssiu_arch.archs.ssiu_arch import SSIU
from ssiu_arch.tools import infer
from ssiu_arch.tools.cli import ssiu_main
from ssiu_arch.utils.images import decode_image

RNG = np.random.default_rng(0)


def pixels(h: int, w: int, c: int | None = 3, dtype=np.uint8) -> np.ndarray:
    top = np.iinfo(dtype).max
    return RNG.integers(0, top, (h, w) if c is None else (h, w, c), dtype=dtype, endpoint=True)


def pil_bytes(array: np.ndarray, mode: str, fmt: str, **save) -> bytes:
    buf = io.BytesIO()
    image = Image.fromarray(array, mode) if mode not in ('P', '1') else Image.fromarray(array).convert(mode)
    image.save(buf, fmt, **save)
    return buf.getvalue()


def cv2_bytes(array: np.ndarray, ext: str, *params: int) -> bytes:
    ok, data = cv2.imencode(ext, array, list(params))
    assert ok
    return data.tobytes()


def with_orientation(array: np.ndarray, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return pil_bytes(array, 'RGB', 'JPEG', quality=95, exif=exif.tobytes())


# name -> (bytes, decoded (h, w), channels (None: 2-D gray), dtype)
def good_inputs() -> dict[str, tuple[bytes, tuple[int, int], int | None, type]]:
    rgb = pixels(20, 28)
    return {
        'gray8.png': (cv2_bytes(pixels(20, 28, None), '.png'), (20, 28), None, np.uint8),
        'gray16.png': (cv2_bytes(pixels(20, 28, None, np.uint16), '.png'), (20, 28), None, np.uint16),
        'rgb8.png': (cv2_bytes(rgb, '.png'), (20, 28), 3, np.uint8),
        'rgb16.png': (cv2_bytes(pixels(20, 28, 3, np.uint16), '.png'), (20, 28), 3, np.uint16),
        'rgba8.png': (cv2_bytes(pixels(20, 28, 4), '.png'), (20, 28), 4, np.uint8),
        'rgba16.png': (cv2_bytes(pixels(20, 28, 4, np.uint16), '.png'), (20, 28), 4, np.uint16),
        'gray_alpha.png': (pil_bytes(pixels(20, 28, 2), 'LA', 'PNG'), (20, 28), 4, np.uint8),
        'palette.png': (pil_bytes(rgb, 'P', 'PNG'), (20, 28), 3, np.uint8),
        'palette_transparent.png': (pil_bytes(rgb, 'P', 'PNG', transparency=0), (20, 28), 4, np.uint8),
        'bilevel.png': (pil_bytes(pixels(20, 28, None), '1', 'PNG'), (20, 28), None, np.uint8),
        'photo.jpg': (cv2_bytes(rgb, '.jpg', cv2.IMWRITE_JPEG_QUALITY, 90), (20, 28), 3, np.uint8),
        'gray_jpeg.jpg': (cv2_bytes(pixels(20, 28, None), '.jpg'), (20, 28), None, np.uint8),
        'cmyk_jpeg.jpg': (pil_bytes(pixels(20, 28, 4), 'CMYK', 'JPEG'), (20, 28), 3, np.uint8),
        'rgb_tiff.tif': (cv2_bytes(rgb, '.tif'), (20, 28), 3, np.uint8),
        'rgb16_tiff.tif': (cv2_bytes(pixels(20, 28, 3, np.uint16), '.tif'), (20, 28), 3, np.uint16),
        'gray_tiff.tif': (cv2_bytes(pixels(20, 28, None), '.tif'), (20, 28), None, np.uint8),
        'cmyk_tiff.tif': (pil_bytes(pixels(20, 28, 4), 'CMYK', 'TIFF'), (20, 28), 4, np.uint8),
        'lossy.webp': (cv2_bytes(rgb, '.webp', cv2.IMWRITE_WEBP_QUALITY, 80), (20, 28), 3, np.uint8),
        'lossless_alpha.webp': (pil_bytes(pixels(20, 28, 4), 'RGBA', 'WEBP', lossless=True), (20, 28), 4,
                                np.uint8),
        'plain_bmp.bmp': (cv2_bytes(rgb, '.bmp'), (20, 28), 3, np.uint8),
        'plain_pgm.pgm': (cv2_bytes(pixels(20, 28, None), '.pgm'), (20, 28), None, np.uint8),
        'one_pixel.png': (cv2_bytes(pixels(1, 1), '.png'), (1, 1), 3, np.uint8),
        'one_row.png': (cv2_bytes(pixels(1, 37), '.png'), (1, 37), 3, np.uint8),
        'one_column.png': (cv2_bytes(pixels(29, 1), '.png'), (29, 1), 3, np.uint8),
        'wide.png': (cv2_bytes(pixels(30, 4000), '.png'), (30, 4000), 3, np.uint8),
        'tall.png': (cv2_bytes(pixels(450, 9), '.png'), (450, 9), 3, np.uint8),
        'portrait_exif6.jpg': (with_orientation(pixels(20, 28), 6), (28, 20), 3, np.uint8),
        'no_extension': (cv2_bytes(rgb, '.png'), (20, 28), 3, np.uint8),
        'png_named.jpg': (cv2_bytes(pixels(20, 28, 4), '.png'), (20, 28), 4, np.uint8),
        'spaced name é.png': (cv2_bytes(rgb, '.png'), (20, 28), 3, np.uint8),
        'flat_white16.png': (cv2_bytes(np.full((20, 28), 65535, np.uint16), '.png'), (20, 28), None, np.uint16),
    }


def bad_inputs(folder: Path) -> dict[str, str]:
    """Create the unusable entries in ``folder``; name -> a part of the message expected for it."""
    png = cv2_bytes(pixels(40, 40), '.png')
    jpg = cv2_bytes(pixels(40, 40), '.jpg')
    (folder / 'truncated.png').write_bytes(png[:len(png) // 2])
    (folder / 'truncated_jpeg.jpg').write_bytes(jpg[:len(jpg) // 2])
    (folder / 'zero_bytes.png').write_bytes(b'')
    (folder / 'text.png').write_text('this is not an image\n')
    (folder / 'html_webp.webp').write_text('<html><body>404</body></html>')
    (folder / 'noise_jpeg.jpg').write_bytes(RNG.integers(0, 255, 500, dtype=np.uint8).tobytes())
    (folder / 'header_only.png').write_bytes(png[:33])
    (folder / 'signature_only.png').write_bytes(png[:8])
    (folder / 'truncated_bmp.bmp').write_bytes(cv2_bytes(pixels(40, 40), '.bmp')[:200])
    (folder / 'svg.png').write_text('<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4"/>')
    (folder / 'utf16.png').write_text('not an image', encoding='utf-16')
    (folder / 'zip.png').write_bytes(b'PK\x03\x04' + bytes(60))
    (folder / 'pdf.jpg').write_bytes(b'%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n')
    (folder / 'float32_tiff.tif').write_bytes(cv2_bytes(RNG.random((8, 8, 3), dtype=np.float32), '.tif'))
    (folder / 'int16_tiff.tif').write_bytes(cv2_bytes(np.ones((8, 8), np.int16), '.tif'))
    (folder / 'dangling.png').symlink_to(folder / 'nowhere.png')
    (folder / 'loop.png').symlink_to(folder / 'loop.png')
    os.mkfifo(folder / 'pipe.png')
    return {'truncated.png': 'not a readable image', 'truncated_jpeg.jpg': 'not a readable image',
            'zero_bytes.png': 'an empty file', 'text.png': 'not a readable image',
            'html_webp.webp': 'not a readable image', 'noise_jpeg.jpg': 'not a readable image',
            'header_only.png': 'not a readable image', 'signature_only.png': 'not a readable image',
            'truncated_bmp.bmp': 'not a readable image', 'svg.png': 'not a readable image',
            'utf16.png': 'not a readable image', 'zip.png': 'not a readable image',
            'pdf.jpg': 'not a readable image', 'float32_tiff.tif': 'float32 samples',
            'int16_tiff.tif': 'int16 samples', 'dangling.png': 'broken symbolic link', 'loop.png': 'cannot open',
            'pipe.png': 'a FIFO (named pipe), not an image file'}


@pytest.fixture(scope='module')
def weights(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('weights') / 'tiny_x2.pth'
    torch.save({'params': SSIU(upscale=2, num_feat=16, num_block=3).state_dict()}, path)
    return path


def test_fuzz_folder_of_odd_inputs(weights, tmp_path, capsys):
    folder, out = tmp_path / 'in', tmp_path / 'out'
    folder.mkdir()
    good = good_inputs()
    for name, (data, *_) in good.items():
        (folder / name).write_bytes(data)
    bad = bad_inputs(folder)
    (folder / 'x.png').mkdir()
    assert len(good) + len(bad) + 1 >= 50

    assert ssiu_main(['infer', str(folder), '-w', str(weights), '-o', str(out)]) == 1
    captured = capsys.readouterr()
    assert 'Traceback' not in captured.err + captured.out
    lines = captured.err.splitlines()
    for name, expected in bad.items():
        named = [line for line in lines if str(folder / name) + ':' in line]
        assert len(named) == 1 and expected in named[0], (name, named)
    assert sum(f'skipped {folder / "x.png"}: a folder' in line for line in lines) == 1
    assert f'{len(good)} written' in captured.out and f'{len(bad)} failed' in captured.out
    assert '1 folder(s) not searched' in captured.out

    assert len({Path(name).stem for name in [*good, *bad]}) == len(good) + len(bad)  # no two share an output
    written = {p.name for p in out.iterdir()}
    assert written == {f'{Path(name).stem}_SSIUx2.png' for name in good}
    for name, (_, (h, w), channels, dtype) in good.items():
        sr = cv2.imread(str(out / f'{Path(name).stem}_SSIUx2.png'), cv2.IMREAD_UNCHANGED)
        assert sr.shape == ((2 * h, 2 * w) if channels is None else (2 * h, 2 * w, channels)), name
        assert sr.dtype == dtype, name


@pytest.mark.parametrize('orientation', range(1, 9))
def test_reader_applies_exif_orientation_as_opencv_colour_reading_does(orientation, tmp_path):
    array = pixels(6, 9)
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = pil_bytes(array, 'RGB', 'PNG', exif=exif.tobytes())  # lossless, so both readings compare exactly
    upright = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # OpenCV applies EXIF here
    assert np.array_equal(decode_image(data, 'x.png'), upright)
    assert decode_image(data, 'x.png', orient=False).shape == (6, 9, 3)


@pytest.fixture
def two_images(tmp_path) -> Path:
    folder = tmp_path / 'in'
    folder.mkdir()
    for name in ('a.png', 'b.png', 'c.png'):
        cv2.imwrite(str(folder / name), pixels(12, 16))
    return folder


def run(*args) -> int:
    return ssiu_main(['infer', *map(str, args)])


@pytest.mark.parametrize('error, reason', [(errno.ENOSPC, 'No space left on device'),
                                           (errno.EROFS, 'Read-only file system'),
                                           (errno.EACCES, 'Permission denied')])
def test_write_failure_is_reported_per_file_and_the_rest_go_on(error, reason, weights, two_images, tmp_path,
                                                               monkeypatch, capsys):
    write = infer.write_bytes_atomic

    def failing(path, data):
        if Path(path).name.startswith('b_'):
            raise OSError(error, os.strerror(error))
        write(path, data)

    monkeypatch.setattr(infer, 'write_bytes_atomic', failing)
    out = tmp_path / 'out'
    assert run(two_images, '-w', weights, '-o', out) == 1
    captured = capsys.readouterr()
    assert f'failed {two_images / "b.png"}: cannot write {out / "b_SSIUx2.png"} ({reason})' in captured.err
    assert '2 written' in captured.out and '1 failed' in captured.out
    assert sorted(p.name for p in out.iterdir()) == ['a_SSIUx2.png', 'c_SSIUx2.png']


def test_output_naming_an_existing_file(weights, two_images, tmp_path):
    target = tmp_path / 'file.txt'
    target.write_text('keep me')
    with pytest.raises(SystemExit, match='-o .*file.txt: exists and is not a folder'):
        run(two_images, '-w', weights, '-o', target)
    assert target.read_text() == 'keep me'


def test_fifo_and_dangling_link_on_the_command_line_are_named(weights, tmp_path, capsys):
    fifo, link = tmp_path / 'pipe.png', tmp_path / 'gone.png'
    os.mkfifo(fifo)
    link.symlink_to(tmp_path / 'missing.png')
    assert run(fifo, link, '-w', weights, '-o', tmp_path / 'out') == 1
    err = capsys.readouterr().err
    assert f'failed {fifo}: a FIFO (named pipe), not an image file' in err
    assert f'failed {link}: broken symbolic link' in err


@pytest.mark.parametrize('argv, message', [
    (['--tile', '64', '--tile-overlap', '0'], '--tile-overlap 0: at least 4 pixels'),
    (['--suffix', '/../../x'], "--suffix '/../../x': must not contain path separators"),
    (['--scale', '7'], '--scale 7 does not match'),
])
def test_refused_options_write_nothing(argv, message, weights, two_images, tmp_path):
    with pytest.raises(SystemExit, match=message):
        run(two_images, '-w', weights, '-o', tmp_path / 'out', *argv)
    assert not (tmp_path / 'out').exists() and not (tmp_path / 'x.png').exists()


def test_scale_zero_is_an_argument_error(weights, two_images, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        run(two_images, '-w', weights, '-o', tmp_path / 'out', '--scale', '0')
    assert exc.value.code == 2 and 'expected a whole number >= 1' in capsys.readouterr().err


def test_no_tiling_needs_no_overlap(weights, two_images, tmp_path):
    assert run(two_images / 'a.png', '-w', weights, '-o', tmp_path / 'out', '--tile', '0', '--tile-overlap', '0') == 0


def test_stale_temporaries_of_dead_runs_are_removed(weights, two_images, tmp_path, capsys):
    out = tmp_path / 'out'
    out.mkdir()
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = out / f'.a_SSIUx2.png.tmp{dead_pid}'
    live = out / f'.other.png.tmp{os.getpid()}'  # this process is alive
    unrelated = out / '.notes.tmp'
    for path in (stale, live, unrelated):
        path.write_bytes(b'half')
    assert run(two_images, '-w', weights, '-o', out) == 0
    assert not stale.exists() and live.exists() and unrelated.exists()
    assert f'removed {stale}' in capsys.readouterr().err
