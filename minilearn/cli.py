"""Command-line interface: `minilearn train` trains a CNN and writes plots, a checkpoint and `metrics.json`;
`minilearn tune` searches its hyper-parameters with Optuna.

This module declares the options and checks them; the jobs themselves are train_job.py and tune_job.py,
reached through jobs.py. torch is imported only once the command line has been parsed and checked, so that
`--help`, `--version` and a mistake on the command line are answered at once (importing torch and torchvision
takes seconds): this module imports the standard library and train_spec.py (what it shares with the jobs,
torch-free), and reaches jobs.py by one import inside `main` (tests/test_import_graph.py, tests/test_cli.py
check both). A new option is declared and checked here and used in train_job.py.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from . import __version__
from .train_spec import (ARCHS, CHECKPOINT, CHECKPOINTS_KEPT, CNN_WIDTHS, DEFAULT_N_PER_CLASS, DEFAULT_WD, NOISE_KINDS,
                         RUN_OPTIONS, UsageError, data_format, one_line, options_record)

__all__ = ['main', 'build_parser', 'checked_args', 'UsageError']

# The default run (shapes, 10,000 training and 2,500 validation images, 8 epochs of one-cycle up to lr 0.1)
# needs about 25 s of one CPU core and reaches 86-90 % validation accuracy over seeds 0-2 (README; a constant
# lr 0.02 gives 74-79 %, its last epoch at the mercy of noise): well above chance (10 %), not solved.
DEFAULT_EPOCHS = 8
DEFAULT_LR = 0.1
DEFAULT_BS = 64
DEFAULT_TRIALS = 20
SEARCHED = ('lr', 'wd', 'mixup', 'label_smoothing')  # what `minilearn tune` chooses per trial
LOSSES = ('ce', 'ls', 'soft-boot', 'hard-boot')
# options that do not change what is computed
RESUME_MAY_CHANGE = ('device', 'threads', 'workers', 'quiet', 'resume_if_exists')
_ARCH_NAME = re.compile(r'(timm/[\w.\-]+|(torchvision/)?[a-z][a-z0-9_]*)')
SCHEDULES = ('one-cycle', 'constant')


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


def _arch(text: str) -> str:
    if not _ARCH_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"{text!r}: expected cnn, resnet18, a torchvision model name or timm/NAME")
    return text


def _ratio(text: str) -> float:
    value = _number(text)
    if not 0 <= value <= 1: raise argparse.ArgumentTypeError(f"expected a ratio in [0, 1], got {text!r}")
    return value


def _non_negative_number(text: str) -> float:
    value = _number(text)
    if value < 0: raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _smoothing(text: str) -> float:
    value = _number(text)
    if not 0 <= value < 1: raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The `minilearn` argument parser, with its `train` and `tune` sub-commands."""
    parser = _Parser(prog='minilearn', description='minilearn: a small fastai-style training framework for PyTorch.')
    parser.add_argument('--version', action='version', version=f'minilearn {__version__}')
    commands = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
    train_parser = commands.add_parser(
        'train', help='train a CNN and write plots, a checkpoint and metrics.json',
        description='Train a CNN with the minilearn Learner: progress bars and a per-epoch table, then a '
                    'summary; writes loss.png, lr.png, model.pth and metrics.json into --out. Without --data it '
                    'trains on a generated shapes dataset (no download).')
    run = _add_train_options(train_parser)
    run.add_argument('--checkpoint-every', metavar='N', type=_positive_int, default=None,
                     help=f'write --out/{CHECKPOINT} every N training batches and at the end of every epoch; on '
                          f'SIGTERM (or SIGINT without a terminal) finish the batch, write it and exit with 143 '
                          f'(130); continue with --resume DIR')
    run.add_argument('--resume', metavar='DIR', type=Path, default=None,
                     help=f'continue the run interrupted in DIR from DIR/{CHECKPOINT}, with the options saved in '
                          f'DIR/{RUN_OPTIONS}; it ends with the metrics and weights of a run never interrupted '
                          f'(and, with --mlflow, in the same MLflow run). '
                          f'Only {", ".join("--" + o.replace("_", "-") for o in RESUME_MAY_CHANGE)} may be given too')
    run.add_argument('--resume-if-exists', action='store_true',
                     help=f'with --checkpoint-every N: continue the run in --out from its checkpoint when there is '
                          f'one (as --resume OUT does), else start it; the same command serves the first start and '
                          f'every restart (torchrun --max-restarts, a cluster\'s requeue). The last '
                          f'{CHECKPOINTS_KEPT} checkpoints are kept; a corrupt newest one gives way to the one before')
    train_parser.set_defaults(subparser=train_parser)  # so that unknown options are reported by `minilearn train`
    tune_parser = commands.add_parser(
        'tune', help='search the learning rate, weight decay, MixUp and label smoothing of `train` with Optuna',
        description='An Optuna study over `minilearn train`: each trial draws the learning rate and weight decay '
                    '(log-uniform), MixUp alpha or none and label smoothing epsilon or none, trains into '
                    '--out/trial_<n> and reports the validation accuracy after every epoch; a median pruner stops '
                    'trials worse than the median of the earlier ones at that epoch. Prints the best trial and the '
                    '`minilearn train` command that reproduces it. Running it again with the same --storage and '
                    '--study continues the study. The other options are those of `train`, fixed for every trial.')
    search = tune_parser.add_argument_group('search')
    search.add_argument('--trials', metavar='N', type=_positive_int, default=DEFAULT_TRIALS,
                        help=f'trials to run in this invocation (default {DEFAULT_TRIALS})')
    search.add_argument('--timeout', metavar='S', type=_positive_number, default=None,
                        help='stop starting new trials after S seconds (default: no limit)')
    search.add_argument('--storage', metavar='URL', default=None,
                        help="where the study is kept: an Optuna storage URL such as sqlite:///study.db, or "
                             "'memory' (lost at exit); default sqlite:///OUT/optuna.db, beside the trials")
    search.add_argument('--study', metavar='NAME', default='minilearn',
                        help='the study name in --storage: an existing one is continued (default minilearn)')
    _add_train_options(tune_parser)
    # None: not given (a value equal to train's default is given too, and refused: tune chooses it)
    tune_parser.set_defaults(subparser=tune_parser, lr=None, wd=None)
    return parser


