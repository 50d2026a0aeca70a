"""CPU speed and memory of registered SR networks: the ``ssiu bench`` subcommand.

Every case (one network at one scale and input size) runs in a fresh Python process, so its peak
resident memory is its own: ``peak_mem_mb`` is the rise of the process's resident-memory high-water mark
(``getrusage`` ``ru_maxrss``) over the first forward pass. Latency is the median wall time of the
following passes under ``torch.inference_mode`` with ``torch.set_num_threads(threads)``. ``efficiency``
divides the network's multiply-adds per second by those of a dense float32 2048x2048 matmul timed in the
same process just before each pass, so that it compares the network with what the machine reaches at
the moment of the measurement (on a shared machine both slow down together). With ``bf16``, each timed
float32 pass is followed by one under ``--precision bf16`` (bfloat16 CPU autocast, or its float32 fallback
where bfloat16 does not pay on this CPU): ``bf16_latency_ms`` is their median and ``bf16_ratio`` the median of the
pairs' latency ratios, measured side by side so that a shared machine's load affects both alike.

By default each case first calls :func:`ssiu_arch.cpu.memory.retain_freed_memory`: eager PyTorch allocates
every intermediate map afresh, and with glibc's default settings a forward pass page-faults most of its
working set again on every pass. ``--default-malloc`` measures without it.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from torch import nn

from ssiu_arch import archs
from ssiu_arch.cpu import kernels
from ssiu_arch.cpu.engine import ENGINE, bf16_speedup
from ssiu_arch.cpu.memory import retain_freed_memory
from ssiu_arch.tools.common import positive_int
from ssiu_arch.tools.precision import autocast, resolve_precision
from ssiu_arch.utils.cpu_features import describe_cpu
from ssiu_arch.utils.fileio import write_text_atomic
from ssiu_arch.utils.profiling import count_macs, count_params, lr_size_for

# LR input (height, width) per scale: ~1280x720 outputs, the sizes lightweight-SR papers time.
DEFAULT_INPUTS = {2: (360, 640), 3: (240, 426), 4: (180, 320)}
MATMUL_SIZE = 2048


class BenchError(RuntimeError):
    """A network that cannot be built or run as asked; the message names the case."""


def build_net(arch: str, scale: int, **net_opt) -> nn.Module:
    """An architecture of this package, or one registered in BasicSR's ``ARCH_REGISTRY``, at ``scale``, random
    weights, eval mode."""
    cls = getattr(archs, arch, None) if arch in archs.__all__ else None
    if cls is None:
        try:
            from basicsr.utils.registry import ARCH_REGISTRY

            import ssiu_arch.models  # noqa: F401  (BasicSR's registry with this plugin's compatibility fixes)

            cls = ARCH_REGISTRY.get(arch)
        except (ImportError, KeyError):
            raise BenchError(f'--arch {arch}: not a registered architecture') from None
    params = inspect.signature(cls).parameters
    scale_key = next((k for k in ('upscale', 'scale', 'upscale_factor') if k in params), None)
    if scale_key is None and scale != 1:
        raise BenchError(f'--arch {arch}: no upscale/scale argument; pass it with --net-opt')
    kwargs = {scale_key: scale} if scale_key else {}
    try:
        return cls(**{**kwargs, **net_opt}).eval()
    except (TypeError, ValueError) as err:
        raise BenchError(f'--arch {arch} x{scale}: cannot build it with {net_opt}: {err}') from None


def matmul_rate(size: int = MATMUL_SIZE, repeats: int = 3, shape: tuple[int, int, int] | None = None,
                dtype: torch.dtype = torch.float32) -> float:
    """Multiply-adds per second of a dense ``size`` x ``size`` matmul, or of an (m, k) x (k, n) ``shape`` one, in
    ``dtype`` (best of ``repeats``)."""
    m, k, n = shape or (size, size, size)
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    return m * k * n / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _max_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2 ** 20 if sys.platform == 'darwin' else rss / 2 ** 10  # bytes on macOS, KiB on Linux


def machine_description(engine: bool = True) -> str:
    """CPU model name (or ``platform.processor()``), the number of CPUs, its native bfloat16 and, with ``engine`` and
    where the CPU engine's bfloat16 kernels run, their speed against its float32 ones
    (:func:`ssiu_arch.cpu.engine.bf16_speedup`, which decides ``--precision bf16``; it loads the compiled kernels)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                name = line.split(':', 1)[1].strip()
                break
    except OSError:
        pass
    engine_bf16 = bf16_speedup() if engine else None
    kernels_rate = '' if engine_bf16 is None else f"; the engine's bf16 kernels {engine_bf16:.2f}x its float32 ones"
    return f'{name}, {os.cpu_count()} CPUs ({describe_cpu()}{kernels_rate})'


