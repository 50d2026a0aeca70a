"""Build and verify LMDB image sets in BasicSR's layout.

``<name>.lmdb/`` holds ``data.mdb`` and ``lock.mdb`` (one PNG-encoded image per key) and ``meta_info.txt``
with one line ``<key>.png (h,w,c) <compress level>`` per image; the key is the file name up to its first
dot. BasicSR's ``PairedImageDataset`` reads it with ``io_backend: {type: lmdb}`` unchanged.

We write LMDBs ourselves instead of with ``basicsr.utils.lmdb_util`` because its writers exit the process on
an existing folder, write straight under the final name (an interrupted run looks complete), fail
cryptically on unreadable images, and size the map from the first image only (``MapFullError`` on larger
later ones).
"""
from __future__ import annotations

import functools
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import lmdb
from ssiu_arch.datasets_lmdb.files import (
    DataPrepError,
    check_compress_level,
    decode_image,
    encode_png,
    image_key,
    image_shape,
    list_images,
    parallel_map,
    read_image,
    split_scale_suffix,
)

META_INFO = 'meta_info.txt'
_META_LINE = re.compile(r'^(\S+?)\.\S+ \((\d+),(\d+),(\d+)\) (\d+)$')
_MIN_MAP_SIZE = 1 << 30


def _encode_one(job: tuple[str, Path], compress_level: int) -> tuple[str, bytes, tuple[int, int, int]]:
    key, path = job
    img = read_image(path)
    return key, encode_png(img, compress_level, str(path)), image_shape(img)


def building_path(lmdb_path: str | os.PathLike) -> Path:
    """Where :func:`build_lmdb` writes before renaming: hidden, and not ending in ``.lmdb``."""
    lmdb_path = Path(lmdb_path)
    return lmdb_path.with_name(f'.{lmdb_path.name}.building')


class _Writer:
    """Puts images in batches; on ``MapFullError`` doubles the map size and replays the batch."""

    def __init__(self, path: Path, map_size: int, batch: int):
        self.env = lmdb.open(str(path), map_size=map_size, sync=False, metasync=False, meminit=False)
        self.batch = batch
        self.pending: list[tuple[bytes, bytes]] = []

    def put(self, key: str, value: bytes) -> None:
        self.pending.append((key.encode('ascii'), value))
        if len(self.pending) >= self.batch:
            self.commit()

    def commit(self) -> None:
        while True:
            try:
                with self.env.begin(write=True) as txn:
                    for key, value in self.pending:
                        txn.put(key, value)
                break
            except lmdb.MapFullError:
                self.env.set_mapsize(2 * self.env.info()['map_size'])
        self.pending = []

    def close(self) -> None:
        self.env.sync(True)
        self.env.close()


def build_lmdb(folder: str | os.PathLike, lmdb_path: str | os.PathLike, compress_level: int = 1,
               strip_suffix: str = '', workers: int = 1, batch: int = 500, overwrite: bool = False,
               map_size: int | None = None, progress: bool = True) -> int:
    """Write every image of ``folder`` into the LMDB ``lmdb_path`` (must end in ``.lmdb``); returns the count.

    Images are stored losslessly as PNG at zlib ``compress_level`` (BasicSR's default 1 writes several times
    faster than 9 for ~10% more disk); ``strip_suffix`` drops e.g. ``x2`` from keys so that LR keys equal
    HR keys. The LMDB is written under :func:`building_path` and renamed when complete, so an interrupted or
    failed build never leaves a folder that looks like a finished LMDB; a leftover from an interrupted run is
    deleted and the build starts clean. An existing ``lmdb_path`` is an error unless ``overwrite``, in which
    case it is replaced only once the new one is complete. ``map_size`` is the initial LMDB map size in bytes
    (default: 4 x the input files, at least 1 GiB); it doubles whenever a transaction does not fit.
    """
    lmdb_path = Path(lmdb_path)
    if lmdb_path.suffix != '.lmdb':
        raise DataPrepError(f'{lmdb_path}: an LMDB folder name must end in .lmdb (BasicSR checks it)')
    check_compress_level(compress_level)
    if lmdb_path.exists() and not overwrite:
        raise DataPrepError(f'{lmdb_path}: already exists (use --overwrite to replace it)')
    paths = list_images(folder)
    keys: dict[str, Path] = {}
    for path in paths:
        key = image_key(path, strip_suffix)
        if key in keys:
            raise DataPrepError(f'{path}: same LMDB key {key!r} as {keys[key].name}')
        keys[key] = path
    tmp = building_path(lmdb_path)
    if tmp.exists():
        shutil.rmtree(tmp)
    lmdb_path.parent.mkdir(parents=True, exist_ok=True)
    tmp.mkdir()
    total_bytes = sum(p.stat().st_size for p in paths if p.is_file())  # others fail by name when read
    current = None
    try:
        writer = _Writer(tmp, map_size or max(_MIN_MAP_SIZE, 4 * total_bytes), batch)
        meta = []
        try:
            worker = functools.partial(_encode_one, compress_level=compress_level)
            for key, data, (h, w, c) in parallel_map(worker, list(keys.items()), len(keys), workers, desc='build',
                                                     progress=progress):
                current = keys[key]
                writer.put(key, data)
                meta.append(f'{key}.png ({h},{w},{c}) {compress_level}\n')
            current = None
            writer.commit()
        finally:
            writer.close()
        with open(tmp / META_INFO, 'w', encoding='ascii') as fout:
            fout.writelines(meta)
            fout.flush()
            os.fsync(fout.fileno())
        if lmdb_path.exists():
            old = lmdb_path.with_name(f'.{lmdb_path.name}.old')
            shutil.rmtree(old, ignore_errors=True)
            os.rename(lmdb_path, old)
            os.rename(tmp, lmdb_path)
            shutil.rmtree(old)
        else:
            os.rename(tmp, lmdb_path)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, (OSError, lmdb.Error)):
            where = f' while adding {current}' if current is not None else ''
            raise DataPrepError(f'{lmdb_path}: write failed{where} ({err}); nothing was written '
                                f'under {lmdb_path.name}') from None
        raise
    return len(keys)


