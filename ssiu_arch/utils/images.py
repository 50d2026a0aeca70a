"""The one image reader of the package: files as people have them, every failure a one-line error naming the file.

OpenCV decodes with ``IMREAD_UNCHANGED``, which keeps gray (H, W), colour (H, W, 3) in BGR order, alpha
(H, W, 4) BGRA, and 16-bit samples; palette images come back as BGR(A), CMYK as BGR(A), gray with alpha as
BGRA. That flag also skips the EXIF orientation (OpenCV applies it only when it may convert the colours), so
the orientation tag is read with Pillow and applied here, as image viewers do: a portrait phone photo comes
out upright. Samples other than 8- and 16-bit unsigned (float or 32-bit TIFF) are refused rather than
converted, since every consumer (PNG output, LMDB storage) would round them.
"""
from __future__ import annotations

import io
import os
import stat
import warnings
from pathlib import Path

import cv2
import numpy as np

__all__ = ['ImageError', 'apply_orientation', 'decode_image', 'exif_orientation', 'read_file', 'read_image', 'to_bgr8']

_EXIF_ORIENTATION = 0x0112
_KINDS = ((stat.S_ISDIR, 'a folder'), (stat.S_ISFIFO, 'a FIFO (named pipe)'), (stat.S_ISSOCK, 'a socket'),
          (stat.S_ISCHR, 'a character device'), (stat.S_ISBLK, 'a block device'))


class ImageError(ValueError):
    """A file that cannot be read as an image; the message starts with the file's name."""


def read_file(path: str | os.PathLike) -> bytes:
    """The bytes of the regular file ``path``; never blocks on a FIFO or device, names broken links."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, 'O_CLOEXEC', 0))
    except FileNotFoundError:
        if path.is_symlink():
            raise ImageError(f'{path}: broken symbolic link (its target {os.readlink(path)} does not exist)') \
                from None
        raise ImageError(f'{path}: no such file') from None
    except OSError as err:
        raise ImageError(f'{path}: cannot open ({err.strerror or err})') from None
    with os.fdopen(fd, 'rb') as f:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in _KINDS if test(mode)), 'not a regular file')
            raise ImageError(f'{path}: {kind}, not an image file')
        try:
            return f.read()
        except OSError as err:
            raise ImageError(f'{path}: cannot read ({err.strerror or err})') from None


def exif_orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) stored in encoded image bytes; 1 (as stored) when there is none."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            with Image.open(io.BytesIO(data)) as im:
                value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except Exception:  # Pillow raises many types on formats or headers it does not know; OpenCV decides
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def apply_orientation(img: np.ndarray, orientation: int) -> np.ndarray:
    """Turn an array stored with EXIF ``orientation`` upright (1: unchanged, 6: rotate 90 degrees clockwise, ...)."""
    if orientation in (5, 6, 7, 8):
        img = img.swapaxes(0, 1)  # transpose; 6 and 7 then flip columns, 7 and 8 flip rows
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    if orientation in (2, 3):
        img = img[:, ::-1]
    if orientation in (3, 4):
        img = img[::-1]
    return np.ascontiguousarray(img)


def decode_image(data: bytes, source: str | os.PathLike, orient: bool = True) -> np.ndarray:
    """Decode encoded image bytes to (H, W) gray, (H, W, 3) BGR or (H, W, 4) BGRA, uint8 or uint16.

    ``source`` (a file name or an LMDB key) starts every error message. With ``orient``, the EXIF
    orientation is applied.
    """
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) if data else None
    except cv2.error:  # a few decoders raise on damaged data instead of returning None
        img = None
    if img is None:
        why = 'an empty file' if not data else 'truncated, corrupt or in a format OpenCV lacks'
        raise ImageError(f'{source}: not a readable image ({why})')
    if img.dtype not in (np.uint8, np.uint16):
        raise ImageError(f'{source}: {img.dtype} samples; only 8- and 16-bit unsigned images are supported '
                         '(converting would round the values)')
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 3 and img.shape[2] not in (3, 4):
        raise ImageError(f'{source}: {img.shape[2]} channels; only gray, colour and colour with alpha are supported')
    if orient:
        img = apply_orientation(img, exif_orientation(data))
    return img


def read_image(path: str | os.PathLike, orient: bool = True) -> np.ndarray:
    """Read an image file as :func:`decode_image` does; :class:`ImageError` names the file on any failure."""
    return decode_image(read_file(path), path, orient)


def to_bgr8(img: np.ndarray) -> np.ndarray:
    """An image of :func:`decode_image` as OpenCV's ``IMREAD_COLOR`` (and so BasicSR's ``imfrombytes``) gives it:
    8-bit (16-bit samples keep their high byte, as OpenCV's PNG decoder strips them), three BGR channels (gray
    repeated, alpha dropped)."""
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    if img.ndim == 2:
        return cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(img[..., :3])
