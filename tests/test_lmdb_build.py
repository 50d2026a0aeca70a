"""``ssiu lmdb``: sub-images, bicubic LR, LMDB build and verify on real images, read back by BasicSR."""
from __future__ import annotations

import contextlib
import gc
import resource
import shutil
import signal
import subprocess
import sys

import cv2
import lmdb
import numpy as np
import pytest
from basicsr.data.paired_image_dataset import PairedImageDataset
from basicsr.utils import img2tensor
from ssiu_arch.datasets_lmdb import lmdb_tools
from ssiu_arch.datasets_lmdb.files import DataPrepError
from ssiu_arch.datasets_lmdb.lmdb_tools import build_lmdb, building_path, read_meta_info
from ssiu_arch.datasets_lmdb.prepare import crop_positions, extract_subimages

from ssiu_arch.tools.cli import ssiu_main


def _run(*argv) -> int:
    return ssiu_main(['lmdb', *map(str, argv)])


def _lmdb_images(path) -> dict[str, np.ndarray]:
    env = lmdb.open(str(path), readonly=True, lock=False)
    with env.begin() as txn:
        images = {k.decode(): cv2.imdecode(np.frombuffer(v, np.uint8), cv2.IMREAD_UNCHANGED) for k, v in txn.cursor()}
    env.close()
    return images


@pytest.fixture(scope='module')
def set5_subimages(tmp_path_factory, data_dir):
    """Set5 HR and published x2 LR cut into 128 px HR sub-images (step 96): ~40 real pairs."""
    root = tmp_path_factory.mktemp('set5_sub')
    bench = data_dir / 'benchmark' / 'Set5'
    assert _run('extract', bench / 'HR', root / 'hr_sub', '--lq', bench / 'LR_bicubic' / 'X2',
                '--lq-out', root / 'lr_sub', '--scale', 2, '--crop-size', 128, '--step', 96, '--workers', 2,
                '--quiet') == 0
    return root


def test_crop_positions_follow_basicsr():
    assert crop_positions(2040, 480, 240) == [0, 240, 480, 720, 960, 1200, 1440, 1560]
    assert crop_positions(480, 480, 240) == [0]
    assert crop_positions(500, 480, 240, thresh_size=0) == [0, 20]
    assert crop_positions(500, 480, 240, thresh_size=20) == [0]
    assert crop_positions(479, 480, 240) == []


def test_extract_crops_hr_and_lr_at_matching_places(set5_subimages, data_dir):
    bench = data_dir / 'benchmark' / 'Set5'
    hr_sub, lr_sub = set5_subimages / 'hr_sub', set5_subimages / 'lr_sub'
    names = sorted(p.name for p in hr_sub.iterdir())
    assert names == sorted(p.name for p in lr_sub.iterdir())
    baby = cv2.imread(str(bench / 'HR' / 'baby.png'))  # 512x512: offsets 0, 96, 192, 288, 384 -> 25 crops
    assert [n for n in names if n.startswith('baby_')] == [f'baby_s{i:03d}.png' for i in range(1, 26)]
    baby_lr = cv2.imread(str(bench / 'LR_bicubic' / 'X2' / 'babyx2.png'))
    # s007 is row 1, column 1 (0-based) -> HR offset (96, 96), LR offset (48, 48)
    np.testing.assert_array_equal(cv2.imread(str(hr_sub / 'baby_s007.png')), baby[96:224, 96:224])
    np.testing.assert_array_equal(cv2.imread(str(lr_sub / 'baby_s007.png')), baby_lr[48:112, 48:112])
    assert not any(p.name.startswith('.') for p in hr_sub.iterdir())  # no temporary files left