# ---------------------------------------------------------------------------------------------- verify


@dataclass
class ImageSet:
    """What :func:`scan_image_set` found: decoded shapes by key, keys that failed to decode, problems."""

    path: Path
    is_lmdb: bool
    shapes: dict[str, tuple[int, int, int]] = field(default_factory=dict)
    unreadable: set[str] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    def name(self, key: str) -> str:
        """The file behind ``key`` for a folder, ``<lmdb>[key]`` for an LMDB: how problems name an image."""
        return str(self.files[key]) if key in self.files else f'{self.path}[{key}]'

    def add(self, key: str, shape: tuple[int, int, int] | None, problem: str | None) -> None:
        if problem is None:
            self.shapes[key] = shape
        else:
            self.unreadable.add(key)
            self.problems.append(problem)


def read_meta_info(lmdb_path: str | os.PathLike) -> tuple[dict[str, tuple[int, int, int]], list[str]]:
    """Shapes by key from ``meta_info.txt``, and the problems found in it (malformed or duplicate lines)."""
    meta_path = Path(lmdb_path) / META_INFO
    shapes: dict[str, tuple[int, int, int]] = {}
    problems = []
    try:
        lines = meta_path.read_text(encoding='ascii').splitlines()
    except (OSError, UnicodeDecodeError) as err:
        return shapes, [f'{meta_path}: cannot read ({err})']
    for number, line in enumerate(lines, 1):
        match = _META_LINE.match(line.strip())
        if match is None:
            problems.append(f'{meta_path}:{number}: not "<key>.png (h,w,c) level": {line!r}')
            continue
        key = match.group(1)
        if key in shapes:
            problems.append(f'{meta_path}:{number}: key {key!r} listed twice')
        shapes[key] = (int(match.group(2)), int(match.group(3)), int(match.group(4)))
    return shapes, problems


def _decode_shape(job: tuple[str, str, bytes]) -> tuple[str, tuple[int, int, int] | None, str | None]:
    key, source, data = job
    try:
        return key, image_shape(decode_image(data, source)), None
    except DataPrepError as err:
        return key, None, str(err)


def _read_and_decode(job: tuple[str, Path]) -> tuple[str, tuple[int, int, int] | None, str | None]:
    key, path = job
    try:
        return key, image_shape(read_image(path)), None
    except DataPrepError as err:
        return key, None, str(err)


def _scan_folder(result: ImageSet, scale: int | None, workers: int, progress: bool) -> None:
    try:
        paths = list_images(result.path)
    except DataPrepError as err:
        result.problems.append(str(err))
        return
    files = result.files
    for path in paths:
        key = split_scale_suffix(path.name.split('.')[0], scale)
        if key in files:
            result.problems.append(f'{path}: same key {key!r} as {files[key].name}')
        files[key] = path
    for item in parallel_map(_read_and_decode, list(files.items()), len(files), workers,
                             desc=f'verify {result.path.name}', progress=progress):
        result.add(*item)


def check_data_size(env: lmdb.Environment, data_file: Path) -> str | None:
    """A problem if ``data.mdb`` is shorter than its own header says, else None.

    LMDB maps the file into memory: reading a page past the end of a truncated file kills the process
    with SIGBUS instead of raising. The header (read with ``read``, not through the map) records the last
    page in use, so the file must hold at least ``(last_pgno + 1) * page_size`` bytes.
    """
    needed = (env.info()['last_pgno'] + 1) * env.stat()['psize']
    size = data_file.stat().st_size
    if size < needed:
        return (f'{data_file}: truncated: {size} bytes, but its header says the data runs to {needed} bytes '
                '(copy it again or rebuild the LMDB)')
    return None


