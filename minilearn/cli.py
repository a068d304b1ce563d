"""Command-line interface: `minilearn train` trains a CNN and writes plots, a checkpoint and `metrics.json`.

torch is imported only once the command line has been parsed and checked, so that `--help`, `--version`
and a mistyped option are answered at once (importing torch and torchvision takes seconds). That is why
every import of torch and of the package's own modules below is local to the function that needs it:
none of them breaks an import cycle (tests/test_import_graph.py, tests/test_cli.py check both).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import re
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__

if TYPE_CHECKING:
    import torch

__all__ = ['main', 'build_parser', 'build_learner', 'train', 'write_status', 'STATUSES']

# The default run (shapes, 10,000 training and 2,500 validation images, 8 epochs of one-cycle up to lr 0.1)
# needs about 25 s of one CPU core and reaches 87.9 % validation accuracy (86.6-88.9 % over seeds 0-2; a
# constant lr 0.02 gives 74.2-78.3 %, its last epoch at the mercy of noise): well above chance (10 %), not solved.
DEFAULT_N_PER_CLASS = 1000
DEFAULT_EPOCHS = 8
DEFAULT_LR = 0.1
DEFAULT_BS = 64
CNN_WIDTHS = (16, 32, 64, 64)
LOSSES = ('ce', 'ls', 'soft-boot', 'hard-boot')
CHECKPOINT = 'checkpoint.pth'  # in --out, with --checkpoint-every
RUN_OPTIONS = 'run.json'  # the options of a checkpointed run, for --resume
RESUME_MAY_CHANGE = ('device', 'threads', 'workers', 'quiet')  # options that do not change what is computed
ARCHS = ('cnn', 'resnet18')
SCHEDULES = ('one-cycle', 'constant')
# metrics.json's "status": written "running" before training, then one of the others. "running" in a folder
# nobody trains into any more means the process was killed before it could say so.
STATUSES = ('running', 'interrupted', 'failed', 'complete')
METRICS_FILE = 'metrics.json'


class UsageError(ValueError):
    """A problem with the command line found after parsing (shown as one line, exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, with errors reported on one line (`minilearn train: error: ...`) and exit code 2."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# ---- argument types: each checks one value and names the option's rule --------------------------
def _int_at_least(minimum: int, rule: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum: raise argparse.ArgumentTypeError(f"expected {rule}, got {text!r}")
        return value
    return parse


_positive_int = _int_at_least(1, 'a positive integer')
_non_negative_int = _int_at_least(0, 'an integer >= 0')


def _number(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value): raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_number(text: str) -> float:
    value = _number(text)
    if value <= 0: raise argparse.ArgumentTypeError(f"expected a number > 0, got {text!r}")
    return value


def _ratio(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1: raise argparse.ArgumentTypeError(f"expected a ratio in [0, 1], got {text!r}")
    return value


def _smoothing(text: str) -> float:
    value = _number(text)
    if not 0 <= value < 1: raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `minilearn` argument parser, with its `train` sub-command."""
    parser = _Parser(prog='minilearn', description='minilearn: a small fastai-style training framework for PyTorch.')
    parser.add_argument('--version', action='version', version=f'minilearn {__version__}')
    commands = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    train_parser = commands.add_parser(
        'train', help='train a CNN and write plots, a checkpoint and metrics.json',
        description='Train a CNN with the minilearn Learner: progress bars and a per-epoch table, then a '
                    'summary; writes loss.png, lr.png, model.pth and metrics.json into --out. Without --data it '
                    'trains on a generated shapes dataset (no download).')
    data = train_parser.add_argument_group('data')
    data.add_argument('--data', metavar='PATH', type=Path, default=None,
                      help='an image folder tree train/<class>/, val/<class>/ (or valid/, test/), a CIFAR-10 folder '
                           '(python batches data_batch_1..5, test_batch) or an MNIST folder (idx .gz files); '
                           'default: the embedded generated shapes dataset')
    data.add_argument('--n-per-class', metavar='N', type=_positive_int, default=None,
                      help=f'training images per class: the first N of each class of --data; for the shapes '
                           f'dataset the number generated (default {DEFAULT_N_PER_CLASS}; validation gets a '
                           f'quarter as many, at least 10)')
    data.add_argument('--size', metavar='PX', type=_positive_int, default=32,
                      help='image size: image folders are resized to PX x PX, shapes are drawn at it (default 32)')
    data.add_argument('--noise', metavar='RATIO', type=_ratio, default=0.,
                      help='label noise: redraw this fraction of the training labels uniformly at random '
                           '(validation labels stay clean; default 0)')
    data.add_argument('--workers', metavar='N', type=_non_negative_int, default=0,
                      help='processes that decode --data images, once before training (default 0: in the main process)')
    model = train_parser.add_argument_group('model and training')
    model.add_argument('--arch', choices=ARCHS, default='cnn',
                       help=f'cnn: a small course CNN (get_cnn_model, conv widths {list(CNN_WIDTHS)}, 62 k '
                            f'parameters); '
                            f'resnet18: ResNet-18 for 32x32 inputs (slow on a CPU) (default cnn)')
    model.add_argument('--epochs', metavar='N', type=_positive_int, default=DEFAULT_EPOCHS,
                       help=f'number of epochs (default {DEFAULT_EPOCHS})')
    model.add_argument('--bs', metavar='N', type=_positive_int, default=DEFAULT_BS,
                       help=f'batch size (default {DEFAULT_BS}; validation uses twice as much)')
    model.add_argument('--lr', metavar='LR', type=_positive_number, default=DEFAULT_LR,
                       help=f'learning rate of SGD with weight decay 5e-4: the peak of the one-cycle schedule, or '
                            f'the constant one (default {DEFAULT_LR})')
    model.add_argument('--schedule', choices=SCHEDULES, default='one-cycle',
                       help='one-cycle: learn.fit_one_cycle, the lr warms up from LR/25 to LR over the first 30%% '
                            'of the batches then anneals to almost 0, momentum 0.95 -> 0.85 -> 0.95, so the last '
                            'epoch is a settled one; constant: LR and momentum 0.9 throughout (default one-cycle)')
    model.add_argument('--one-cycle', dest='schedule', action='store_const', const='one-cycle',
                       help='same as --schedule one-cycle (the default)')
    reg = train_parser.add_argument_group('regularization')
    reg.add_argument('--mixup', metavar='ALPHA', type=_positive_number, default=None,
                     help='MixUp with Beta(ALPHA, ALPHA) mixing weights, one per sample (e.g. 0.4)')
    reg.add_argument('--mixup-batch', action='store_true',
                     help='with --mixup: one mixing weight per batch (the original paper) instead of per sample')
    reg.add_argument('--label-smoothing', metavar='EPS', type=_smoothing, default=None,
                     help='label smoothing cross entropy with this epsilon (implies --loss ls; default 0.1 there)')
    reg.add_argument('--loss', choices=LOSSES, default=None,
                     help='ce: cross entropy; ls: label smoothing cross entropy; soft-boot / hard-boot: soft and '
                          'hard bootstrapping losses for noisy labels (default ce)')
    run = train_parser.add_argument_group('run')
    run.add_argument('--device', metavar='DEVICE', default='auto',
                     help="'auto' (CUDA when available, else CPU), 'cpu', 'cuda', 'cuda:1', 'mps' (default auto)")
    run.add_argument('--threads', metavar='N', type=_positive_int, default=1,
                     help='CPU threads for torch (default 1: the default CNN is small, and several threads slow '
                          'down sharply on a shared CPU; raise it for --arch resnet18 on a many-core machine)')
    run.add_argument('--seed', metavar='N', type=_non_negative_int, default=0,
                     help='random seed of the data, the model and the training (default 0)')
    run.add_argument('--out', metavar='DIR', type=Path, default=Path('out'),
                     help='output folder for loss.png, lr.png, model.pth and metrics.json (default out/)')
    run.add_argument('--quiet', action='store_true', help='no progress bars and no epoch table, only the summary')
    run.add_argument('--checkpoint-every', metavar='N', type=_positive_int, default=None,
                     help=f'write --out/{CHECKPOINT} every N training batches and at the end of every epoch; on '
                          f'SIGTERM (or SIGINT without a terminal) finish the batch, write it and exit with 143 '
                          f'(130); continue with --resume DIR')
    run.add_argument('--resume', metavar='DIR', type=Path, default=None,
                     help=f'continue the run interrupted in DIR from DIR/{CHECKPOINT}, with the options saved in '
                          f'DIR/{RUN_OPTIONS}; it ends with the metrics and weights of a run never interrupted. '
                          f'Only {", ".join("--" + o.replace("_", "-") for o in RESUME_MAY_CHANGE)} may be given too')
    train_parser.set_defaults(subparser=train_parser)  # so that unknown options are reported by `minilearn train`
    return parser


# ---- checks that need more than one option, or the file system (no torch needed) --------------------
_DEVICE_NAME = re.compile(r'[a-z][a-z0-9_]*(:[0-9]+)?')  # the form of a torch device name; torch checks the rest


def _check_args(args: argparse.Namespace) -> None:
    if args.checkpoint_every is not None and args.out.exists() and (args.out / CHECKPOINT).is_file() \
            and args.resume is None:
        raise UsageError(f"--out {args.out} holds the checkpoint of an earlier run: continue it with --resume "
                         f"{args.out}, or delete {args.out / CHECKPOINT} (or choose another --out) to start anew")
    if args.mixup_batch and args.mixup is None:
        raise UsageError("--mixup-batch needs --mixup ALPHA (it chooses one mixing weight per batch)")
    if args.label_smoothing is not None and args.loss not in (None, 'ls'):
        raise UsageError(f"--label-smoothing goes with --loss ls, not --loss {args.loss}")
    if args.data is not None:
        if not args.data.exists(): raise UsageError(f"--data {args.data}: no such folder")
        if not args.data.is_dir(): raise UsageError(f"--data {args.data}: not a folder")
        _data_format(args.data)
    if not _DEVICE_NAME.fullmatch(args.device):
        raise UsageError(f"--device {args.device!r}: not a device name (try cpu, cuda, cuda:0, mps or auto)")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder")


def _device(name: str) -> torch.device:
    import torch
    if name == 'auto':
        from .callbacks.device import default_device
        return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r}: not a device name (try cpu, cuda, cuda:0, mps or auto)") from None
    if device.type == 'cuda':
        if not torch.cuda.is_available(): raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == 'mps' and not (hasattr(torch.backends, 'mps') and torch.backends.mps.is_available()):
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    return device


# ---- data ----------------------------------------------------------------------------------------
def _data_format(path: Path) -> str:
    if (path / 'data_batch_1').is_file() or (path / 'cifar-10-batches-py' / 'data_batch_1').is_file():
        return 'cifar10'
    if any(path.glob('*idx3-ubyte*')): return 'mnist'
    if (path / 'train').is_dir() and _valid_folder(path) is not None: return 'image-folder'
    raise UsageError(f"--data {path}: expected an image folder tree (train/<class>/ and val/<class>/, valid/ or "
                     f"test/), CIFAR-10 python batches (data_batch_1, ..., test_batch) or MNIST idx files")


def _valid_folder(path: Path) -> str | None:
    return next((name for name in ('val', 'valid', 'test') if (path / name).is_dir()), None)


def _build_data(args: argparse.Namespace) -> tuple[Any, dict]:
    """The DataBunch (decoded once, batches gathered from memory) and a description of it for metrics.json."""
    cache_kwargs = {'cache': True, 'num_workers': args.workers, 'seed': args.seed,
                    'progress': False if args.quiet else None}
    if args.data is None:
        from .data.core import DataBunch
        from .data.shapes import shapes_datasets
        n_per_class = args.n_per_class or DEFAULT_N_PER_CLASS
        n_classes = 10
        train, valid = shapes_datasets(n_per_class * n_classes, max(10, n_per_class // 4) * n_classes, size=args.size,
                                       n_classes=n_classes, seed=args.seed)
        data = DataBunch.from_tensors(train.x, train.y, valid.x, valid.y, args.bs, c_in=3, c_out=n_classes,
                                      seed=args.seed, vocab=train.vocab)
        return data, {'source': 'shapes', 'path': None}
    kind = _data_format(args.data)
    if kind == 'cifar10':
        from .data.external import cifar10_databunch
        data = cifar10_databunch(args.data, args.bs, n_per_class=args.n_per_class, **cache_kwargs)
    elif kind == 'mnist':
        from .data.external import mnist_databunch
        has_train = any(args.data.glob('train-images*idx3-ubyte*'))
        data = mnist_databunch(args.data, args.bs, n_per_class=args.n_per_class,
                               split_test=None if has_train else 0.2, **cache_kwargs)
    else:
        from .data.items import label_image_folder
        from .data.transforms import ResizeFixed, make_rgb, to_byte_tensor, to_float_tensor
        tfms = [make_rgb, ResizeFixed(args.size), to_byte_tensor, to_float_tensor]
        sd = label_image_folder(args.data, tfms=tfms, train_name='train', valid_name=_valid_folder(args.data),
                                n_per_class=args.n_per_class)
        data = sd.to_databunch(args.bs, c_in=3, **cache_kwargs)
    return data, {'source': kind, 'path': str(args.data)}


def _add_noise(args: argparse.Namespace, data: Any, generator: torch.Generator) -> dict | None:
    if not args.noise: return None
    from .noisy import add_label_noise
    result = add_label_noise(data.train_ds, args.noise, n_classes=data.c_out, generator=generator)
    return {'ratio': args.noise, 'n_redrawn': round(len(result.labels) * args.noise),
            'n_changed': int(result.changed.sum())}


# ---- model, loss, callbacks ---------------------------------------------------------------------------
def _build_model(args: argparse.Namespace, data: Any) -> torch.nn.Module:
    from .models import conv_layer, get_cnn_model, init_cnn, resnet18_cifar
    if args.arch == 'resnet18': return resnet18_cifar(n_classes=data.c_out, c_in=data.c_in)
    model = get_cnn_model(data, CNN_WIDTHS, conv_layer, leak=0.1, sub=0.4, maxv=6.)
    return init_cnn(model)


def _build_loss(args: argparse.Namespace) -> Any:
    loss = args.loss or ('ls' if args.label_smoothing is not None else 'ce')
    if loss == 'ce':
        import torch
        return torch.nn.CrossEntropyLoss()
    from .losses import HardBootstrappingLoss, LabelSmoothingCrossEntropy, SoftBootstrappingLoss
    if loss == 'ls': return LabelSmoothingCrossEntropy(0.1 if args.label_smoothing is None else args.label_smoothing)
    return SoftBootstrappingLoss() if loss == 'soft-boot' else HardBootstrappingLoss()


def _build_callbacks(args: argparse.Namespace, data: Any, device: torch.device) -> list:
    from .callbacks.device import ChannelsLast, DeviceCallback
    from .callbacks.metrics import AvgStatsCallback, accuracy
    from .callbacks.progress import ProgressCallback
    from .callbacks.recorder import Recorder
    from .callbacks.transforms import BatchTransformXCallback, Normalize, channel_stats
    mean, std = channel_stats(data.train_dl.ordered())  # the whole training set, in memory
    cbs = [DeviceCallback(device), ChannelsLast(), BatchTransformXCallback(Normalize(mean, std.clamp_min(1e-3))),
           AvgStatsCallback([accuracy]), Recorder()]
    if not args.quiet: cbs.append(ProgressCallback())
    if args.mixup is not None:
        from .callbacks.mixup import MixUp
        cbs.append(MixUp(args.mixup, per_sample=not args.mixup_batch))
    if args.checkpoint_every is not None:
        from .callbacks.checkpoint import CheckpointCallback
        cbs.append(CheckpointCallback(args.out / CHECKPOINT, every_n_batches=args.checkpoint_every))
    return cbs


# ---- outputs -------------------------------------------------------------------------------------
def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: those become null."""
    if isinstance(value, float) and not math.isfinite(value): return None
    if isinstance(value, dict): return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)): return [_finite(v) for v in value]
    return value


def _versions() -> dict:
    import numpy
    import torch
    return {'minilearn': __version__, 'torch': torch.__version__, 'numpy': numpy.__version__,
            'python': platform.python_version(), 'platform': platform.platform()}


def write_status(out: Path, status: str, report: dict, error: BaseException | None = None) -> dict:
    """Write `report` with its `status` (one of STATUSES) as `out/metrics.json`, atomically; returns the report."""
    if status not in STATUSES: raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    from .serialization import atomic_write
    report['status'] = status
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    report.setdefault('started', now)
    if status == 'running': report.pop('finished', None)
    else: report['finished'] = now
    if error is not None: report['error'] = _one_line(error)
    text = json.dumps(_finite({'status': status, **report}), indent=2) + '\n'
    atomic_write(out / METRICS_FILE, lambda f: f.write(text.encode()))
    return report


def _stopped_status(exc: BaseException) -> str:
    return 'interrupted' if isinstance(exc, KeyboardInterrupt) else 'failed'


def _write_outputs(learn: Any, out: Path, report: dict) -> None:
    """Plots and the checkpoint; each file is named in `report['files']` once it is written."""
    import matplotlib
    if 'matplotlib.pyplot' not in sys.modules: matplotlib.use('Agg')  # files only: no window needed
    import matplotlib.pyplot as plt

    from .callbacks.recorder import Recorder
    from .checks import is_class_index_loss
    from .inference import ClassificationInterpretation
    recorder = learn.find_cb(Recorder)
    plots = {'loss_plot': ('loss.png', recorder.plot_loss), 'lr_plot': ('lr.png', recorder.plot_lr)}
    if is_class_index_loss(learn.loss_func) and learn.data.valid_dl is not None:
        interp = ClassificationInterpretation.from_learner(learn)
        report['confusion_matrix'] = interp.confusion_matrix().tolist()  # rows: actual class, columns: predicted
        plots['confusion_plot'] = ('confusion.png', interp.plot_confusion_matrix)
    for key, (name, plot) in plots.items():
        fig = plot()
        fig.savefig(out / name, dpi=100, bbox_inches='tight')
        plt.close(fig)
        report['files'][key] = name
    learn.save(out / 'model.pth')
    report['files']['checkpoint'] = 'model.pth'


def _args_record(args: argparse.Namespace) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in ('command', 'subparser')}


