"""One SSIU training step beside the published formulation's: time, memory, and agreement of loss and gradients.

Both networks get the same weights, written once in the published checkpoint layout (``model_state_dict`` with
``module.`` names) and read back: this project's :class:`~ssiu_arch.archs.SSIU` through
:func:`ssiu_arch.utils.weights.load_ssiu`, the published formulation (``benchmarks/published_ssiu.py``) by name.
The step: x2, a batch of 8 LR patches of 64x64 cut from the shipped Set14 HR images (LR by MATLAB bicubic),
AdamW (lr 1e-3, betas 0.9/0.99, weight decay 1e-4), loss L1 + 0.01 FFT, as in the published recipe.

Variants (``--variants``):

* ``eager``: NCHW tensors;
* ``channels_last``: both networks and the batch in ``torch.channels_last``;
* ``compile``: both networks through ``torch.compile`` (what ``network_g_compile: true`` does in SSIUModel). Its
  first step, which compiles, is reported apart; with ``eager`` measured too, the break-even step count is
  compile time / (eager step - compiled step);
* ``recommended``: each network trained as its own repository trains it on the CPU: SSIU as this project's
  option files run it (eager, AdamW with ``fused: true``; ``torch.compile`` made the CPU step slower, see the
  ``compile`` variant), the published network as the published code runs it (eager, NCHW, ``AdamW`` with
  torch's default implementation). Same weights, same batch, same loss, the same optimizer arithmetic;
* ``modules``: ``recommended`` with SSIU's CPU engine off (``use_engine = False``): the network's own modules, as
  on a GPU, without the engine's training kernels (:mod:`ssiu_arch.cpu.training`).

In every other variant SSIU's forward runs through the CPU engine's training path where it applies (float32
eager steps on the CPU). That path runs each pattern of 1x1 convolution backward (one convolution, the convolutions
of one map together, MSGM's gated output projection) with the engine's kernel or with oneDNN, whichever was faster
at its shapes on the first step; the script prints those timings and choices at the end
(:func:`ssiu_arch.cpu.training.backward_choices`).

Per variant both networks start from the checkpoint; their first steps give the relative difference of the loss
and of the gradients (norm of the difference over norm, of all parameters' gradients together; target <= 1e-5;
the largest per-tensor difference is printed too: tensors with tiny gradients show float32 rounding most).
Then they alternate, A/B then B/A, for ``--runs`` steps each; the table gives the median step times and their
ratio, the peak memory rise of one step (CPU: resident set, after returning freed heap memory to the system;
CUDA: allocated memory) and the activations autograd saves for the backward pass (eager variants).
``--malloc retain`` keeps freed memory in the process for both networks, as ``SSIUModel`` does when it trains on
the CPU (an allocator setting cannot differ between two networks of one process).

    python benchmarks/bench_train.py --runs 5 --threads 2 [--variants eager,channels_last,compile,recommended]
                                     [--device cuda] [--malloc default|retain]
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import ssiu_arch.models  # noqa: F401  (BasicSR compatibility fixes before the losses import basicsr)
from ssiu_arch.cpu.memory import retain_freed_memory
from ssiu_arch.cpu.training import backward_choices
from ssiu_arch.tools.bench import load_average, machine_description
from ssiu_arch.utils.weights import load_ssiu

sys.path.insert(0, str(Path(__file__).resolve().parent))
from published_ssiu import PublishedSSIU  # noqa: E402
from ssiu_arch.datasets_lmdb.imresize import imresize  # noqa: E402  (these import basicsr: after the fixes)
from ssiu_arch.losses import FFTLoss  # noqa: E402

SET14_HR = Path(__file__).resolve().parents[1] / 'tests' / 'data' / 'benchmark' / 'Set14' / 'HR'
VARIANTS = ('eager', 'channels_last', 'compile', 'recommended', 'modules')
# (channels_last, compiled, fused AdamW, CPU engine) of (SSIU, published) per variant
SETTINGS = {'eager': ((False, False, False, True),) * 2, 'channels_last': ((True, False, False, True),) * 2,
            'compile': ((False, True, False, True),) * 2,
            'recommended': ((False, False, True, True), (False, False, False, True)),
            'modules': ((False, False, True, False), (False, False, False, True))}
NAMES = ('SSIU', 'published')
MIB = 2 ** 20


def training_batch(batch: int, lr_size: int, scale: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` aligned (LR, HR) patches from random positions of the Set14 HR images, LR by MATLAB bicubic."""
    rng = np.random.default_rng(seed)
    images = sorted(SET14_HR.glob('*.png'))
    hr_size = lr_size * scale
    lq, gt = [], []
    for i in range(batch):
        img = cv2.imread(str(images[i % len(images)]), cv2.IMREAD_COLOR)[..., ::-1]
        top, left = (int(rng.integers(0, n - hr_size + 1)) for n in img.shape[:2])
        patch = np.ascontiguousarray(img[top:top + hr_size, left:left + hr_size])
        gt.append(torch.from_numpy(patch).permute(2, 0, 1).float() / 255)
        lq.append(torch.from_numpy(imresize(patch, 1 / scale)).permute(2, 0, 1).float() / 255)
    return torch.stack(lq), torch.stack(gt)


