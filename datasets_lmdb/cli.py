"""``ssiu lmdb {extract,make-lr,build,verify}``: prepare DIV2K / Flickr2K / DF2K LMDBs for BasicSR."""
from __future__ import annotations

import argparse
import sys
import time

from ssiu_arch.datasets_lmdb.files import DataPrepError, default_workers
from ssiu_arch.datasets_lmdb.lmdb_tools import build_lmdb, check_pairs, describe, scan_image_set
from ssiu_arch.datasets_lmdb.prepare import extract_subimages, make_lr

_EPILOG = """typical DF2K x2 preparation (LR given or made with make-lr):
  ssiu lmdb make-lr DF2K/HR DF2K/LR_bicubic --scale 2 3 4
  ssiu lmdb extract DF2K/HR DF2K/HR_sub --lq DF2K/LR_bicubic/X2 --lq-out DF2K/LR_bicubic_X2_sub --scale 2
  ssiu lmdb build DF2K/HR_sub DF2K/DF2K_train_HR_sub.lmdb
  ssiu lmdb build DF2K/LR_bicubic_X2_sub DF2K/DF2K_train_LR_bicubic_X2_sub.lmdb
  ssiu lmdb verify DF2K/DF2K_train_HR_sub.lmdb --lq DF2K/DF2K_train_LR_bicubic_X2_sub.lmdb --scale 2
or store only HR and train with type: HROnlyBicubicDataset (LR made on the fly, same bicubic)."""


def _finish(name: str, start: float, count: int, what: str) -> int:
    elapsed = time.perf_counter() - start
    print(f'ssiu lmdb {name}: {count} {what} in {elapsed:.1f} s ({count / max(elapsed, 1e-9):.1f}/s)')
    return 0


