"""The CUDA training path, proven: BasicSR's loop with SSIUModel on a GPU, each part printing PASS/FAIL and a figure.

Run through ``benchmarks/cuda_check.sh``, which prepares the environment; from the repository root:

* ``train-fp32``, ``train-bf16``, ``train-fp16``: ``basicsr train -opt options/cuda_check_SSIU_x2.yml`` for
  ``--iters`` iterations (``train.mixed_precision`` set by ``--force_yml``), with iterations/s between the first
  and the last logged iteration (start-up, cuDNN tuning and validation excluded), the last losses and the Set5
  PSNR beside the bicubic baseline. PASS: the run ends at its last iteration with finite losses and a checkpoint.
* ``published-step``: ``benchmarks/bench_train.py`` on the same device: a training step of SSIU and of the
  published formulation. PASS: loss and gradients agree within 1e-5.
* ``cuda-vs-cpu``: the float32 run's checkpoint on the GPU (TF32 off) and on the CPU, on a Set5 image. PASS: the
  largest absolute difference is at most 1e-4. The difference with TF32 convolutions (torch's default on recent
  GPUs, and so what training uses) is printed beside it.
* ``resume``: a run killed with SIGKILL after its first checkpoint, restarted with ``--auto_resume``. PASS: it
  resumes from the saved iteration and finishes.
* ``ddp``: two processes with NCCL through torchrun, if the machine has two GPUs; otherwise SKIP.

``--device cpu`` runs the same parts on the CPU with a tiny network (num_gpu 0; fp16 and DDP skipped), as a dry
run of the script itself. Experiments go to ``experiments/cuda_check_*`` (replaced at each run).
"""
from __future__ import annotations

import argparse
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OPTIONS = REPO / 'options' / 'cuda_check_SSIU_x2.yml'
SET5_LR = REPO / 'tests' / 'data' / 'benchmark' / 'Set5' / 'LR_bicubic' / 'X2' / 'babyx2.png'
BIN = Path(sys.executable).parent
ITER_LINE = re.compile(r'^(\S+ \S+) INFO: \[.*iter:\s*([\d,]+), lr:\(.*?\)\] \[eta: .*?\] (.*)$')
LOSS = re.compile(r'(l_\w+): (\S+)')
RESUMED = re.compile(r'Resuming training from epoch: \d+, iter: (\d+)\.')
TINY = ['network_g:num_feat=16', 'network_g:num_block=3', 'datasets:train:batch_size_per_gpu=2',
        'datasets:train:gt_size=64', 'datasets:train:num_worker_per_gpu=0']


def report(part: str, status: str, figure: str) -> bool:
    print(f'{status:<4} {part:<15} {figure}', flush=True)
    return status != 'FAIL'


class Runs:
    """``basicsr train`` runs of the check's option file, with the overrides of the device and length chosen."""

    def __init__(self, device: str, iters: int) -> None:
        self.device, self.iters = device, iters
        self.common = [f'num_gpu={1 if device == "cuda" else 0}', *(TINY if device == 'cpu' else [])]

    def command(self, name: str, iters: int, checkpoint_every: int, *overrides: str, entry: list[str] | None = None,
                args: tuple[str, ...] = ()) -> list[str]:
        """The command line of a run named ``name`` (``entry`` replaces ``basicsr train``, ``args`` go before
        ``--force_yml``)."""
        forced = [f'name={name}', f'train:total_iter={iters}', f'train:scheduler:periods=[{iters}]',
                  f'val:val_freq={iters}', f'logger:print_freq={max(1, iters // 8)}',
                  f'logger:save_checkpoint_freq={checkpoint_every}', *self.common, *overrides]
        return [*(entry or [str(BIN / 'basicsr'), 'train']), '-opt', str(OPTIONS), *args, '--force_yml', *forced]

    @staticmethod
    def root(name: str) -> Path:
        return REPO / 'experiments' / name

    def fresh(self, name: str) -> Path:
        shutil.rmtree(self.root(name), ignore_errors=True)
        return self.root(name)


def run(cmd: list[str], log: Path, timeout: float = 600) -> int:
    with open(log, 'w') as out:
        return subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode


def latest_log(root: Path) -> str:
    logs = sorted(root.glob('train_*.log'), key=lambda p: p.stat().st_mtime)
    return logs[-1].read_text() if logs else ''