def _add_train_options(command: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """The options `train` and `tune` share (the data, the model, the training, the run); returns the run group."""
    train_parser = command
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
                      help='label noise: this fraction of the training labels made wrong, as --noise-kind says '
                           '(validation labels stay clean; default 0)')
    data.add_argument('--noise-kind', choices=NOISE_KINDS, default='symmetric',
                      help='symmetric: redrawn uniformly at random; pair: y -> y+1 (mod classes); asymmetric: the '
                           "data's class confusions (MNIST 7->1, 2->7, 5<->6, 3->8; CIFAR-10 truck->automobile, "
                           'bird->airplane, deer->horse, cat<->dog), MNIST and CIFAR-10 --data only (default symmetric)')
    data.add_argument('--workers', metavar='N', type=_non_negative_int, default=0,
                      help='processes that decode --data images, once before training (default 0: in the main process)')
    model = train_parser.add_argument_group('model and training')
    model.add_argument('--arch', metavar='ARCH', type=_arch, default='cnn',
                       help=f'cnn: a small course CNN (get_cnn_model, conv widths {list(CNN_WIDTHS)}, 62 k '
                            f'parameters); resnet18: ResNet-18 for 32x32 inputs (slow on a CPU); a torchvision '
                            f'model name (resnet34, mobilenet_v3_small, torchvision/resnet18, ...) or timm/NAME '
                            f"(pip install 'minilearn[timm]'): vision_learner's body and head (default cnn)")
    model.add_argument('--pretrained', metavar='PATH', nargs='?', const=True, default=False, type=Path,
                       help="start a torchvision or timm --arch from its pretrained weights (downloaded or cached), "
                            "or from a state dict file PATH; the whole network trains unless --fine-tune")
    model.add_argument('--fine-tune', metavar='FREEZE_EPOCHS', type=_non_negative_int, default=None,
                       help="fastai's fine_tune: FREEZE_EPOCHS one-cycle epochs of the head alone, then --epochs of "
                            "the whole network with discriminative learning rates (base lr: --lr)")
    model.add_argument('--epochs', metavar='N', type=_positive_int, default=DEFAULT_EPOCHS,
                       help=f'number of epochs (default {DEFAULT_EPOCHS})')
    model.add_argument('--bs', metavar='N', type=_positive_int, default=DEFAULT_BS,
                       help=f'batch size (default {DEFAULT_BS}; validation uses twice as much)')
    model.add_argument('--lr', metavar='LR', type=_positive_number, default=DEFAULT_LR,
                       help=f'learning rate of SGD: the peak of the one-cycle schedule, or the constant one '
                            f'(default {DEFAULT_LR})')
    model.add_argument('--wd', metavar='WD', type=_non_negative_number, default=DEFAULT_WD,
                       help=f'weight decay of SGD (default {DEFAULT_WD})')
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
    run.add_argument('--mlflow', metavar='URI', nargs='?', const='', default=None,
                     help="log the run to MLflow (parameters, metrics per epoch and per step, status, plots and "
                          "metrics.json), in the tracking store URI (e.g. sqlite:///mlflow.db); without URI, "
                          "MLflow's default store (MLFLOW_TRACKING_URI, else its own default)")
    return run


