"""Forward+backward time and peak memory of minilearn's losses against PyTorch's cross entropy.

  LabelSmoothingCrossEntropy(ε)  vs  F.cross_entropy(label_smoothing=ε)
  SoftBootstrappingLoss / HardBootstrappingLoss  vs  F.cross_entropy
for (B, C) = (256, 10), (256, 1000), (2048, 32000) float32 logits. Time: median over interleaved repeats.
Peak memory: the most bytes allocated at once during one forward+backward beyond the inputs (CUDA:
torch.cuda.max_memory_allocated; CPU: the allocation timeline of torch.profiler). Targets: ≤ 1.10× time,
≤ 1.05× peak memory.

    python bench/loss_bench.py                 # full run
    python bench/loss_bench.py --repeats 5     # quick look
    python bench/loss_bench.py --threads 1 --clock cpu   # on a busy shared CPU machine
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

from _common import add_run_options, start_run
from minilearn.losses import HardBootstrappingLoss, LabelSmoothingCrossEntropy, SoftBootstrappingLoss

EPS = 0.1
TIME_TARGET, MEMORY_TARGET = 1.10, 1.05


def pairs() -> list[tuple[str, object, str, object]]:
    """(name, loss, reference name, reference loss)."""
    return [('LabelSmoothingCrossEntropy', LabelSmoothingCrossEntropy(EPS),
             'F.cross_entropy(label_smoothing)', partial(F.cross_entropy, label_smoothing=EPS)),
            ('SoftBootstrappingLoss', SoftBootstrappingLoss(), 'F.cross_entropy', F.cross_entropy),
            ('HardBootstrappingLoss', HardBootstrappingLoss(), 'F.cross_entropy', F.cross_entropy)]


def make_inputs(bs: int, n_classes: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(bs, n_classes, generator=g).to(device).requires_grad_()
    return logits, torch.randint(0, n_classes, (bs,), generator=g).to(device)


def forward_backward(loss_func, logits, targets) -> None:
    loss_func(logits, targets).backward()
    logits.grad = None


def seconds(loss_func, logits, targets, device, clock, n_calls: int = 1) -> float:
    """Time of one forward+backward, averaged over `n_calls` back-to-back calls."""
    if device.type == 'cuda': torch.cuda.synchronize()
    start = clock()
    for _ in range(n_calls): forward_backward(loss_func, logits, targets)
    if device.type == 'cuda': torch.cuda.synchronize()
    return (clock() - start) / n_calls


@contextlib.contextmanager
def stderr_silenced():
    """The profiler's C++ side logs to file descriptor 2; keep the table readable."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, 'w') as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def peak_bytes(loss_func, logits, targets, device) -> int:
    """Bytes allocated at the peak of one forward+backward, above what was allocated before it."""
    forward_backward(loss_func, logits, targets)  # warm
    if device.type == 'cuda':
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        forward_backward(loss_func, logits, targets)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile
    with stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        forward_backward(loss_func, logits, targets)
    deltas = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == '[memory]')
    current = peak = 0
    for _, nbytes in deltas:
        current += nbytes
        peak = max(peak, current)
    return peak


def bench_shape(bs: int, n_classes: int, args, device: torch.device) -> None:
    logits, targets = make_inputs(bs, n_classes, device)
    clock = time.process_time if args.clock == 'cpu' else time.perf_counter
    print(f'\n(B, C) = ({bs}, {n_classes})')
    print(f"{'loss':<34}{'ms':>9}{'peak MB':>10}{'time':>9}{'memory':>9}  (vs reference)")
    for name, loss_func, ref_name, ref_func in pairs():
        for f in (loss_func, ref_func): forward_backward(f, logits, targets)  # warm-up
        once = seconds(ref_func, logits, targets, device, time.perf_counter)
        n_calls = max(1, int(args.sample_s / max(once, 1e-6)))  # small shapes: time many calls per sample
        times = {name: [], ref_name: []}
        for i in range(args.repeats):
            order = [(name, loss_func), (ref_name, ref_func)]
            if i % 2: order.reverse()
            for n, f in order: times[n].append(seconds(f, logits, targets, device, clock, n_calls) * 1e3)
        ms = {n: statistics.median(t) for n, t in times.items()}
        peak = {n: peak_bytes(f, logits, targets, device) for n, f in ((name, loss_func), (ref_name, ref_func))}
        time_ratio, memory_ratio = ms[name] / ms[ref_name], peak[name] / peak[ref_name]
        verdict = ('ok' if time_ratio <= TIME_TARGET else 'MISS time') + (
            '' if memory_ratio <= MEMORY_TARGET else ' MISS memory')
        print(f'{name:<34}{ms[name]:>9.3f}{peak[name] / 2**20:>10.2f}{time_ratio:>8.2f}x{memory_ratio:>8.2f}x'
              f'  {verdict}')
        print(f'  {ref_name:<32}{ms[ref_name]:>9.3f}{peak[ref_name] / 2**20:>10.2f}')


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--shapes', nargs='+', default=['256x10', '256x1000', '2048x32000'], help='BxC')
    parser.add_argument('--repeats', type=int, default=21, help='timed samples per loss, interleaved')
    parser.add_argument('--sample-s', type=float, default=0.02, help='seconds of calls per timed sample')
    add_run_options(parser)
    args = parser.parse_args(argv)
    device = start_run(args)
    for shape in args.shapes:
        bs, n_classes = (int(v) for v in shape.lower().split('x'))
        bench_shape(bs, n_classes, args, device)


if __name__ == '__main__':
    main()