def load_average() -> str:
    """The 1, 5 and 15 minute load averages, for the record of a measurement on a shared machine."""
    return ' '.join(f'{v:.2f}' for v in os.getloadavg())


def measure_inference(arch: str, scale: int, input_hw: tuple[int, int], threads: int = 2, runs: int = 5,
                      net_opt: dict | None = None, retain_memory: bool = True, maps: str = 'auto',
                      bf16: bool = False) -> dict:
    """One bench row, measured in this process (see the module docstring; :func:`run_case` isolates it).

    ``maps`` is the SSIU inference engine's choice of whole feature maps or row bands: its own rule (``auto``),
    ``whole`` or ``bands`` (8 MiB bands on maps of any size). ``bf16``: also time bfloat16 passes, interleaved.
    """
    malloc = 'retain' if retain_memory and retain_freed_memory() else 'default'
    torch.set_num_threads(threads)
    net = build_net(arch, scale, **(net_opt or {}))
    if maps != 'auto' and not isinstance(net, archs.SSIU):
        raise BenchError(f'{arch} has no row bands (maps={maps!r})')
    with _engine_maps(maps):
        return _measure(net, arch, scale, input_hw, threads, runs, malloc, maps, bf16)


@contextlib.contextmanager
def _engine_maps(maps: str):
    """Within the block, the SSIU engine processes whole maps (``whole``), row bands (``bands``) or chooses."""
    saved = ENGINE.band_bytes, ENGINE.whole_map_bytes
    if maps == 'bands':
        ENGINE.whole_map_bytes = 0
    elif maps == 'whole':
        ENGINE.band_bytes = 0
    try:
        yield
    finally:
        ENGINE.band_bytes, ENGINE.whole_map_bytes = saved


def _measure(net: nn.Module, arch: str, scale: int, input_hw: tuple[int, int], threads: int, runs: int, malloc: str,
             maps: str, bf16: bool) -> dict:
    """The bench row of ``net`` (see :func:`measure_inference`)."""
    in_ch = next((m.in_channels for m in net.modules() if isinstance(m, nn.Conv2d)), 3)
    h, w = input_hw
    try:
        macs_g = count_macs(net, lr_size_for((720, 1280), scale), in_ch) / 1e9
        macs_input = count_macs(net, (h, w), in_ch)
    except Exception:  # a network the meta-device counter cannot trace still gets timed
        macs_g = macs_input = None
    x = torch.rand(1, in_ch, h, w)
    base = _max_rss_mb()
    low = resolve_precision('bf16', 'cpu')[0] if bf16 else 'fp32'

    def low_pass():
        with autocast(low, 'cpu'):
            net(x)

    with torch.inference_mode():
        net(x)
        peak = _max_rss_mb()
        if bf16:
            low_pass()
        rates, times, low_times = [], [], []
        for _ in range(runs):
            rates.append(matmul_rate())
            times.append(_timed(lambda: net(x)))
            if bf16:
                low_times.append(_timed(low_pass))
    latency = statistics.median(times)
    efficiency = macs_input / latency / statistics.median(rates) if macs_input else None
    extra = {}
    if bf16:
        extra = {'bf16_runs': low, 'bf16_latency_ms': round(statistics.median(low_times) * 1e3, 1),
                 'bf16_ratio': round(statistics.median(b / a for a, b in zip(times, low_times)), 3)}
    return {
        'model': arch, 'scale': scale, 'params': count_params(net),
        'macs_g': None if macs_g is None else round(macs_g, 2), 'input': f'{w}x{h}',
        'latency_ms': round(latency * 1e3, 1), 'peak_mem_mb': round(peak - base, 1),
        'efficiency': None if efficiency is None else round(efficiency, 3), 'threads': threads,
        'machine': machine_description(), 'malloc': malloc, 'maps': maps, **extra,
    }