def _run_extract(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    count = extract_subimages(args.hr, args.out, args.lq, args.lq_out, scale=args.scale, crop_size=args.crop_size,
                              step=args.step, thresh_size=args.thresh_size, compress_level=args.compress_level,
                              workers=args.workers, progress=not args.quiet)
    return _finish('extract', start, count, 'HR sub-images written' + (' (and as many LR)' if args.lq else ''))


def _run_make_lr(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    count = make_lr(args.hr, args.out, tuple(args.scale), compress_level=args.compress_level, workers=args.workers,
                    progress=not args.quiet)
    return _finish('make-lr', start, count, f'HR images downscaled x{"/x".join(map(str, args.scale))}')


def _run_build(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    count = build_lmdb(args.folder, args.lmdb, compress_level=args.compress_level, strip_suffix=args.strip_suffix,
                       workers=args.workers, batch=args.batch, overwrite=args.overwrite, progress=not args.quiet)
    return _finish('build', start, count, f'images written to {args.lmdb}')


def _run_verify(args: argparse.Namespace) -> int:
    if (args.lq is None) != (args.scale is None):
        raise DataPrepError('--lq and --scale go together (check LR/HR pairs at that scale)')
    sets = [scan_image_set(args.gt, args.scale, args.workers, not args.quiet)]
    if args.lq is not None:
        sets.append(scan_image_set(args.lq, args.scale, args.workers, not args.quiet))
    problems = [p for s in sets for p in s.problems]
    for image_set in sets:
        print(describe(image_set))
    if args.lq is not None:
        problems += check_pairs(sets[0], sets[1], args.scale, args.modcrop)
        paired = len(set(sets[0].shapes) & set(sets[1].shapes))
        print(f'{paired} LR/HR pairs at x{args.scale}')
    if problems:
        for problem in problems[:args.max_problems]:
            print(f'  {problem}')
        if len(problems) > args.max_problems:
            print(f'  ... and {len(problems) - args.max_problems} more')
        print(f'FAILED: {len(problems)} problem(s)')
        return 1
    checks = ['every image decodes']
    if any(s.is_lmdb for s in sets):
        checks.append('meta_info.txt agrees with the contents')
    if args.lq is not None:
        checks.append('sizes agree with the scale')
    print('OK: ' + ', '.join(checks))
    return 0


def _guarded(func):
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (DataPrepError, OSError) as err:
            print(f'ssiu lmdb {args.lmdb_command}: error: {err}', file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f'ssiu lmdb {args.lmdb_command}: interrupted', file=sys.stderr)
            return 130
    return run


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--workers', type=int, default=default_workers(), metavar='N',
                        help='processes reading/encoding images (default: CPU count, at most 8)')
    parser.add_argument('--quiet', action='store_true', help='no progress bar')
    parser.set_defaults(func=_guarded(parser.get_default('run')))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    lmdb_parser = subparsers.add_parser(
        'lmdb', help='prepare training sets: sub-images, bicubic LR, LMDB build and verify',
        description='Prepare DIV2K / Flickr2K / DF2K the way BasicSR reads them.', epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = lmdb_parser.add_subparsers(dest='lmdb_command', required=True, metavar='STEP')

    parser = commands.add_parser(
        'extract', help='crop HR (and LR) images into overlapping sub-images',
        description='Crop every HR image into crop-size sub-images every step pixels, plus one flush with the '
                    'right/bottom edge when more than thresh-size pixels remain (BasicSR extract_subimages). '
                    'Sub-images are PNGs <name>_s001.png, ... With --lq, the LR images (<name>x{s}.png or '
                    '<name>.png) are cropped at the same places divided by --scale and saved under the same '
                    'names as the HR ones; an HR that is not a multiple of the scale is cropped at the '
                    'bottom/right to scale x LR first. Each file is written under a temporary name and renamed; '
                    'rerunning replaces files of the same name.')
    parser.add_argument('hr', help='folder of HR images')
    parser.add_argument('out', help='output folder for HR sub-images')
    parser.add_argument('--lq', help='folder of the matching LR images')
    parser.add_argument('--lq-out', help='output folder for LR sub-images (with --lq)')
    parser.add_argument('--scale', type=int, default=1, help='LR scale factor (with --lq; default 1)')
    parser.add_argument('--crop-size', type=int, default=480, help='HR sub-image size (default 480)')
    parser.add_argument('--step', type=int, default=240, help='HR stride between sub-images (default 240)')
    parser.add_argument('--thresh-size', type=int, default=0,
                        help='add an edge-flush crop when more than this many pixels remain (default 0)')
    parser.add_argument('--compress-level', type=int, default=3, metavar='N', help='PNG compression 0-9 (default 3)')
    parser.set_defaults(run=_run_extract)
    _common(parser)

    parser = commands.add_parser(
        'make-lr', help='MATLAB-exact bicubic LR images from HR',
        description='Write OUT/X{s}/<name>x{s}.png = MATLAB imresize(HR, 1/s, "bicubic") for each scale, from '
                    'the HR cropped at the bottom/right to a multiple of s (how DIV2K and the SR benchmarks '
                    'were made); byte-exact with the published bicubic LR. Rerunning replaces files.')
    parser.add_argument('hr', help='folder of HR images')
    parser.add_argument('out', help='output folder (gets X2/, X3/, ... subfolders)')
    parser.add_argument('--scale', type=int, nargs='+', default=[2, 3, 4], help='scale factors (default 2 3 4)')
    parser.add_argument('--compress-level', type=int, default=3, metavar='N', help='PNG compression 0-9 (default 3)')
    parser.set_defaults(run=_run_make_lr)
    _common(parser)

    parser = commands.add_parser(
        'build', help='write a folder of images into a BasicSR LMDB',
        description='Write every image of FOLDER into LMDB (data.mdb, lock.mdb, meta_info.txt with '
                    '"<key>.png (h,w,c) level" lines) for io_backend type lmdb. Keys are file names up to the '
                    'first dot. The LMDB is built under a hidden temporary name (.NAME.lmdb.building) and '
                    'renamed when complete, so an interrupted or failed build never looks finished; rerunning '
                    'deletes such a leftover and starts clean.')
    parser.add_argument('folder', help='folder of images (e.g. sub-images from extract)')
    parser.add_argument('lmdb', help='LMDB folder to create; must end in .lmdb')
    parser.add_argument('--compress-level', type=int, default=1,
                        metavar='N', help='PNG compression 0-9 of the stored images (default 1, as BasicSR: '
                                          'about 9x faster to write than 9 for ~10%% more disk)')
    parser.add_argument('--strip-suffix', default='', metavar='SUFFIX',
                        help='drop this ending from keys, e.g. x2 so that 0001x2.png gets the HR key 0001')
    parser.add_argument('--batch', type=int, default=500, metavar='N', help='images per LMDB transaction (default 500)')
    parser.add_argument('--overwrite', action='store_true',
                        help='replace an existing LMDB (only once the new one is complete)')
    parser.set_defaults(run=_run_build)
    _common(parser)

    parser = commands.add_parser(
        'verify', help='decode every image, check meta_info.txt and LR/HR sizes',
        description='Decode every image of an LMDB or folder; for an LMDB check that meta_info.txt lists '
                    'exactly the stored keys with their decoded shapes; with --lq and --scale check that every '
                    'HR has an LR of the same key and that HR = scale x LR. Prints a summary; exits 1 on '
                    'any problem.')
    parser.add_argument('gt', help='HR LMDB or folder')
    parser.add_argument('--lq', help='LR LMDB or folder to pair with GT')
    parser.add_argument('--scale', type=int, help='scale factor of the pairs (with --lq)')
    parser.add_argument('--modcrop', action='store_true',
                        help='accept HR larger than scale x LR by less than the scale (benchmark sets)')
    parser.add_argument('--max-problems', type=int, default=20, metavar='N', help='problems listed (default 20)')
    parser.set_defaults(run=_run_verify)
    _common(parser)