def test_build_round_trips_through_basicsr_paired_dataset(set5_subimages, tmp_path):
    hr_lmdb, lr_lmdb = tmp_path / 'hr.lmdb', tmp_path / 'lr.lmdb'
    assert _run('build', set5_subimages / 'hr_sub', hr_lmdb, '--workers', 2, '--quiet') == 0
    assert _run('build', set5_subimages / 'lr_sub', lr_lmdb, '--workers', 1, '--quiet') == 0
    assert sorted(p.name for p in hr_lmdb.iterdir()) == ['data.mdb', 'lock.mdb', 'meta_info.txt']
    lines = (hr_lmdb / 'meta_info.txt').read_text().splitlines()
    assert lines[0] == 'baby_s001.png (128,128,3) 1'
    stored = _lmdb_images(hr_lmdb)
    assert len(stored) == len(lines) == len(list((set5_subimages / 'hr_sub').iterdir()))
    for key, img in stored.items():
        np.testing.assert_array_equal(img, cv2.imread(str(set5_subimages / 'hr_sub' / f'{key}.png'),
                                                      cv2.IMREAD_UNCHANGED))

    opt = {'name': 'set5', 'type': 'PairedImageDataset', 'dataroot_gt': str(hr_lmdb), 'dataroot_lq': str(lr_lmdb),
           'io_backend': {'type': 'lmdb'}, 'scale': 2, 'phase': 'val'}
    dataset = PairedImageDataset(opt)
    assert len(dataset) == len(lines)
    for index in range(0, len(dataset), 7):
        item = dataset[index]
        key = item['gt_path']
        assert item['lq_path'] == key
        for name, folder in (('gt', 'hr_sub'), ('lq', 'lr_sub')):
            img = cv2.imread(str(set5_subimages / folder / f'{key}.png')).astype(np.float32) / 255.
            assert (item[name] == img2tensor(img, bgr2rgb=True, float32=True)).all(), (key, name)

    del dataset
    gc.collect()  # closes the LMDB environments: py-lmdb opens a path only once per process
    train = PairedImageDataset({**opt, 'io_backend': {'type': 'lmdb'}, 'phase': 'train', 'gt_size': 64,
                                'use_hflip': True, 'use_rot': True})
    item = train[3]
    assert item['gt'].shape == (3, 64, 64) and item['lq'].shape == (3, 32, 32)
    del train
    gc.collect()

    assert _run('verify', hr_lmdb, '--lq', lr_lmdb, '--scale', 2, '--quiet') == 0


def test_build_keeps_grayscale_and_strips_scale_suffix(data_dir, tmp_path):
    out = tmp_path / 'set14_x4.lmdb'
    lr_dir = data_dir / 'benchmark' / 'Set14' / 'LR_bicubic' / 'X4'
    assert build_lmdb(lr_dir, out, strip_suffix='x4', progress=False) == 14
    meta, problems = read_meta_info(out)
    assert not problems and meta['bridge'] == (128, 128, 1) and meta['baboon'] == (120, 125, 3)
    stored = _lmdb_images(out)
    np.testing.assert_array_equal(stored['bridge'], cv2.imread(str(lr_dir / 'bridgex4.png'), cv2.IMREAD_UNCHANGED))


def test_build_grows_the_map_and_splits_transactions(set5_subimages, tmp_path):
    out = tmp_path / 'small_map.lmdb'
    count = build_lmdb(set5_subimages / 'lr_sub', out, batch=7, map_size=64 * 1024, progress=False)
    stored = _lmdb_images(out)
    assert len(stored) == count
    for key, img in stored.items():
        np.testing.assert_array_equal(img, cv2.imread(str(set5_subimages / 'lr_sub' / f'{key}.png')))


def test_make_lr_cli_writes_benchmark_names_and_pixels(data_dir, tmp_path):
    bench = data_dir / 'benchmark' / 'Set14'
    assert _run('make-lr', bench / 'HR', tmp_path, '--scale', 3, '--workers', 2, '--quiet') == 0
    written = sorted(p.name for p in (tmp_path / 'X3').iterdir())
    assert written == sorted(p.name for p in (bench / 'LR_bicubic' / 'X3').iterdir())
    for name in written:
        ours = cv2.imread(str(tmp_path / 'X3' / name), cv2.IMREAD_UNCHANGED)
        published = cv2.imread(str(bench / 'LR_bicubic' / 'X3' / name), cv2.IMREAD_UNCHANGED)
        assert ours.shape == published.shape, name  # bridge stays grayscale
        diff = np.abs(ours.astype(np.int16) - published)
        assert (diff == 0).mean() >= 0.999 and diff.max() <= 1, name


# ------------------------------------------------------------------------------------------------- bad input