# ---- resume ----------------------------------------------------------------------------------------
_PATH_OPTIONS = ('data', 'out')


def _write_run_options(args: argparse.Namespace) -> None:
    from .serialization import atomic_write
    text = json.dumps({k: v for k, v in _args_record(args).items() if k != 'resume'}, indent=2) + '\n'
    atomic_write(args.out / RUN_OPTIONS, lambda f: f.write(text.encode()))


def resumed_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The options of the run interrupted in `args.resume`, with the few that may change taken from `args`."""
    folder = args.resume
    if not (folder / CHECKPOINT).is_file():
        raise UsageError(f"--resume {folder}: no {CHECKPOINT} there (it is written by a run with --checkpoint-every N)")
    try:
        saved = json.loads((folder / RUN_OPTIONS).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--resume {folder}: cannot read {RUN_OPTIONS}, the run's options ({_one_line(e)})") from None
    changed = [k for k, v in vars(args).items() if k in saved and k not in RESUME_MAY_CHANGE + ('out',)
               and v != parser.get_default(k) and _args_record(argparse.Namespace(**{k: v}))[k] != saved[k]]
    if changed:
        names = ', '.join('--' + k.replace('_', '-') for k in changed)
        raise UsageError(f"--resume {folder} continues that run with its own options; {names} differ(s) from "
                         f"them: leave {names} out, or start a new run with another --out")
    from .serialization import CheckpointError, safe_load
    try:
        done = safe_load(folder / CHECKPOINT).get('epoch', 0)
    except CheckpointError as e:
        raise UsageError(f"--resume {folder}: {e}") from None
    if done >= saved.get('epochs', 0):
        raise UsageError(f"--resume {folder}: that run is complete ({done} epochs); its outputs are in {folder}")
    merged = {k: (Path(v) if k in _PATH_OPTIONS and v is not None else v) for k, v in saved.items()}
    merged.update({k: getattr(args, k) for k in RESUME_MAY_CHANGE if getattr(args, k) != parser.get_default(k)})
    merged.update(out=folder, resume=folder)
    return argparse.Namespace(**{**vars(args), **merged})


# ---- the job -----------------------------------------------------------------------------------
def build_learner(args: argparse.Namespace) -> tuple[Any, dict]:
    """The Learner for parsed `train` arguments, and the start of the run's report (for metrics.json)."""
    import torch

    from .core import do_nothing
    from .learner import Learner
    _check_args(args)
    device = _device(args.device)
    start = time.time()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    data, data_info = _build_data(args)
    noise = _add_noise(args, data, generator)
    model = _build_model(args, data)
    opt_func = partial(torch.optim.SGD, momentum=0.9, weight_decay=5e-4)
    learn = Learner(model, data, _build_loss(args), opt_func=opt_func, lr=args.lr,
                    cbs=_build_callbacks(args, data, device))
    if args.quiet: learn.logger = do_nothing
    args.out.mkdir(parents=True, exist_ok=True)
    if args.checkpoint_every is not None and args.resume is None: _write_run_options(args)
    data_info.update(n_train=len(data.train_ds), n_valid=len(data.valid_ds) if data.valid_dl is not None else 0,
                     n_classes=data.c_out, vocab=[str(v) for v in data.vocab] if data.vocab else None)
    return learn, _start_report(args, data_info, noise, device, model, time.time() - start)