def measure_training_step(arch: str = 'SSIU', scale: int = 2, batch: int = 8, size: int = 64, threads: int = 2,
                          runs: int = 5, net_opt: dict | None = None, retain_memory: bool = True) -> dict:
    """Median wall time of one forward + L1 backward on a ``batch`` of ``size``² LR patches (train mode)."""
    if retain_memory:
        retain_freed_memory()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    net = build_net(arch, scale, **(net_opt or {})).train()
    lr, hr = torch.rand(batch, 3, size, size), torch.rand(batch, 3, size * scale, size * scale)

    def step():
        net.zero_grad(set_to_none=True)
        F.l1_loss(net(lr), hr).backward()

    step()
    times = [_timed(step) for _ in range(runs)]
    return {'model': arch, 'scale': scale, 'batch': f'{batch}x3x{size}x{size}', 'train_step_ms':
            round(statistics.median(times) * 1e3, 1), 'threads': threads}


def run_case(kind: str, **kwargs) -> dict:
    """:func:`measure_inference` (``kind='inference'``) or :func:`measure_training_step` in a fresh process."""
    spec = json.dumps({'kind': kind, **kwargs})
    cmd = [sys.executable, '-c', 'from ssiu_arch.tools.bench import _child_main; _child_main()', spec]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        tail = proc.stderr.strip().splitlines()[-1:] or ['no error message']
        raise BenchError(f'{kind} case {kwargs}: {tail[0]}')
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _child_main() -> None:
    spec = json.loads(sys.argv[1])
    kind = spec.pop('kind')
    try:
        if kind == 'inference':
            spec['input_hw'] = tuple(spec['input_hw'])
            row = measure_inference(**spec)
        else:
            row = measure_training_step(**spec)
    except BenchError as err:
        sys.exit(str(err))
    print(json.dumps(row))


def format_rows(rows: list[dict]) -> str:
    """A fixed-width table of bench rows, with bf16 latency and ratio columns where a row has them."""
    low = any('bf16_ratio' in r for r in rows)
    lines = [f'{"model":<10} {"scale":>5} {"input":>9} {"params":>9} {"MACs(G)":>8} {"latency(ms)":>12} '
             f'{"peak mem(MB)":>13} {"efficiency":>10} {"malloc":>8} {"maps":>6}'
             + (f' {"bf16(ms)":>9} {"bf16/fp32":>9} {"bf16 ran":>8}' if low else '')]
    for r in rows:
        macs = '-' if r['macs_g'] is None else f'{r["macs_g"]:.1f}'
        eff = '-' if r['efficiency'] is None else f'{r["efficiency"]:.3f}'
        line = (f'{r["model"]:<10} {"x" + str(r["scale"]):>5} {r["input"]:>9} {r["params"]:>9,} {macs:>8} '
                f'{r["latency_ms"]:>12.1f} {r["peak_mem_mb"]:>13.1f} {eff:>10} {r.get("malloc", "-"):>8} '
                f'{r.get("maps", "-"):>6}')
        if low:
            line += (f' {r["bf16_latency_ms"]:>9.1f} {r["bf16_ratio"]:>9.3f} {r["bf16_runs"]:>8}' if 'bf16_ratio' in r
                     else f' {"-":>9} {"-":>9} {"-":>8}')
        lines.append(line)
    return '\n'.join(lines)


