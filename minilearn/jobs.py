"""The jobs of the `minilearn` command, by sub-command: what cli.py calls, by one import, once the command line
is checked (this module, and with it torch, is imported only then)."""
from __future__ import annotations

import argparse

from .train_job import run_train
from .tune_job import run_tune

__all__ = ['run_job']


def run_job(args: argparse.Namespace, prog: str) -> int:
    """Run the job of `args.command` with checked options; returns the exit status."""
    return run_tune(args, prog) if args.command == 'tune' else run_train(args, prog)