def _start_report(args: argparse.Namespace, data_info: dict, noise: dict | None, device: torch.device,
                  model: torch.nn.Module, setup_time: float) -> dict:
    return {'args': _args_record(args), 'data': data_info, 'noise': noise, 'device': str(device),
            'model': {'arch': args.arch, 'n_params': sum(p.numel() for p in model.parameters())},
            'time_s': {'setup': setup_time}, 'versions': _versions()}


def train(args: argparse.Namespace) -> dict:
    """Run `minilearn train` with parsed arguments; returns the report written to metrics.json."""
    with _cpu_threads(args.threads):
        return _fit_and_write(args, *build_learner(args))


@contextmanager
def _cpu_threads(n_threads: int) -> Iterator[None]:
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _fit_and_write(args: argparse.Namespace, learn: Any, report: dict) -> dict:
    from .callbacks.metrics import AvgStatsCallback
    from .callbacks.recorder import Recorder
    report.update(epochs=args.epochs, history=[], files={'metrics': METRICS_FILE})
    write_status(args.out, 'running', report)  # from now on the folder says whose files it holds
    start = time.time()
    resume = None if args.resume is None else args.out / CHECKPOINT
    try:
        if args.schedule == 'one-cycle': learn.fit_one_cycle(args.epochs, resume=resume)
        else: learn.fit(args.epochs, resume=resume)
        if resume is not None: report['resumed_from'] = {'epoch': learn.start_epoch, 'batch': learn.start_iter}
        report['time_s']['fit'] = time.time() - start
        history = learn.find_cb(AvgStatsCallback).history
        final = {k: v for k, v in history[-1].items() if k not in ('epoch', 'time')}
        lrs = learn.find_cb(Recorder).lrs[-1]
        report.update(final=final, accuracy=final.get('valid_accuracy'), chance_accuracy=1 / learn.data.c_out,
                      history=history, lr={'first': lrs[0], 'max': max(lrs), 'last': lrs[-1]})
        _write_outputs(learn, args.out, report)
    except BaseException as e:  # the epochs that finished, and why the run stopped
        report['time_s'].setdefault('fit', time.time() - start)
        report['history'] = list(learn.find_cb(AvgStatsCallback).history)
        status = _stopped_status(e)
        write_status(args.out, status, report, error=e if status == 'failed' else None)
        raise
    if args.checkpoint_every is not None:  # the run is complete: nothing left to resume
        for name in (CHECKPOINT, RUN_OPTIONS): (args.out / name).unlink(missing_ok=True)
    report['files']['metrics'] = report['files'].pop('metrics')  # listed last, as it is written last
    return write_status(args.out, 'complete', report)


