"""What the benchmark scripts share: the run options (device, threads, clock) and the header they print."""
from __future__ import annotations

import argparse
import os
import platform
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