# ---- checks that need more than one option, or the file system (no torch needed) --------------------
_DEVICE_NAME = re.compile(r'[a-z][a-z0-9_]*(:[0-9]+)?')  # the form of a torch device name; the job checks the rest
_PATH_OPTIONS = ('data', 'out')


def checked_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed `train` (or `tune`) options, checked; with `--resume DIR`, the options saved in DIR/run.json (the
    few that may change taken from `args`) and `resume` = `out` = DIR (so too with `--resume-if-exists` when --out
    holds a checkpoint). Raises UsageError."""
    if args.command == 'tune': return _checked_tune(args, parser)
    if args.resume_if_exists:
        if args.checkpoint_every is None:
            raise UsageError("--resume-if-exists needs --checkpoint-every N (the checkpoints it continues from)")
        if args.resume is not None:
            raise UsageError(f"--resume-if-exists continues the run in --out ({args.out}); leave --resume out")
        if (args.out / CHECKPOINT).is_file(): args.resume = args.out
    if args.resume is not None: args = _resumed(args, parser)
    if args.checkpoint_every is not None and args.resume is None and (args.out / CHECKPOINT).is_file():
        raise UsageError(f"--out {args.out} holds the checkpoint of an earlier run: continue it with --resume "
                         f"{args.out}, or delete {args.out / CHECKPOINT} (or choose another --out) to start anew")
    return _checked_train_options(args)


def _checked_tune(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """`tune`'s options: those of `train` (less what it searches), a storage URL, and the command line of `train`
    that a trial's choices complete (`train_command`)."""
    given = [name for name in SEARCHED if getattr(args, name) is not None]
    if given:
        names = ', '.join('--' + n.replace('_', '-') for n in given)
        raise UsageError(f"tune chooses {names} for each trial: leave {names} out (the other train options are "
                         f"fixed for every trial)")
    if args.storage is not None and args.storage != 'memory' and '://' not in args.storage:
        raise UsageError(f"--storage {args.storage!r}: expected an Optuna storage URL such as sqlite:///study.db, "
                         f"or 'memory'")
    if args.storage is None: args.storage = f'sqlite:///{(args.out / "optuna.db").resolve()}'
    if not args.study.strip(): raise UsageError("--study: the study needs a name")
    args.checkpoint_every = args.resume = None  # the trials are train runs without checkpoints
    args.train_command = _train_command(args, parser)
    return _checked_train_options(args, searched=True)