def write_published_checkpoint(path: Path, net: nn.Module) -> None:
    """``net``'s weights in the layout of the published checkpoints."""
    state = {f'module.{k}': v for k, v in net.state_dict().items()}
    torch.save({'epoch': 0, 'model_state_dict': state}, path)


def load_published(path: Path, config: dict) -> PublishedSSIU:
    state = torch.load(path, map_location='cpu', weights_only=True)['model_state_dict']
    net = PublishedSSIU(**config)
    net.load_state_dict({k.removeprefix('module.'): v for k, v in state.items()}, strict=True)
    return net


class Trainer:
    """A network with its AdamW optimizer and the published loss, stepping on one fixed batch."""

    def __init__(self, net: nn.Module, lq: torch.Tensor, gt: torch.Tensor, device: torch.device,
                 channels_last: bool = False, compiled: bool = False, fused: bool = False, engine: bool = True):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.net = net.to(device, memory_format=fmt).train()
        if hasattr(self.net, 'use_engine'):
            self.net.use_engine = engine
        self.compiled = compiled
        self.forward = torch.compile(self.net) if compiled else self.net
        self.lq, self.gt = lq.to(device, memory_format=fmt), gt.to(device, memory_format=fmt)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=1e-4,
                                           fused=fused or None)
        self.fft = FFTLoss(loss_weight=0.01)
        self.device = device

    def step(self) -> float:
        """One training step; returns the loss. Gradients stay in ``.grad`` until the next step."""
        self.optimizer.zero_grad(set_to_none=True)
        out = self.forward(self.lq)
        loss = F.l1_loss(out, self.gt) + self.fft(out, self.gt)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def timed_step(self) -> float:
        sync = torch.cuda.synchronize if self.device.type == 'cuda' else (lambda: None)
        sync()
        start = time.perf_counter()
        self.step()
        sync()
        return time.perf_counter() - start

    def gradients(self) -> dict[str, torch.Tensor]:
        return {k: p.grad.detach().float().cpu() for k, p in self.net.named_parameters()}


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _trim_heap() -> None:
    """Return free heap memory to the system (glibc), so that a step's resident-set rise is its own."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL('libc.so.6').malloc_trim(0)


def _status_kib(field: str) -> int:
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1])
    raise OSError(f'/proc/self/status has no {field}')


def peak_rise_mib(trainer: Trainer) -> float | None:
    """Peak memory of one step above the memory held before it: CUDA allocations, or the CPU resident set."""
    if trainer.device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        trainer.step()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / MIB
    try:
        _trim_heap()
        Path('/proc/self/clear_refs').write_text('5')  # resets the peak resident set (VmHWM) to the current one
        before = _status_kib('VmRSS')
        trainer.step()
        return (_status_kib('VmHWM') - before) / 1024
    except OSError:
        return None


def saved_activations_mib(trainer: Trainer) -> float:
    """Bytes of the distinct tensors (parameters aside) that autograd saves for the backward pass of one step."""
    params = {p.untyped_storage().data_ptr() for p in trainer.net.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        trainer.step()
    return sum(storages.values()) / MIB


def run_variant(variant: str, checkpoint: Path, config: dict, lq: torch.Tensor, gt: torch.Tensor, runs: int,
                device: torch.device) -> dict:
    ours, theirs = SETTINGS[variant]
    trainers = {'SSIU': Trainer(load_ssiu(checkpoint), lq, gt, device, *ours),
                'published': Trainer(load_published(checkpoint, config), lq, gt, device, *theirs)}
    first, losses, grads = {}, {}, {}
    for name, trainer in trainers.items():  # the first step: same weights, so loss and gradients must agree
        start = time.perf_counter()
        losses[name] = trainer.step()
        first[name] = time.perf_counter() - start
        grads[name] = trainer.gradients()
    loss_diff = abs(losses['SSIU'] - losses['published']) / abs(losses['published'])
    names = list(grads['published'])
    grad_diff = relative_difference(torch.cat([grads['SSIU'][k].flatten() for k in names]),
                                    torch.cat([grads['published'][k].flatten() for k in names]))
    worst_tensor = max((relative_difference(grads['SSIU'][k], grads['published'][k]), k) for k in names)
    times = {name: [] for name in NAMES}
    for run in range(runs):
        for name in NAMES if run % 2 == 0 else NAMES[::-1]:
            times[name].append(trainers[name].timed_step())
    row = {'variant': variant, 'loss_diff': loss_diff, 'grad_diff': grad_diff, 'worst_tensor': worst_tensor}
    for name, trainer in trainers.items():
        row[name] = {'median_s': statistics.median(times[name]), 'first_s': first[name],
                     'peak_mib': peak_rise_mib(trainer),
                     'saved_mib': None if trainer.compiled else saved_activations_mib(trainer)}
    return row


def _mib(value: float | None) -> str:
    return 'n/a' if value is None else f'{value:.0f}'


def format_table(rows: list[dict]) -> str:
    lines = [f'{"variant":<14}{"SSIU ms":>10}{"published ms":>14}{"speed-up":>10}{"loss rel diff":>15}'
             f'{"grad rel diff":>15}{"peak rise MiB (SSIU/pub)":>26}{"saved activations MiB":>23}']
    for row in rows:
        ours, pub = row['SSIU'], row['published']
        saved = f'{_mib(ours["saved_mib"])}/{_mib(pub["saved_mib"])}'
        lines.append(f'{row["variant"]:<14}{ours["median_s"] * 1e3:>10.1f}{pub["median_s"] * 1e3:>14.1f}'
                     f'{pub["median_s"] / ours["median_s"]:>9.2f}x{row["loss_diff"]:>15.2e}{row["grad_diff"]:>15.2e}'
                     f'{_mib(ours["peak_mib"]) + "/" + _mib(pub["peak_mib"]):>26}{saved:>23}')
    return '\n'.join(lines)


def choice_lines(choices: dict[tuple, tuple[str, dict[str, float]]]) -> list[str]:
    """One line per 1x1 convolution backward pattern and shape that the engine's training path timed."""
    lines = []
    for (pattern, shape, detail, threads), (chosen, times) in choices.items():
        timed = ', '.join(f'{name} {seconds * 1e3:.2f} ms' for name, seconds in times.items())
        lines.append(f'1x1 backward {pattern} {"x".join(map(str, shape))} {detail} ({threads} threads): {timed}; '
                     f'runs {chosen}')
    return lines


