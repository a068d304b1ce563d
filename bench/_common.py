"""What the benchmark scripts share: the run options (device, threads, clock), the header they print, and the
statistics of seeded studies (mean ± sd, paired differences with 95 % t-intervals)."""
from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys

import torch

import minilearn


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """--device, --threads and --clock."""
    parser.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    parser.add_argument('--threads', type=int, default=None, help='torch.set_num_threads (CPU)')
    parser.add_argument('--clock', choices=('wall', 'cpu'), default='wall',
                        help="'cpu': this process's CPU time, steadier on a shared machine (CPU device, 1 thread)")


def start_run(args: argparse.Namespace) -> torch.device:
    """Apply --threads, print versions, machine and the exact command; return the device."""
    if args.threads: torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gpu = f' ({torch.cuda.get_device_name(device)})' if device.type == 'cuda' else ''
    print(f'minilearn {minilearn.__version__}, torch {torch.__version__}, python {platform.python_version()}, '
          f'device {device}{gpu}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, {args.clock} clock')
    print('command: python ' + ' '.join(sys.argv))
    return device


# Student's t quantile 0.975 by degrees of freedom (1.96 beyond the table)
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093}


def mean_std(values: list[float]) -> str:
    """'mean ± sd' over seeds (the value alone for one seed)."""
    if len(values) == 1: return f'{values[0]:.2f}'
    return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'


def paired(values: list[float], reference: list[float]) -> str:
    """Mean paired difference and its 95 % t-interval over seeds (* when it excludes 0)."""
    d = [a - b for a, b in zip(values, reference)]
    if len(d) < 2: return f'{d[0]:+.2f}'
    m, s = statistics.mean(d), statistics.stdev(d)
    half = T_975.get(len(d) - 1, 1.96) * s / math.sqrt(len(d))
    mark = ' *' if m - half > 0 or m + half < 0 else ''
    return f'{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}]{mark}'