def parse_training(text: str) -> dict:
    """Logged iterations (iter, time, losses), the last Set5 PSNR and the bicubic baseline of a training log."""
    points = []
    for line in text.splitlines():
        match = ITER_LINE.match(line)
        if match:
            stamp = datetime.strptime(match.group(1), '%Y-%m-%d %H:%M:%S,%f').timestamp()
            losses = {k: float(v) for k, v in LOSS.findall(match.group(3))}
            points.append((int(match.group(2).replace(',', '')), stamp, losses))
    psnr = re.findall(r'# psnr: ([\d.]+)\s+Best', text)
    bicubic = re.findall(r'Bicubic baseline Set5.*# psnr: ([\d.]+)', text)
    return {'points': points, 'psnr': float(psnr[-1]) if psnr else None,
            'bicubic': float(bicubic[-1]) if bicubic else None}


def check_training(runs: Runs, precision: str, logs: Path) -> bool:
    part = f'train-{precision}'
    if precision == 'fp16' and runs.device != 'cuda':
        return report(part, 'SKIP', 'fp16 autocast needs CUDA (SSIUModel refuses it on the CPU)')
    name = f'cuda_check_{precision}'
    root = runs.fresh(name)
    mp = 'false' if precision == 'fp32' else precision
    start = time.perf_counter()
    rc = run(runs.command(name, runs.iters, max(1, runs.iters // 2), f'train:mixed_precision={mp}'),
             logs / f'{name}.out')
    wall = time.perf_counter() - start
    info = parse_training(latest_log(root))
    points = info['points']
    if rc or not points:
        return report(part, 'FAIL', f'exit code {rc}, {len(points)} logged iterations; see {logs / name}.out')
    (first_iter, first_t, _), (last_iter, last_t, losses) = points[0], points[-1]
    rate = (last_iter - first_iter) / (last_t - first_t) if last_t > first_t else float('nan')
    finite = all(math.isfinite(v) for _, _, point in points for v in point.values())
    saved = any((root / 'models').glob(f'net_g_{runs.iters}.*'))
    ok = last_iter == runs.iters and finite and saved
    psnr = 'n/a' if info['psnr'] is None else f'{info["psnr"]:.2f} dB'
    bicubic = 'n/a' if info['bicubic'] is None else f'{info["bicubic"]:.2f} dB'
    return report(part, 'PASS' if ok else 'FAIL',
                  f'{rate:.2f} it/s (iters {first_iter}-{last_iter}); run {wall:.0f} s; l_total {losses.get("l_total")}'
                  f'; Set5 PSNR {psnr} (bicubic {bicubic}); checkpoint {"saved" if saved else "MISSING"}')


def check_published_step(device: str, logs: Path) -> bool:
    size = [] if device == 'cuda' else ['--num-feat', '16', '--num-block', '3', '--batch', '2', '--size', '32']
    cmd = [sys.executable, str(REPO / 'benchmarks' / 'bench_train.py'), '--device', device, '--runs',
           '20' if device == 'cuda' else '1', '--variants', 'eager,channels_last', *size]
    rc = run(cmd, logs / 'bench_train.out')
    text = (logs / 'bench_train.out').read_text()
    print(text, end='', flush=True)
    worst = re.search(r'worst relative difference (\S+)', text)
    ok = rc == 0 and worst is not None and float(worst.group(1)) <= 1e-5
    return report('published-step', 'PASS' if ok else 'FAIL',
                  f'loss/gradient difference {worst.group(1) if worst else "n/a"} (<= 1e-5); table above')


def check_cuda_vs_cpu(runs: Runs) -> bool:
    if runs.device != 'cuda':
        return report('cuda-vs-cpu', 'SKIP', 'no GPU in a --device cpu run')
    import cv2
    import torch

    import ssiu_arch.models  # noqa: F401
    from ssiu_arch.utils.weights import load_ssiu

    checkpoints = sorted((Runs.root('cuda_check_fp32') / 'models').glob(f'net_g_{runs.iters}.*'))
    if not checkpoints:
        return report('cuda-vs-cpu', 'FAIL', 'no checkpoint of the fp32 run')
    net = load_ssiu(checkpoints[0]).eval()
    img = cv2.imread(str(SET5_LR), cv2.IMREAD_COLOR)[..., ::-1].copy()
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        cpu = net(x)
        net.cuda()
        diffs = {}
        for tf32 in (False, True):
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = tf32
            diffs[tf32] = float((net(x.cuda()).cpu() - cpu).abs().max())
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, False  # torch's defaults
    return report('cuda-vs-cpu', 'PASS' if diffs[False] <= 1e-4 else 'FAIL',
                  f'max |CUDA - CPU| {diffs[False]:.2e} in float32 (<= 1e-4), {diffs[True]:.2e} with TF32; '
                  f'Set5 baby x2, {tuple(x.shape[-2:])} LR')


def check_resume(runs: Runs, logs: Path) -> bool:
    name = 'cuda_check_resume'
    root = runs.fresh(name)
    every = max(1, runs.iters // 4)
    with open(logs / f'{name}.out', 'w') as out:
        proc = subprocess.Popen(runs.command(name, runs.iters, every), cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while proc.poll() is None and time.monotonic() < deadline and not any(root.glob('training_states/*.state')):
            time.sleep(0.2)
        killed = proc.poll() is None
        if killed:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    states = sorted(int(p.stem) for p in root.glob('training_states/*.state'))
    if not killed or not states:
        return report('resume', 'FAIL', f'the run {"ended" if not killed else "saved no state"} before the kill')
    saved = states[-1]
    rc = run(runs.command(name, runs.iters, every, args=('--auto_resume',)), logs / f'{name}_restart.out')
    text = latest_log(root)
    resumed = RESUMED.findall(text)
    points = parse_training(text)['points']
    last = points[-1][0] if points else None
    ok = rc == 0 and resumed == [str(saved)] and last == runs.iters
    return report('resume', 'PASS' if ok else 'FAIL',
                  f'killed (SIGKILL) with state {saved}.state saved; restart resumed from iter '
                  f'{resumed[0] if resumed else "none"} and reached {last} of {runs.iters}')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def check_ddp(runs: Runs, logs: Path) -> bool:
    if runs.device != 'cuda':
        return report('ddp', 'SKIP', 'a --device cpu run (CPU DDP with gloo is covered by the tests)')
    import torch

    if torch.cuda.device_count() < 2:
        return report('ddp', 'SKIP', f'{torch.cuda.device_count()} GPU: 2-process DDP with NCCL needs two')
    name = 'cuda_check_ddp'
    root = runs.fresh(name)
    iters = max(2, runs.iters // 4)
    launcher = [str(BIN / 'torchrun'), '--nproc_per_node=2', f'--master_port={free_port()}', '-m',
                'ssiu_arch.tools.train']
    cmd = runs.command(name, iters, iters, 'datasets:train:batch_size_per_gpu=8', entry=launcher,
                       args=('--launcher', 'pytorch'))
    rc = run(cmd, logs / f'{name}.out')
    points = parse_training(latest_log(root))['points']
    last = points[-1][0] if points else None
    return report('ddp', 'PASS' if rc == 0 and last == iters else 'FAIL',
                  f'2 processes with NCCL, batch 8 each: exit code {rc}, reached iter {last} of {iters}')


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', choices=('cuda', 'cpu'), default='cuda',
                        help='cpu: a dry run of the same parts with a tiny network')
    parser.add_argument('--iters', type=int, default=None, help='iterations per training run (cuda 200, cpu 4)')
    parser.add_argument('--parts', default='train,published-step,cuda-vs-cpu,resume,ddp',
                        help='comma-separated subset of the parts')
    args = parser.parse_args(argv)
    if args.device == 'cuda':
        import torch

        if not torch.cuda.is_available():
            print('FAIL cuda            torch sees no CUDA device (torch ' + torch.__version__ + ')')
            return 1
        print(f'device: {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}; torch {torch.__version__}, '
              f'CUDA {torch.version.cuda}')
    runs = Runs(args.device, args.iters or (200 if args.device == 'cuda' else 4))
    logs = REPO / 'experiments' / 'cuda_check_logs'
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir(parents=True)
    parts = {p.strip() for p in args.parts.split(',')}
    start = time.perf_counter()
    results = []
    if 'train' in parts:
        results += [check_training(runs, precision, logs) for precision in ('fp32', 'bf16', 'fp16')]
    if 'published-step' in parts:
        results.append(check_published_step(args.device, logs))
    if 'cuda-vs-cpu' in parts:
        results.append(check_cuda_vs_cpu(runs))
    if 'resume' in parts:
        results.append(check_resume(runs, logs))
    if 'ddp' in parts:
        results.append(check_ddp(runs, logs))
    print(f'{sum(results)}/{len(results)} parts passed or skipped in {time.perf_counter() - start:.0f} s; '
          f'outputs in {logs.relative_to(REPO)}')
    return 0 if all(results) else 1


if __name__ == '__main__':
    sys.exit(main())