def _lmdb_jobs(txn: lmdb.Transaction, name: str):
    for raw_key, value in txn.cursor():
        key = raw_key.decode('ascii', errors='replace')
        yield key, f'{name}[{key}]', bytes(value)


def _scan_lmdb(result: ImageSet, workers: int, progress: bool) -> None:
    path = result.path
    if not (path / 'data.mdb').is_file():
        result.problems.append(f'{path}: no data.mdb (not an LMDB)')
        return
    meta, problems = read_meta_info(path)
    result.problems.extend(problems)
    try:
        env = lmdb.open(str(path), readonly=True, lock=False, readahead=False)
    except lmdb.Error as err:
        result.problems.append(f'{path}: cannot open the LMDB ({err})')
        return
    truncated = check_data_size(env, path / 'data.mdb')
    if truncated is not None:
        env.close()
        result.problems.append(truncated)
        return
    try:
        with env.begin(write=False) as txn:
            jobs = _lmdb_jobs(txn, str(path))
            for key, shape, problem in parallel_map(_decode_shape, jobs, txn.stat()['entries'], workers,
                                                    desc=f'verify {path.name}', progress=progress):
                result.add(key, shape, problem)
                if shape is not None and key in meta and meta[key] != shape:
                    result.problems.append(f'{path}[{key}]: decodes to {shape} but {META_INFO} says {meta[key]}')
    except lmdb.Error as err:
        result.problems.append(f'{path}: reading failed ({err})')
    finally:
        env.close()
    stored = set(result.shapes) | result.unreadable
    for key in sorted(set(meta) - stored):
        result.problems.append(f'{path / META_INFO}: lists {key!r} but the LMDB has no such key')
    for key in sorted(stored - set(meta)):
        result.problems.append(f'{path}[{key}]: stored but missing from {META_INFO} (BasicSR will not read it)')


def scan_image_set(path: str | os.PathLike, scale: int | None = None, workers: int = 1,
                   progress: bool = True) -> ImageSet:
    """Decode every image of an LMDB (``*.lmdb``) or a folder; for an LMDB, compare with ``meta_info.txt``.

    Folder keys drop an ``x{scale}`` name suffix, so that benchmark-style LR files pair with their HR.
    """
    path = Path(path)
    result = ImageSet(path, path.suffix == '.lmdb')
    if not path.is_dir():
        result.problems.append(f'{path}: no such folder')
    elif result.is_lmdb:
        _scan_lmdb(result, workers, progress)
    else:
        _scan_folder(result, scale, workers, progress)
    return result


def check_pairs(gt: ImageSet, lq: ImageSet, scale: int, modcrop: bool = False) -> list[str]:
    """Problems of an LR/HR pairing: keys without a partner, channel counts or sizes not related by ``scale``.

    HR must be exactly ``scale`` times LR (what ``paired_random_crop`` requires for training); with
    ``modcrop``, HR may exceed that by less than ``scale`` pixels (benchmark sets, cropped at validation).
    """
    problems = []
    gt_keys = set(gt.shapes) | gt.unreadable
    lq_keys = set(lq.shapes) | lq.unreadable
    for key in sorted(gt_keys - lq_keys):
        problems.append(f'{gt.name(key)}: no LR image with key {key!r} in {lq.path}')
    for key in sorted(lq_keys - gt_keys):
        problems.append(f'{lq.name(key)}: no HR image with key {key!r} in {gt.path}')
    for key in sorted(set(gt.shapes) & set(lq.shapes)):
        (hh, hw, hc), (lh, lw, lc) = gt.shapes[key], lq.shapes[key]
        exact = (hh, hw) == (lh * scale, lw * scale)
        cropped = (hh // scale, hw // scale) == (lh, lw)
        if not (exact or (modcrop and cropped)):
            hint = ' (HR not a multiple of the scale: mod-crop it, or pass --modcrop for validation sets)' \
                if cropped else ''
            problems.append(f'{gt.name(key)}: HR {hw}x{hh} is not {scale} x LR {lw}x{lh} of {lq.name(key)}{hint}')
        if hc != lc:
            problems.append(f'{gt.name(key)}: HR has {hc} channel(s) but LR {lq.name(key)} has {lc}')
    return problems


def describe(image_set: ImageSet) -> str:
    """One summary line: kind, count, sizes and channels found."""
    kind = 'LMDB' if image_set.is_lmdb else 'folder'
    shapes = list(image_set.shapes.values())
    if not shapes:
        return f'{image_set.path} ({kind}): no readable image'
    heights = [s[0] for s in shapes]
    widths = [s[1] for s in shapes]
    channels = sorted({s[2] for s in shapes})
    return (f'{image_set.path} ({kind}): {len(shapes)} images, {min(widths)}-{max(widths)} x '
            f'{min(heights)}-{max(heights)} px, {"/".join(map(str, channels))} channel(s)')