def test_build_rejects_corrupt_image_and_leaves_nothing(set5_subimages, tmp_path, capsys):
    folder = tmp_path / 'imgs'
    shutil.copytree(set5_subimages / 'lr_sub', folder)
    data = (folder / 'bird_s002.png').read_bytes()
    (folder / 'bird_s002.png').write_bytes(data[:len(data) // 2])  # truncated download
    out = tmp_path / 'out.lmdb'
    assert _run('build', folder, out, '--workers', 2, '--quiet') == 1
    err = capsys.readouterr().err
    assert 'bird_s002.png' in err and 'not a readable image' in err
    assert not out.exists() and not building_path(out).exists()
    (folder / 'bird_s002.png').write_text('not an image')
    with pytest.raises(DataPrepError, match='bird_s002.png'):
        build_lmdb(folder, out, progress=False)


def test_build_rejects_bad_names_and_existing_output(set5_subimages, tmp_path, capsys):
    with pytest.raises(DataPrepError, match=r'must end in \.lmdb'):
        build_lmdb(set5_subimages / 'lr_sub', tmp_path / 'out', progress=False)
    with pytest.raises(DataPrepError, match='--compress-level 10: must be 0-9'):
        build_lmdb(set5_subimages / 'lr_sub', tmp_path / 'out.lmdb', compress_level=10, progress=False)
    assert _run('make-lr', set5_subimages / 'lr_sub', tmp_path / 'lr', '--scale', 1, '--quiet') == 1
    assert '--scale [1]: scales must be integers >= 2' in capsys.readouterr().err
    folder = tmp_path / 'dup'
    folder.mkdir()
    shutil.copy(set5_subimages / 'lr_sub' / 'baby_s001.png', folder / 'a.png')
    shutil.copy(set5_subimages / 'lr_sub' / 'baby_s002.png', folder / 'a.x.png')
    with pytest.raises(DataPrepError, match="a.x.png: same LMDB key 'a' as a.png"):
        build_lmdb(folder, tmp_path / 'dup.lmdb', progress=False)
    with pytest.raises(DataPrepError, match='no image files'):
        build_lmdb(tmp_path, tmp_path / 'x.lmdb', progress=False)

    out = tmp_path / 'done.lmdb'
    (folder / 'a.x.png').unlink()
    build_lmdb(folder, out, progress=False)
    before = (out / 'data.mdb').read_bytes()
    assert _run('build', set5_subimages / 'lr_sub', out, '--quiet') == 1
    assert 'already exists' in capsys.readouterr().err
    assert (out / 'data.mdb').read_bytes() == before
    assert _run('build', set5_subimages / 'lr_sub', out, '--overwrite', '--quiet') == 0
    assert len(_lmdb_images(out)) == len(list((set5_subimages / 'lr_sub').iterdir()))


def test_interrupted_build_leaves_no_lmdb_and_rerun_starts_clean(set5_subimages, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'hr.lmdb'
    calls = []
    encode = lmdb_tools._encode_one

    def interrupted(job, compress_level):
        calls.append(job)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return encode(job, compress_level)

    monkeypatch.setattr(lmdb_tools, '_encode_one', interrupted)
    assert _run('build', set5_subimages / 'hr_sub', out, '--workers', 1, '--batch', 2, '--quiet') == 130
    assert 'interrupted' in capsys.readouterr().err
    assert not out.exists() and not building_path(out).exists()
    monkeypatch.setattr(lmdb_tools, '_encode_one', encode)

    # A killed build (no chance to clean up) leaves only the hidden temporary folder, without meta_info.txt.
    stale = building_path(out)
    stale.mkdir()
    (stale / 'data.mdb').write_bytes(b'half written')
    assert not stale.name.endswith('.lmdb')
    count = build_lmdb(set5_subimages / 'hr_sub', out, progress=False)
    assert count == len(list((set5_subimages / 'hr_sub').iterdir()))
    assert not stale.exists()
    assert _run('verify', out, '--quiet') == 0


def test_build_help_states_the_rerun_policy(capsys):
    with pytest.raises(SystemExit):
        _run('build', '--help')
    help_text = ' '.join(capsys.readouterr().out.split())
    assert 'rerunning deletes such a leftover and starts clean' in help_text


@contextlib.contextmanager
def _file_size_limit(limit: int):
    """Writes past ``limit`` bytes in any file fail (EFBIG), as on a full disk."""
    limits = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limits[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)


def test_disk_full_during_build_names_the_output_and_leaves_nothing(set5_subimages, tmp_path):
    out = tmp_path / 'full.lmdb'
    with _file_size_limit(200_000), pytest.raises(DataPrepError, match=r'full\.lmdb: write failed while adding'):
        build_lmdb(set5_subimages / 'hr_sub', out, batch=4, progress=False)
    assert not out.exists() and not building_path(out).exists()


def test_disk_full_during_extract_names_the_file_and_leaves_no_partial_file(data_dir, tmp_path):
    out = tmp_path / 'sub'
    with _file_size_limit(20_000), pytest.raises(DataPrepError, match=r'baby_s001\.png: cannot write'):
        extract_subimages(data_dir / 'benchmark' / 'Set5' / 'HR', out, crop_size=256, step=256, progress=False)
    assert list(out.iterdir()) == []


def test_extract_errors_name_the_file(data_dir, tmp_path, capsys):
    bench = data_dir / 'benchmark' / 'Set5'
    lr_dir = tmp_path / 'lr'
    shutil.copytree(bench / 'LR_bicubic' / 'X2', lr_dir)
    (lr_dir / 'birdx2.png').unlink()
    assert _run('extract', bench / 'HR', tmp_path / 'o', '--lq', lr_dir, '--lq-out', tmp_path / 'ol', '--scale', 2,
                '--crop-size', 64, '--step', 64, '--quiet', '--workers', 1) == 1
    err = capsys.readouterr().err
    assert 'no LR image' in err and 'bird.png' in err
    # an x3 LR filed as x2: its size is not HR / 2
    (tmp_path / 'hr1').mkdir()
    shutil.copy(bench / 'HR' / 'baby.png', tmp_path / 'hr1' / 'baby.png')
    (tmp_path / 'lr1').mkdir()
    shutil.copy(bench / 'LR_bicubic' / 'X3' / 'babyx3.png', tmp_path / 'lr1' / 'babyx2.png')
    with pytest.raises(DataPrepError, match=r'babyx2\.png: size 170x170 is not that of baby\.png \(512x512\)'):
        extract_subimages(tmp_path / 'hr1', tmp_path / 'o', tmp_path / 'lr1', tmp_path / 'ol', scale=2,
                          crop_size=64, step=64, progress=False)
    with pytest.raises(DataPrepError, match='--crop-size 64 must be a positive multiple of the scale 3'):
        extract_subimages(bench / 'HR', tmp_path / 'o', bench / 'LR_bicubic' / 'X3', tmp_path / 'ol', scale=3,
                          crop_size=64, step=48, progress=False)
    with pytest.raises(DataPrepError, match=r'bird\.png: 288x288 is smaller than the 480x480 crop'):
        extract_subimages(bench / 'HR', tmp_path / 'o', progress=False)
    broken = tmp_path / 'broken'
    broken.mkdir()
    (broken / 'x.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
    with pytest.raises(DataPrepError, match=r'x\.png: not a readable image'):
        extract_subimages(broken, tmp_path / 'o2', crop_size=8, step=8, progress=False)


def test_make_lr_rejects_corrupt_image(tmp_path, capsys):
    folder = tmp_path / 'hr'
    folder.mkdir()
    (folder / 'empty.png').write_bytes(b'')
    assert _run('make-lr', folder, tmp_path / 'lr', '--scale', 2, '--quiet', '--workers', 1) == 1
    assert 'empty.png: not a readable image' in capsys.readouterr().err
    assert not list((tmp_path / 'lr' / 'X2').iterdir())


def test_verify_reports_each_kind_of_problem(set5_subimages, data_dir, tmp_path, capsys):
    hr_lmdb, lr_lmdb = tmp_path / 'hr.lmdb', tmp_path / 'lr.lmdb'
    build_lmdb(set5_subimages / 'hr_sub', hr_lmdb, progress=False)
    build_lmdb(set5_subimages / 'lr_sub', lr_lmdb, progress=False)
    assert _run('verify', hr_lmdb, '--lq', lr_lmdb, '--scale', 2, '--quiet') == 0
    assert 'OK' in capsys.readouterr().out

    # wrong scale: every pair is flagged with the file names
    assert _run('verify', hr_lmdb, '--lq', lr_lmdb, '--scale', 4, '--quiet', '--max-problems', 100) == 1
    out = capsys.readouterr().out
    assert 'hr.lmdb[baby_s001]: HR 128x128 is not 4 x LR 64x64' in out and 'FAILED' in out

    # corrupt value, a key missing from meta_info, a wrong shape in meta_info, a key only in meta_info
    env = lmdb.open(str(lr_lmdb), map_size=1 << 30)
    with env.begin(write=True) as txn:
        txn.put(b'bird_s001', b'\x89PNG garbage')
        txn.put(b'extra', txn.get(b'baby_s001'))
    env.close()
    meta = (lr_lmdb / 'meta_info.txt').read_text().replace('baby_s002.png (64,64,3)', 'baby_s002.png (64,60,3)')
    (lr_lmdb / 'meta_info.txt').write_text(meta + 'ghost.png (64,64,3) 1\n')
    assert _run('verify', hr_lmdb, '--lq', lr_lmdb, '--scale', 2, '--quiet', '--max-problems', 100) == 1
    out = capsys.readouterr().out
    assert 'lr.lmdb[bird_s001]: not a readable image' in out
    assert "lr.lmdb[extra]: stored but missing from meta_info.txt" in out
    assert 'lr.lmdb[baby_s002]: decodes to (64, 64, 3) but meta_info.txt says (64, 60, 3)' in out
    assert "lists 'ghost' but the LMDB has no such key" in out
    assert "no HR image with key 'extra'" in out

    # folders: benchmark pairs need --modcrop, a missing LR is named
    bench = data_dir / 'benchmark' / 'Set5'
    assert _run('verify', bench / 'HR', '--lq', bench / 'LR_bicubic' / 'X3', '--scale', 3, '--quiet') == 1
    assert 'mod-crop' in capsys.readouterr().out
    assert _run('verify', bench / 'HR', '--lq', bench / 'LR_bicubic' / 'X3', '--scale', 3, '--modcrop',
                '--quiet') == 0
    lr_dir = tmp_path / 'lr'
    shutil.copytree(bench / 'LR_bicubic' / 'X3', lr_dir)
    (lr_dir / 'headx3.png').unlink()
    assert _run('verify', bench / 'HR', '--lq', lr_dir, '--scale', 3, '--modcrop', '--quiet') == 1
    assert "HR/head.png: no LR image with key 'head'" in capsys.readouterr().out
    assert _run('verify', tmp_path / 'missing.lmdb', '--quiet') == 1


_POOL_SCRIPT = r'''
import os, signal
import cv2, numpy as np, torch
from ssiu_arch.datasets_lmdb.files import DataPrepError, parallel_map

# Start torch's OpenMP pool and OpenCV's thread pool in this process, as a training or test process has.
torch.set_num_threads(2)
torch.nn.functional.conv2d(torch.randn(4, 32, 96, 96), torch.randn(32, 32, 3, 3), padding=1)
cv2.resize(np.zeros((1024, 1024, 3), np.uint8), (1500, 1500))

assert list(parallel_map(abs, range(-50, 0), 50, workers=2, progress=False)) == list(range(50, 0, -1))
# Ctrl-C reaches the whole process group: workers ignore it and the parent stops them.
assert set(parallel_map(signal.getsignal, [signal.SIGINT] * 4, 4, workers=2, progress=False)) == {signal.SIG_IGN}
assert sorted(parallel_map(abs, range(-50, 0), 50, workers=2, progress=False, ordered=False)) == list(range(1, 51))
items = [range(10**5)] * 9 + [['x', 1]] + [range(10**5)] * 60  # sum(['x', 1]) fails while others run
for _ in range(60):
    try:
        list(parallel_map(sum, items, len(items), workers=2, progress=False))
    except TypeError as err:
        assert "'int' and 'str'" in str(err)
    else:
        raise AssertionError('no error')
try:
    list(parallel_map(os._exit, [3, 4], 2, workers=2, progress=False))
except DataPrepError as err:
    assert 'worker process ended abruptly' in str(err)
else:
    raise AssertionError('no error')
print('ok')
'''


def test_worker_errors_stop_the_pool_without_hanging():
    """A worker's error reaches the caller and the pool shuts down, every time, in a process whose torch and
    OpenCV thread pools are running (forking such a process and terminating a multiprocessing.Pool hung)."""
    done = subprocess.run([sys.executable, '-c', _POOL_SCRIPT], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == 'ok', done.stderr[-2000:]
