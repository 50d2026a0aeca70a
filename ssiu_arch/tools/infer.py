"""Super-resolve image files with a trained SSIU: ``ssiu infer`` and the :func:`upscale_image` API.

Large images are processed in overlapping tiles whose outputs are blended with linear (feathered)
weights, so memory is bounded by the tile size rather than the image size. Tile starts are aligned to
the network's ``pad_multiple`` so every tile sees the same attention-window grid as the whole image.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ssiu_arch.tools.common import load_weights_or_exit, positive_int
from ssiu_arch.tools.precision import PRECISIONS, PrecisionError, autocast, check_precision, resolve_precision
from ssiu_arch.utils.fileio import remove_stale_temporaries, write_bytes_atomic
from ssiu_arch.utils.images import ImageError, read_image

__all__ = ['ImageError', 'NonFiniteOutputError', 'check_suffix', 'check_tiling', 'collect_inputs', 'infer_paths',
           'read_image', 'tile_spans', 'upscale_image', 'write_png']

DEFAULT_TILE = 384
DEFAULT_TILE_OVERLAP = 32
# Smallest --tile-overlap the command accepts when tiling. Without overlap, pixels at a tile's border miss
# their neighbours' context and the seams show (the published x2 architecture: 49 dB against the untiled
# image, where 4 px give 62 dB; tile starts are also rounded to the pad multiple, which widens overlaps).
MIN_TILE_OVERLAP = 4
DEFAULT_SUFFIX = '_SSIUx{scale}'


class NonFiniteOutputError(ValueError):
    """The network produced NaN or Inf: writing it would give a black or garbage image."""


def check_tiling(tile: int, overlap: int, align: int = 1) -> int:
    """Validate a tiling and return its step: ``tile - overlap`` rounded down to a multiple of ``align``."""
    if tile < 0 or overlap < 0:
        raise ValueError(f'tile ({tile}) and tile_overlap ({overlap}) must be >= 0')
    step = (tile - overlap) // align * align
    if tile and step < 1:
        raise ValueError(f'tile ({tile}) must exceed tile_overlap ({overlap}) by at least {align} '
                         "(the network's pad multiple)")
    return step


def tile_spans(length: int, tile: int, overlap: int, align: int = 1) -> list[tuple[int, int]]:
    """``(start, end)`` spans covering ``[0, length)`` with tiles of at most ``tile`` pixels.

    Starts are multiples of the step of :func:`check_tiling`, so neighbours share at least ``overlap``
    pixels; the last span ends at ``length``. ``tile == 0`` or ``tile >= length`` gives one span.
    """
    step = check_tiling(tile, overlap, align)
    if tile == 0 or tile >= length:
        return [(0, length)]
    count = math.ceil((length - tile) / step) + 1
    return [(i * step, min(i * step + tile, length)) for i in range(count)]


def _ramp_weights(spans: list[tuple[int, int]], scale: int) -> list[torch.Tensor]:
    """Per-span 1D blending weights in output pixels: linear ramps where neighbouring spans overlap."""
    weights = []
    for i, (start, end) in enumerate(spans):
        w = torch.ones((end - start) * scale)
        if i > 0 and spans[i - 1][1] > start:  # ramp up over the overlap with the previous span
            n = (spans[i - 1][1] - start) * scale
            w[:n] = torch.minimum(w[:n], (torch.arange(n) + 0.5) / n)
        if i + 1 < len(spans) and end > spans[i + 1][0]:  # ramp down over the overlap with the next span
            n = (end - spans[i + 1][0]) * scale
            w[-n:] = torch.minimum(w[-n:], (torch.arange(n).flip(0) + 0.5) / n)
        weights.append(w)
    return weights


def _upscale_tensor(net: nn.Module, x: torch.Tensor, scale: int, tile: int, tile_overlap: int, align: int,
                    device: torch.device, dtype: torch.dtype, precision: str, progress: bool) -> torch.Tensor:
    """Super-resolve a (1, 3, H, W) float32 CPU tensor tile by tile; returns (3, sH, sW) float32 on the CPU."""
    h, w = x.shape[-2:]

    def run(tile_in: torch.Tensor) -> torch.Tensor:
        with autocast(precision, device):
            return net(tile_in.to(device, dtype))[0].float().cpu()

    rows, cols = tile_spans(h, tile, tile_overlap, align), tile_spans(w, tile, tile_overlap, align)
    if len(rows) == 1 and len(cols) == 1:
        return run(x)
    row_w, col_w = _ramp_weights(rows, scale), _ramp_weights(cols, scale)
    # Each tile's weight is row_w ⊗ col_w, so the total weight is the outer product of the 1D sums.
    row_sum, col_sum = torch.zeros(h * scale), torch.zeros(w * scale)
    for (y0, y1), wy in zip(rows, row_w):
        row_sum[y0 * scale:y1 * scale] += wy
    for (x0, x1), wx in zip(cols, col_w):
        col_sum[x0 * scale:x1 * scale] += wx
    out = torch.zeros(3, h * scale, w * scale)
    with tqdm(total=len(rows) * len(cols), desc='tiles', unit='tile', leave=False, disable=not progress) as bar:
        for (y0, y1), wy in zip(rows, row_w):
            for (x0, x1), wx in zip(cols, col_w):
                sr = run(x[..., y0:y1, x0:x1])
                out[:, y0 * scale:y1 * scale, x0 * scale:x1 * scale] += sr * wy[:, None] * wx[None, :]
                bar.update()
    return out.div_(row_sum[:, None]).div_(col_sum[None, :])


def upscale_image(
    net: nn.Module,
    img: np.ndarray,
    scale: int,
    tile: int = DEFAULT_TILE,
    tile_overlap: int = DEFAULT_TILE_OVERLAP,
    device: str | torch.device | None = None,
    bgr: bool = True,
    progress: bool = False,
    precision: str = 'fp32',
) -> np.ndarray:
    """Super-resolve one image array with ``net`` (an RGB network in [0, 1], e.g. SSIU).

    Args:
        net: network mapping (1, 3, H, W) to (1, 3, sH, sW); run in its parameters' dtype.
        img: (H, W), (H, W, 1) or (H, W, 2) grayscale or (H, W, 3|4) colour, optionally with alpha;
            uint8, uint16 or float in [0, 1]. Gray is run as three equal channels and averaged back;
            alpha is upscaled separately with bicubic interpolation.
        scale: the network's scale factor.
        tile: LR tile side in pixels (0: the whole image at once). Default 384.
        tile_overlap: LR pixels shared by neighbouring tiles, blended linearly. Default 32.
        device: where tiles run (default: the device of ``net``'s parameters).
        bgr: colour channels are in OpenCV's BGR(A) order (default) rather than RGB(A).
        progress: show a tqdm bar over tiles.
        precision: ``fp32``, or ``bf16``/``fp16`` to run the network under :func:`torch.autocast` (LayerNorm,
            softmax and reductions stay float32, tiles are blended in float32). Run as asked: see
            :func:`~ssiu_arch.tools.precision.resolve_precision` for what pays on a device.

    Returns:
        (sH, sW[, C]) array of ``img``'s dtype and channel layout.
    """
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 2, 3, 4)):
        raise ValueError(f'expected an (H, W) or (H, W, 1-4) image, got shape {img.shape}')
    check_precision(precision)
    if img.dtype == np.uint8 or img.dtype == np.uint16:
        max_value = float(np.iinfo(img.dtype).max)
    elif np.issubdtype(img.dtype, np.floating):
        max_value = 1.0
    else:
        raise ValueError(f'unsupported image dtype {img.dtype} (uint8, uint16 or float in [0, 1])')
    channels = 1 if img.ndim == 2 else img.shape[2]
    planes = img.reshape(*img.shape[:2], channels)
    gray, alpha = channels in (1, 2), planes[..., -1] if channels in (2, 4) else None
    color = np.repeat(planes[..., :1], 3, axis=2) if gray else planes[..., :3]
    if bgr and not gray:
        color = color[..., ::-1]
    x = torch.from_numpy(np.ascontiguousarray(color.transpose(2, 0, 1), dtype=np.float32) / max_value)[None]

    param = next(net.parameters(), None)
    device = torch.device(device) if device is not None else (param.device if param is not None else 'cpu')
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    with torch.inference_mode():
        out = _upscale_tensor(net, x, scale, tile, tile_overlap, getattr(net, 'pad_multiple', 1), device, dtype,
                              precision, progress)
        if not torch.isfinite(out).all():
            raise NonFiniteOutputError('the network output holds NaN or Inf (non-finite weights, or low-precision '
                                       'overflow); nothing written')
        out = out.clamp_(0, 1).mul_(max_value).permute(1, 2, 0).numpy()
    if gray:
        out = out.mean(axis=2, keepdims=True)
    elif bgr:
        out = out[..., ::-1]
    if alpha is not None:
        # Integer images saturate inside cv2.resize; bicubic overshoot of float ones is clipped.
        big = np.clip(cv2.resize(alpha, (out.shape[1], out.shape[0]), interpolation=cv2.INTER_CUBIC), 0, max_value)
        out = np.concatenate([out, big[..., None].astype(np.float32)], axis=2)
    if max_value > 1:
        out = np.rint(out)
    out = out.astype(img.dtype)
    return out[..., 0] if img.ndim == 2 else out


def collect_inputs(paths: list[str | os.PathLike]) -> list[Path]:
    """The files named in ``paths``; a folder stands for its non-hidden entries (sorted, not recursive).

    Entries of a folder that are not regular files (broken symbolic links, FIFOs, sub-folders) are kept,
    so that :func:`infer_paths` names each of them instead of skipping it silently.
    """
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            files += sorted(f for f in path.iterdir() if not f.name.startswith('.'))
        else:
            files.append(path)
    return files


def check_suffix(suffix: str) -> None:
    """Refuse an output-name suffix with a path separator (it would write outside the folder) or a NUL."""
    separators = {'/', '\\', os.sep, os.altsep or '/'}
    if any(sep in suffix for sep in separators) or '\0' in suffix:
        raise ValueError(f'--suffix {suffix!r}: must not contain path separators (outputs stay in the output folder)')


def write_png(img: np.ndarray, path: Path) -> None:
    """Encode ``img`` as PNG and write it to a temporary name next to ``path``, then rename it."""
    ok, data = cv2.imencode('.png', img)
    if not ok:
        raise ImageError(f'OpenCV could not encode a {img.dtype} image of shape {img.shape} as PNG')
    write_bytes_atomic(path, data.tobytes())


def infer_paths(
    net: nn.Module,
    inputs: list[Path],
    output_dir: str | os.PathLike,
    scale: int,
    suffix: str = DEFAULT_SUFFIX,
    tile: int = DEFAULT_TILE,
    tile_overlap: int = DEFAULT_TILE_OVERLAP,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    precision: str = 'fp32',
) -> dict[str, list[Path]]:
    """Super-resolve every file in ``inputs`` to ``output_dir/<stem><suffix>.png``.

    ``suffix`` may contain ``{scale}``. Every failure is reported on stderr with the file's name and the
    other files go on: unreadable inputs (not images, broken links, FIFOs), outputs that cannot be written
    (full disk, read-only folder) and non-finite network outputs. Existing outputs are skipped unless
    ``overwrite``; folders among ``inputs`` are skipped with a note (folders are not searched recursively).
    Hidden temporary files that killed runs left in ``output_dir`` are removed first. ``precision`` is that of
    :func:`upscale_image`. Returns the input paths by outcome: ``written``, ``exists``, ``folders`` and ``failed``.
    """
    check_suffix(suffix)
    check_precision(precision)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in remove_stale_temporaries(output_dir):
        tqdm.write(f'removed {stale}: left by a run that was killed while writing', file=sys.stderr)
    suffix = suffix.replace('{scale}', str(scale))
    result: dict[str, list[Path]] = {'written': [], 'exists': [], 'folders': [], 'failed': []}
    claimed: dict[Path, Path] = {}
    for path in tqdm(inputs, desc='images', unit='img'):
        if path.is_dir():
            tqdm.write(f'skipped {path}: a folder (folders inside folders are not searched)', file=sys.stderr)
            result['folders'].append(path)
            continue
        out_path = output_dir / f'{path.stem}{suffix}.png'
        key = out_path.resolve()
        if key in claimed or (path.exists() and key == path.resolve()):
            other = claimed.get(key, path)
            tqdm.write(f'failed {path}: output {out_path} would replace {other}', file=sys.stderr)
            result['failed'].append(path)
            continue
        claimed[key] = path
        if out_path.exists() and not overwrite:
            tqdm.write(f'skipped {path}: {out_path} exists (use --overwrite)', file=sys.stderr)
            result['exists'].append(path)
            continue
        try:
            img = read_image(path)
        except ImageError as err:  # the message starts with the path
            tqdm.write(f'failed {err}', file=sys.stderr)
            result['failed'].append(path)
            continue
        try:
            sr = upscale_image(net, img, scale, tile=tile, tile_overlap=tile_overlap, device=device, progress=True,
                               precision=precision)
            write_png(sr, out_path)
        except OSError as err:
            tqdm.write(f'failed {path}: cannot write {out_path} ({err.strerror or err})', file=sys.stderr)
            result['failed'].append(path)
            continue
        except MemoryError:
            tqdm.write(f'failed {path}: out of memory (lower --tile)', file=sys.stderr)
            result['failed'].append(path)
            continue
        except (ValueError, RuntimeError, cv2.error) as err:
            tqdm.write(f'failed {path}: {" ".join(str(err).split())}', file=sys.stderr)
            result['failed'].append(path)
            continue
        result['written'].append(path)
    return result


def _make_output_folder(output: str) -> None:
    path = Path(output)
    if path.exists() and not path.is_dir():
        raise SystemExit(f'ssiu infer: -o {output}: exists and is not a folder')
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise SystemExit(f'ssiu infer: -o {output}: cannot create the folder ({err.strerror or err})') from None


def _run(args: argparse.Namespace) -> int:
    from ssiu_arch.cpu import kernels
    from ssiu_arch.cpu.memory import retain_freed_memory
    from ssiu_arch.utils.weights import infer_config

    device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('ssiu infer: --device cuda requested but CUDA is not available (use --device cpu)')
    try:
        precision, notice = resolve_precision(args.precision, device)
    except PrecisionError as err:
        raise SystemExit(f'ssiu infer: --{err}') from None
    if notice:
        print(f'ssiu infer: --{notice}', file=sys.stderr, flush=True)
    if args.tile and args.tile_overlap < MIN_TILE_OVERLAP:
        raise SystemExit(f'ssiu infer: --tile-overlap {args.tile_overlap}: at least {MIN_TILE_OVERLAP} pixels '
                         'when tiling (without overlap the tile seams show); or --tile 0 for no tiling')
    try:
        check_suffix(args.suffix)
    except ValueError as err:
        raise SystemExit(f'ssiu infer: {err}') from None
    if device == 'cpu':  # feature maps are reused instead of zero-filled afresh: up to 2x faster (ssiu bench)
        retain_freed_memory()
        print(kernels.status_line(), flush=True)
    net = load_weights_or_exit(args.weights, 'infer')
    try:
        check_tiling(args.tile, args.tile_overlap, getattr(net, 'pad_multiple', 1))
    except ValueError as err:
        raise SystemExit(f'ssiu infer: --tile/--tile-overlap: {err}') from None
    config = infer_config(net.state_dict())
    if args.scale is not None and args.scale != config['upscale']:
        raise SystemExit(f'ssiu infer: --scale {args.scale} does not match the weights {args.weights}, '
                         f'which are x{config["upscale"]}')
    if (config['num_in_ch'], config['num_out_ch']) != (3, 3):
        raise SystemExit(f'ssiu infer: {args.weights} maps {config["num_in_ch"]} to {config["num_out_ch"]} '
                         'channels; only RGB networks are supported')
    net = net.eval().to(device)
    inputs = collect_inputs(args.inputs)
    if not inputs:
        raise SystemExit(f'ssiu infer: no input files in {", ".join(args.inputs)}')
    _make_output_folder(args.output)
    result = infer_paths(net, inputs, args.output, config['upscale'], suffix=args.suffix, tile=args.tile,
                         tile_overlap=args.tile_overlap, overwrite=args.overwrite, precision=precision)
    failed = result['failed']
    folders = f', {len(result["folders"])} folder(s) not searched' if result['folders'] else ''
    print(f'ssiu infer: {len(result["written"])} written to {args.output}, {len(result["exists"])} skipped '
          f'(output exists){folders}, {len(failed)} failed' + (f': {", ".join(map(str, failed))}' if failed else ''))
    return 1 if failed else 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'infer', help='super-resolve images or folders of images to PNG',
        description='Super-resolve image files (folders: every file in them, not recursive) with SSIU weights '
                    'and write <output>/<name><suffix>.png. Gray, RGBA (alpha upscaled bicubically) and 16-bit '
                    'inputs keep their layout and bit depth; the EXIF orientation of photos is applied, as image '
                    'viewers do, so the output is upright and carries no orientation tag. Every file that cannot '
                    'be read or written is named on stderr and the others go on; the exit code is then 1.')
    parser.add_argument('inputs', nargs='+', help='image files or folders')
    parser.add_argument('-w', '--weights', required=True,
                        help='BasicSR ({"params"|"params_ema": ...}) or published ({"model_state_dict": ...}) '
                             'checkpoint')
    parser.add_argument('-s', '--scale', type=positive_int,
                        help='expected scale factor; an error if the weights differ (default: that of the weights)')
    parser.add_argument('-o', '--output', default='results', help='output folder (default: %(default)s)')
    parser.add_argument('--suffix', default=DEFAULT_SUFFIX,
                        help='appended to each input name, no path separators; {scale} is replaced '
                             '(default: %(default)s)')
    parser.add_argument('-t', '--tile', type=int, default=DEFAULT_TILE,
                        help='LR tile side in pixels, 0 for the whole image at once (default: %(default)s)')
    parser.add_argument('--tile-overlap', type=int, default=DEFAULT_TILE_OVERLAP,
                        help=f'LR pixels shared by neighbouring tiles, blended linearly; at least {MIN_TILE_OVERLAP} '
                             'when tiling, as tiles without overlap show seams (default: %(default)s)')
    parser.add_argument('--device', choices=('cpu', 'cuda'), help='default: cuda if available, else cpu')
    parser.add_argument('--precision', choices=tuple(PRECISIONS), default='fp32',
                        help='fp32, or bf16/fp16 under autocast (LayerNorm, softmax and the image stay float32); '
                             'fp16 needs cuda; bf16 on a CPU runs the bfloat16 kernels of the CPU engine where it has '
                             'AVX512_BF16, else fp32 with a notice (default: %(default)s)')
    parser.add_argument('--half', dest='precision', action='store_const', const='fp16',
                        help='deprecated: same as --precision fp16')
    parser.add_argument('--overwrite', action='store_true', help='replace existing outputs')
    parser.set_defaults(func=_run)
