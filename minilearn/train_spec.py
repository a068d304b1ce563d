"""What the `minilearn train` command line and its job must agree on, without torch: the files a run reads
(the `--data` folder formats) and writes (`--out`), the defaults the help shows and the job uses, the usage
error and how options are recorded.

cli.py checks the command line before torch is imported and reaches train_job.py by one lazy import, so
train_job.py cannot import cli.py (the package's imports point one way); what both need is here, once.
"""
from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ['UsageError', 'one_line', 'options_record', 'data_format', 'valid_folder', 'CHECKPOINT', 'CHECKPOINTS_KEPT', 'RUN_OPTIONS',
           'DEFAULT_N_PER_CLASS', 'CNN_WIDTHS']

DEFAULT_N_PER_CLASS = 1000  # generated shapes per class when --n-per-class is not given
DEFAULT_WD = 5e-4  # SGD's weight decay when --wd is not given (and for a run.json written before --wd)
CNN_WIDTHS = (16, 32, 64, 64)  # conv widths of --arch cnn
CHECKPOINT = 'checkpoint.pth'  # in --out, with --checkpoint-every
CHECKPOINTS_KEPT = 2  # the newest checkpoint and the one before (checkpoint.1.pth), should the newest be corrupt
RUN_OPTIONS = 'run.json'  # the options of a checkpointed run, for --resume


class UsageError(ValueError):
    """A problem with the command line or the folders it names (shown as one line, exit code 2)."""


ARCHS = ('cnn', 'resnet18')  # the library's own nets (from scratch); any other --arch goes to vision_learner
# noisy.NOISE_KINDS, here without torch for the CLI's --noise-kind choices (a test keeps the two equal)
NOISE_KINDS = ('symmetric', 'pair', 'asymmetric')


def one_line(exc: BaseException) -> str:
    """An error as one line: its message, and its type unless it is a UsageError."""
    text = ' '.join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, UsageError) else f'{text} ({type(exc).__name__})'


def options_record(args: argparse.Namespace) -> dict:
    """The parsed options as JSON values (paths as strings), as run.json and metrics.json hold them."""
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ('command', 'subparser')}


def data_format(path: Path) -> str:
    """'cifar10', 'mnist' or 'image-folder': how the `--data` folder `path` is read."""
    if (path / 'data_batch_1').is_file() or (path / 'cifar-10-batches-py' / 'data_batch_1').is_file():
        return 'cifar10'
    if any(path.glob('*idx3-ubyte*')): return 'mnist'
    if (path / 'train').is_dir() and valid_folder(path) is not None: return 'image-folder'
    raise UsageError(f"--data {path}: expected an image folder tree (train/<class>/ and val/<class>/, valid/ or "
                     f"test/), CIFAR-10 python batches (data_batch_1, ..., test_batch) or MNIST idx files")


def valid_folder(path: Path) -> str | None:
    """The validation folder of an image folder tree: val/, valid/ or test/ (the first that exists)."""
    return next((name for name in ('val', 'valid', 'test') if (path / name).is_dir()), None)
