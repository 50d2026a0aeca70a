"""LMDB builds lose nothing silently: lossy inputs refused, exact storage, truncated files, SIGKILL mid-build."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import lmdb
import numpy as np
import pytest
from PIL import Image
from ssiu_arch.datasets_lmdb.files import DataPrepError
from ssiu_arch.datasets_lmdb.lmdb_tools import build_lmdb, building_path, scan_image_set

from ssiu_arch.tools.cli import ssiu_main
from ssiu_arch.utils.images import read_image

RNG = np.random.default_rng(0)
# ``ssiu`` in a fresh child process (a SIGBUS there cannot take pytest down); it must not need BasicSR.
SSIU_CLI = ('import sys; from ssiu_arch.tools.cli import ssiu_main; code = ssiu_main(sys.argv[1:]); '
            "assert 'basicsr' not in sys.modules; sys.exit(code)")


def stored(lmdb_path: Path) -> dict[str, np.ndarray]:
    env = lmdb.open(str(lmdb_path), readonly=True, lock=False)
    with env.begin() as txn:
        images = {k.decode(): cv2.imdecode(np.frombuffer(v, np.uint8), cv2.IMREAD_UNCHANGED) for k, v in txn.cursor()}
    env.close()
    return images


def noise(h: int, w: int, c: int | None, dtype=np.uint8) -> np.ndarray:
    shape = (h, w) if c is None else (h, w, c)
    return RNG.integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)


def test_float_tiff_refused_by_build_and_verify(tmp_path, capsys):
    folder = tmp_path / 'imgs'
    folder.mkdir()
    cv2.imwrite(str(folder / 'a.png'), noise(8, 8, 3))
    cv2.imwrite(str(folder / 'b.tif'), RNG.random((8, 8, 3), dtype=np.float32))  # OpenCV would store 0/1 bytes
    with pytest.raises(DataPrepError, match=r'b\.tif: float32 samples; only 8- and 16-bit'):
        build_lmdb(folder, tmp_path / 'out.lmdb', progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ['imgs']
    assert ssiu_main(['lmdb', 'verify', str(folder), '--quiet']) == 1
    assert 'b.tif: float32 samples' in capsys.readouterr().out


def test_broken_link_in_the_folder_is_named_not_skipped(tmp_path, capsys):
    folder = tmp_path / 'imgs'
    folder.mkdir()
    cv2.imwrite(str(folder / 'a.png'), noise(8, 8, 3))
    (folder / 'b.png').symlink_to(tmp_path / 'moved_away.png')
    with pytest.raises(DataPrepError, match=r'b\.png: broken symbolic link'):
        build_lmdb(folder, tmp_path / 'out.lmdb', progress=False)
    assert ssiu_main(['lmdb', 'verify', str(folder), '--quiet']) == 1
    assert 'b.png: broken symbolic link' in capsys.readouterr().out


def test_deep_alpha_and_gray_images_stored_exactly(tmp_path):
    folder = tmp_path / 'imgs'
    folder.mkdir()
    sources = {'gray16': noise(9, 7, None, np.uint16), 'rgba16': noise(9, 7, 4, np.uint16),
               'rgba8': noise(9, 7, 4), 'rgb16': noise(9, 7, 3, np.uint16), 'gray8': noise(9, 7, None)}
    for key, img in sources.items():
        cv2.imwrite(str(folder / f'{key}.png'), img)
    cv2.imwrite(str(folder / 'rgba16_tiff.tif'), sources['rgba16'])
    Image.fromarray(noise(9, 7, 2), 'LA').save(folder / 'gray_alpha.png')
    build_lmdb(folder, tmp_path / 'out.lmdb', progress=False)
    images = stored(tmp_path / 'out.lmdb')
    for key, img in sources.items():
        assert images[key].dtype == img.dtype and np.array_equal(images[key], img), key
    assert np.array_equal(images['rgba16_tiff'], sources['rgba16'])
    gray, alpha = np.array(Image.open(folder / 'gray_alpha.png')).transpose(2, 0, 1)
    assert np.array_equal(images['gray_alpha'], np.dstack([gray, gray, gray, alpha]))  # as BGRA, values kept
    assert np.array_equal(images['gray_alpha'], read_image(folder / 'gray_alpha.png'))


def test_verify_names_a_truncated_data_file_instead_of_dying(tmp_path):
    folder = tmp_path / 'imgs'
    folder.mkdir()
    for i in range(12):
        cv2.imwrite(str(folder / f'{i:03d}.png'), noise(48, 48, 3))  # incompressible: ~7 kB each
    lmdb_path = tmp_path / 'set.lmdb'
    build_lmdb(folder, lmdb_path, progress=False)
    data = lmdb_path / 'data.mdb'
    size = data.stat().st_size
    os.truncate(data, size // 3)
    run = subprocess.run([sys.executable, '-c', SSIU_CLI, 'lmdb', 'verify', str(lmdb_path), '--quiet'],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 1, (run.returncode, run.stderr[-2000:])  # not -SIGBUS
    assert f'{data}: truncated: {size // 3} bytes, but its header says' in run.stdout
    assert 'Traceback' not in run.stderr


_KILLED_BUILD = """
import sys, time
from pathlib import Path
from ssiu_arch.datasets_lmdb import lmdb_tools

encode, done = lmdb_tools._encode_one, []

def encode_then_stall(job, compress_level):
    done.append(job)
    if len(done) == 7:  # three batches of two committed, the fourth under way
        Path(sys.argv[3]).write_text('stalled')
        time.sleep(600)
    return encode(job, compress_level)

lmdb_tools._encode_one = encode_then_stall
lmdb_tools.build_lmdb(sys.argv[1], sys.argv[2], batch=2, workers=1, progress=False)
"""


def test_build_killed_mid_way_never_looks_complete_and_reruns_cleanly(tmp_path):
    folder = tmp_path / 'imgs'
    folder.mkdir()
    for i in range(10):
        cv2.imwrite(str(folder / f'{i:03d}.png'), noise(16, 16, 3))
    lmdb_path, stalled = tmp_path / 'set.lmdb', tmp_path / 'stalled'
    child = subprocess.Popen([sys.executable, '-c', _KILLED_BUILD, str(folder), str(lmdb_path), str(stalled)],
                             stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not stalled.exists():
            assert child.poll() is None, child.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, 'the build never reached its seventh image'
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait(timeout=60)
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL
    assert not lmdb_path.exists()  # nothing under the final name
    assert building_path(lmdb_path).is_dir()  # the partial build stays hidden under its temporary name
    assert scan_image_set(lmdb_path, progress=False).problems == [f'{lmdb_path}: no such folder']

    assert build_lmdb(folder, lmdb_path, progress=False) == 10
    assert not building_path(lmdb_path).exists()
    result = scan_image_set(lmdb_path, progress=False)
    assert result.problems == [] and len(result.shapes) == 10
    assert sorted(stored(lmdb_path)) == [f'{i:03d}' for i in range(10)]