def _summary(report: dict, out: Path) -> str:
    accuracy, fit_time = report['accuracy'], report['time_s']['fit']
    shown = 'n/a' if accuracy is None or not math.isfinite(accuracy) else f'{accuracy:.1%}'
    return (f"minilearn train: valid accuracy {shown} (chance {report['chance_accuracy']:.1%}) after "
            f"{report['epochs']} epochs; training took {fit_time:.1f} s on {report['device']}\n"
            f"outputs in {out}/: " + ', '.join(report['files'].values()))


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `minilearn` command; returns the exit status (2 for usage errors)."""
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
        if unknown: args.subparser.error(f"unrecognized arguments: {' '.join(unknown)}")
    except SystemExit as e:  # --help/--version (0) or a bad option (2), already reported by argparse
        return e.code if isinstance(e.code, int) else 2
    prog = f'{parser.prog} {args.command}'
    try:
        _check_args(args)  # before torch is imported: a mistake on the command line is answered at once
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    with _cpu_threads(args.threads):
        return _train_command(args, prog)


def _train_command(args: argparse.Namespace, prog: str) -> int:
    try:
        try:
            if args.resume is not None: args = resumed_args(args, args.subparser)
            learn_and_report = build_learner(args)
        except (ValueError, TypeError, OSError, KeyError) as e:  # setup problems are the user's to fix: one line
            print(f"{prog}: error: {_one_line(e)}", file=sys.stderr)
            return 2
        report = _fit_and_write(args, *learn_and_report)
    except KeyboardInterrupt as e:
        from .callbacks.checkpoint import TrainingInterrupted
        if not isinstance(e, TrainingInterrupted):
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        saved = (f"checkpoint in {e.checkpoint}; continue with: minilearn train --resume {args.out}"
                 if e.checkpoint is not None else "no checkpoint was written")
        print(f"{prog}: stopped by {signal.Signals(e.signum).name}; {saved}", file=sys.stderr)
        return e.exit_code
    print(_summary(report, args.out), flush=True)
    return 0


def _one_line(exc: BaseException) -> str:
    text = ' '.join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, UsageError) else f'{text} ({type(exc).__name__})'


if __name__ == '__main__':
    sys.exit(main())