def _train_command(args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[str]:
    """The `minilearn train` options given to `tune` (the search's own and --out left out), as a command line."""
    words = ['minilearn', 'train']
    for action in parser._actions:
        name = action.dest
        if not action.option_strings or name in SEARCHED + ('out', 'trials', 'timeout', 'storage', 'study', 'help'):
            continue
        value = getattr(args, name, None)
        if value == parser.get_default(name): continue
        flag = max(action.option_strings, key=len)
        if action.nargs == 0: words.append(flag)
        elif action.nargs == '?' and value == action.const: words.append(flag)
        else: words += [flag, str(value)]
    return words


def _checked_train_options(args: argparse.Namespace, searched: bool = False) -> argparse.Namespace:
    if args.mixup_batch and args.mixup is None and not searched:
        raise UsageError("--mixup-batch needs --mixup ALPHA (it chooses one mixing weight per batch)")
    if args.label_smoothing is not None and args.loss not in (None, 'ls'):
        raise UsageError(f"--label-smoothing goes with --loss ls, not --loss {args.loss}")
    if args.data is not None:
        if not args.data.exists(): raise UsageError(f"--data {args.data}: no such folder")
        if not args.data.is_dir(): raise UsageError(f"--data {args.data}: not a folder")
        data_format(args.data)
    pretrained_kind = args.arch not in ARCHS
    if args.pretrained is not False and not pretrained_kind:
        raise UsageError(f"--pretrained needs a torchvision or timm/ --arch (--arch {args.arch} has no pretrained "
                         f"weights)")
    if args.fine_tune is not None and not pretrained_kind:
        raise UsageError(f"--fine-tune needs a torchvision or timm/ --arch, whose body and head it trains apart "
                         f"(--arch {args.arch} has no such split)")
    if args.fine_tune is not None and args.schedule != 'one-cycle':
        raise UsageError("--fine-tune is fastai's one-cycle recipe: drop --schedule constant")
    if isinstance(args.pretrained, Path) and not args.pretrained.is_file():
        raise UsageError(f"--pretrained {args.pretrained}: no such file (a state dict saved with torch.save)")
    if args.noise_kind != 'symmetric' and not args.noise:
        raise UsageError(f"--noise-kind {args.noise_kind} needs --noise RATIO (the fraction of labels to make wrong)")
    if args.noise_kind == 'asymmetric' and (args.data is None or data_format(args.data) not in ('mnist', 'cifar10')):
        raise UsageError("--noise-kind asymmetric flips each class to the one it is confused with, known for MNIST "
                         "and CIFAR-10 --data folders only; use --noise-kind symmetric or pair here")
    if not _DEVICE_NAME.fullmatch(args.device):
        raise UsageError(f"--device {args.device!r}: not a device name (try cpu, cuda, cuda:0, mps or auto)")
    if args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    _check_writable(args.out)  # last: the other checks leave no folder behind
    return args


def _check_writable(out: Path) -> None:
    """Create `out` and write a file in it, so a folder the run cannot write is named now, not after the data is
    decoded; then remove what the check made (a later setup error leaves nothing behind; the job creates it)."""
    created = [p for p in [out, *out.parents] if not p.exists()]
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix='.minilearn-write-check-'): pass
    except OSError as e:
        raise UsageError(f"--out {out}: cannot write there ({e.strerror or type(e).__name__}); choose a folder "
                         f"you can write to") from None
    finally:
        for folder in created:  # deepest first
            if folder.is_dir(): folder.rmdir()


def _resumed(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The options of the run interrupted in `args.resume` (read from its run.json, once), with the few that may
    change taken from `args`. Its checkpoint is the job's to read."""
    folder = args.resume
    if not folder.exists(): raise UsageError(f"--resume {folder}: no such folder")
    if not folder.is_dir(): raise UsageError(f"--resume {folder}: not a folder")
    if not (folder / CHECKPOINT).is_file():
        raise UsageError(f"--resume {folder}: no {CHECKPOINT} there (it is written by a run with --checkpoint-every N)")
    try:
        saved = json.loads((folder / RUN_OPTIONS).read_text())
    except (OSError, ValueError) as e:
        raise UsageError(f"--resume {folder}: cannot read {RUN_OPTIONS}, the run's options ({one_line(e)})") from None
    given = options_record(args)
    changed = [k for k, v in vars(args).items() if k in saved and k not in RESUME_MAY_CHANGE + ('out',)
               and v != parser.get_default(k) and given[k] != saved[k]]
    if changed:
        names = ', '.join('--' + k.replace('_', '-') for k in changed)
        raise UsageError(f"--resume {folder} continues that run with its own options; {names} differ(s) from "
                         f"them: leave {names} out, or start a new run with another --out")
    merged = {k: (Path(v) if k in _PATH_OPTIONS and v is not None else v) for k, v in saved.items()}
    merged.update({k: getattr(args, k) for k in RESUME_MAY_CHANGE if getattr(args, k) != parser.get_default(k)})
    merged.update(out=folder, resume=folder)
    return argparse.Namespace(**{**vars(args), **merged})


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
        args = checked_args(args, args.subparser)  # before torch is imported: a mistake is answered at once
    except UsageError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    from .jobs import run_job  # the job, and with it torch: only now that the command line is right
    return run_job(args, prog)


if __name__ == '__main__':
    sys.exit(main())