def compile_summary(rows: list[dict]) -> list[str]:
    """Compile time of each network and after how many steps compiling pays off against eager."""
    by_variant = {row['variant']: row for row in rows}
    eager = by_variant.get('eager')
    lines = []
    for variant, name in (('compile', 'SSIU'), ('compile', 'published')):
        if variant not in by_variant:
            continue
        c = by_variant[variant][name]
        compile_s = c['first_s'] - c['median_s']
        text = f'{variant} ({name}): first step {c["first_s"]:.1f} s, of which compilation ~{compile_s:.1f} s'
        if eager is not None:
            saved = eager[name]['median_s'] - c['median_s']
            text += (f'; saves {saved * 1e3:.1f} ms a step: break-even after {compile_s / saved:.0f} steps'
                     if saved > 0 else f'; {-saved * 1e3:.1f} ms slower a step than eager: never pays off')
        lines.append(text)
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--runs', type=int, default=5, help='timed steps of each network per variant')
    parser.add_argument('--threads', type=int, default=2, help='torch CPU threads')
    parser.add_argument('--variants', default=','.join(VARIANTS), help=f'comma-separated, of {", ".join(VARIANTS)}')
    parser.add_argument('--device', default='cpu', help='cpu or cuda')
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--size', type=int, default=64, help='LR patch side')
    parser.add_argument('--num-feat', type=int, default=64)
    parser.add_argument('--num-block', type=int, default=9)
    parser.add_argument('--malloc', choices=('default', 'retain'), default='default',
                        help="CPU: glibc malloc's defaults, or freed memory kept for reuse (what SSIUModel sets on "
                             'the CPU) for both networks: an allocator setting is process-wide')
    args = parser.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(',') if v.strip()]
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        parser.error(f'--variants: unknown {bad[0] if bad else "(none)"}; choose from {", ".join(VARIANTS)}')
    if args.runs < 1:
        parser.error('--runs must be at least 1')
    device = torch.device(args.device)
    if device.type == 'cuda' and not torch.cuda.is_available():
        parser.error('--device cuda: torch sees no CUDA device')
    torch.set_num_threads(args.threads)
    if device.type == 'cpu' and args.malloc == 'retain' and not retain_freed_memory():
        parser.error('--malloc retain: this C library cannot be told to keep freed memory')
    if device.type == 'cuda':  # float32 for the comparison: no TF32 convolutions
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)

    config = {'scale': 2, 'n_feats': args.num_feat, 'n_blocks': args.num_block, 'num_heads': 4, 'colors': 3}
    lq, gt = training_batch(args.batch, args.size, config['scale'])
    where = (f'{torch.cuda.get_device_name(device)}, TF32 off' if device.type == 'cuda'
             else f'{args.threads} threads, malloc {args.malloc}')
    print(f'machine: {machine_description(engine=device.type == "cpu")}; torch {torch.__version__}; {device.type}: '
          f'{where}')
    print(f'step: x2, batch {args.batch} of {args.size}x{args.size} LR, AdamW, L1 + 0.01 FFT; SSIU num_feat '
          f'{args.num_feat}, num_block {args.num_block}; {args.runs} timed steps per network and variant')
    print(f'load average at start: {load_average()}', flush=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / 'published_layout.pth'
        write_published_checkpoint(checkpoint, PublishedSSIU(**config))
        for variant in variants:
            rows.append(run_variant(variant, checkpoint, config, lq, gt, args.runs, device))
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    print()
    print(format_table(rows))
    for row in rows:
        diff, name = row['worst_tensor']
        print(f'{row["variant"]}: largest per-tensor gradient difference {diff:.2e} ({name}, float32 rounding of a '
              f'small gradient; the target applies to the whole gradient)')
    for line in compile_summary(rows):
        print(line)
    for row in rows:
        if row['variant'] == 'modules':
            print(f'modules: SSIU with its own modules {row["published"]["median_s"] / row["SSIU"]["median_s"]:.2f}x '
                  'faster a step than the published network as published')
        if row['variant'] == 'recommended':
            ratio = row['published']['median_s'] / row['SSIU']['median_s']
            print(f'recommended: SSIU as trained here {ratio:.2f}x faster a step than the published network as '
                  f'published ({"meets" if ratio >= 2.5 else "BELOW"} the 2.5x target)')
    for line in choice_lines(backward_choices()):
        print(line)
    worst = max(max(row['loss_diff'], row['grad_diff']) for row in rows)
    print(f'loss and gradients vs the published formulation: worst relative difference {worst:.2e} '
          f'({"within" if worst <= 1e-5 else "ABOVE"} the 1e-5 target)')
    print(f'load average at end: {load_average()}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