def _parse_input(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'expected WIDTHxHEIGHT such as 320x180, got {text!r}') from None
    if w < 1 or h < 1:
        raise argparse.ArgumentTypeError(f'sides must be positive, got {text!r}')
    return h, w


def _parse_net_opt(items: list[str]) -> dict:
    opts = {}
    for item in items:
        key, sep, value = item.partition('=')
        if not sep or not key:
            raise SystemExit(f'ssiu bench: --net-opt expects KEY=VALUE, got {item!r}')
        opts[key] = yaml.safe_load(value)
    return opts


def _run(args: argparse.Namespace) -> int:
    net_opt = _parse_net_opt(args.net_opt)
    if args.json and not Path(args.json).parent.is_dir():
        raise SystemExit(f'ssiu bench: --json {args.json}: folder does not exist')
    malloc = 'default' if args.default_malloc else 'retain freed memory'
    print(f'machine: {machine_description()}; threads {args.threads}; malloc {malloc}; load average '
          f'{load_average()}', flush=True)
    print(kernels.status_line(), flush=True)
    rows = []
    for arch in args.arch:
        for scale in args.scale:
            input_hw = args.input or DEFAULT_INPUTS.get(scale, DEFAULT_INPUTS[4])
            try:
                rows.append(run_case('inference', arch=arch, scale=scale, input_hw=input_hw, threads=args.threads,
                                     runs=args.runs, net_opt=net_opt, retain_memory=not args.default_malloc,
                                     bf16=args.bf16))
            except BenchError as err:
                raise SystemExit(f'ssiu bench: {err}') from None
    print(format_rows(rows))
    if args.json:
        write_text_atomic(args.json, json.dumps(rows, indent=2) + '\n')
        print(f'wrote {args.json}')
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        'bench', help='CPU latency, peak memory and efficiency of registered networks',
        description='Time registered networks (random weights) on CPU, each case in a fresh process: params, '
                    'multiply-adds for a 1280x720 output, median latency, peak resident memory and efficiency '
                    '(multiply-adds/s relative to a dense float32 2048x2048 matmul in the same process). glibc '
                    'malloc is set to keep freed memory unless --default-malloc is given.')
    parser.add_argument('--arch', nargs='+', default=['SSIU'], help='registered architecture names (default SSIU)')
    parser.add_argument('--scale', nargs='+', type=positive_int, default=[2, 3, 4], help='scales (default 2 3 4)')
    parser.add_argument('--input', type=_parse_input, default=None,
                        help='LR input WIDTHxHEIGHT (default per scale: 640x360, 426x240, 320x180)')
    parser.add_argument('--threads', type=positive_int, default=2, help='torch.set_num_threads (default 2)')
    parser.add_argument('--runs', type=positive_int, default=5, help='timed passes after the first (default 5)')
    parser.add_argument('--net-opt', nargs='*', default=[], metavar='KEY=VALUE',
                        help='extra network keyword arguments, values in YAML syntax')
    parser.add_argument('--default-malloc', action='store_true',
                        help="measure with glibc's default malloc settings (default: keep freed memory for reuse, "
                             'as MALLOC_MMAP_THRESHOLD_ and MALLOC_TRIM_THRESHOLD_ would)')
    parser.add_argument('--bf16', action='store_true',
                        help='also time --precision bf16 passes interleaved with the float32 ones (bf16 latency and '
                             'bf16/fp32 ratio columns; where the CPU lacks native bfloat16 that runs float32)')
    parser.add_argument('--json', help='write the rows (a JSON list) to this file')
    parser.set_defaults(func=_run)
