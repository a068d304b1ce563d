"""The label-noise study on real data: clean test accuracy of regularizers trained on noisy labels.

Reproduces the structure of the well-known lab: CIFAR-10, 2000 training images per class, 50 %
symmetric label noise, ResNet-18, SGD (lr 0.1, momentum 0.9, weight decay 5e-4), batch size 128,
20 epochs; the lab reports clean test accuracy CE 76.51 %, soft bootstrapping 74.54 %, hard
bootstrapping 76.03 %, mixup 77.35 %. The defaults are that scale, meant for a GPU:

    python bench/noisy_labels.py --out bench/noisy_labels_results.md

CPU scale: the course CNN (0.39 M parameters), 1000 images per class, 10 epochs. One 10k-image
epoch costs about 10 s of one core, so 6 methods x 3 seeds take about 30 minutes with
`--num-threads 1`, and roughly 20 minutes with 2 threads on 2 otherwise idle cores (on cores
busy with other jobs, 2 threads run several times slower than 1: use `--num-threads 1` there):

    python bench/noisy_labels.py --arch cnn --n-per-class 1000 --epochs 10 --num-threads 2 \\
        --out bench/noisy_labels_results.md

Smoke test (a minute): `--n-per-class 50 --test-n-per-class 50 --epochs 1 --seeds 1 --methods ce,mixup --arch cnn`.

What it does. The images are read ONCE through minilearn's item-list pipeline (`cifar10_data`: the
ImageList path a user's image folder takes; CIFAR-10 python batches work too) and decoded into
tensors; every run then trains from memory. For each seed, `inject_label_noise` (generator seeded
by the seed) redraws `--noise` of the training labels uniformly at random (the lab convention: a
redrawn label may equal the true one), and every method of that seed trains on the same noisy
labels, with the same initial weights and batch order. Training batches get the lab's CIFAR
augmentation (random crop with 4 pixels of zero padding, horizontal flip) unless `--no-augment`;
the learning rate follows `--sched` (cosine annealing to 0 by default, as in the common CIFAR
training recipe with these hyper-parameters). The score is the accuracy on the clean test set
after the last epoch. One progress line per run; at the end a markdown table of mean ± std over
seeds per method (with the lab's figures where it has one), the exact command and the versions,
also written to `--out`.

Methods (`--methods`, comma-separated):
  ce           cross entropy
  ls           LabelSmoothingCrossEntropy(eps=--ls-eps)
  soft-boot    SoftBootstrappingLoss(beta=--soft-beta)
  hard-boot    HardBootstrappingLoss(beta=--hard-beta)
  mixup-batch  cross entropy + MixUp(--alpha, per_sample=False): one λ per batch (the lab's mixup_data)
  mixup        cross entropy + MixUp(--alpha): one λ per sample, max(λ, 1−λ)
  mixup-ls     LabelSmoothingCrossEntropy + per-sample MixUp
  ce-clean     cross entropy on the clean labels (the no-noise reference)
"""
from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import minilearn  # noqa: E402
from minilearn.callbacks.device import DeviceCallback, default_device  # noqa: E402
from minilearn.callbacks.metrics import accuracy  # noqa: E402
from minilearn.callbacks.mixup import MixUp  # noqa: E402
from minilearn.callbacks.schedule import ParamScheduler, combine_scheds, sched_cos, sched_lin  # noqa: E402
from minilearn.callbacks.transforms import BatchTransformXCallback, Normalize  # noqa: E402
from minilearn.data.core import DataBunch, Dataset  # noqa: E402
from minilearn.data.external import URLs, DownloadError, cifar10_data, untar_data  # noqa: E402
from minilearn.learner import Callback, Learner  # noqa: E402
from minilearn.losses import HardBootstrappingLoss, LabelSmoothingCrossEntropy, SoftBootstrappingLoss  # noqa: E402
from minilearn.models import get_cnn_model, init_cnn, resnet18_cifar  # noqa: E402
from minilearn.noisy import inject_label_noise  # noqa: E402

DEFAULT_DATA = REPO.parent / 'shared' / 'data' / 'cifar10'
DEFAULT_METHODS = 'ce,ls,soft-boot,hard-boot,mixup-batch,mixup'
# The lab's clean test accuracy (%), ResNet-18, full scale; its mixup is the one-λ-per-batch variant.
LAB_REFERENCE = {'ce': 76.51, 'soft-boot': 74.54, 'hard-boot': 76.03, 'mixup-batch': 77.35}
CNN_WIDTHS = (32, 64, 128, 256)  # the course CNN at --width 1: 0.39 M parameters


# ---- methods ------------------------------------------------------------------------------------
def method_table(args: argparse.Namespace) -> dict[str, tuple[str, Callable[[], Callable], Callable[[], list]]]:
    """name -> (description, loss factory, callbacks factory)."""
    ce = nn.CrossEntropyLoss
    ls = partial(LabelSmoothingCrossEntropy, eps=args.ls_eps)
    return {
        'ce': ('cross entropy', ce, list),
        'ls': (f'label smoothing (eps={args.ls_eps})', ls, list),
        'soft-boot': (f'soft bootstrapping (beta={args.soft_beta})', partial(SoftBootstrappingLoss, beta=args.soft_beta),
                      list),
        'hard-boot': (f'hard bootstrapping (beta={args.hard_beta})', partial(HardBootstrappingLoss, beta=args.hard_beta),
                      list),
        'mixup-batch': (f'MixUp per batch (alpha={args.alpha})', ce, lambda: [MixUp(args.alpha, per_sample=False)]),
        'mixup': (f'MixUp per sample (alpha={args.alpha})', ce, lambda: [MixUp(args.alpha)]),
        'mixup-ls': ('MixUp per sample + label smoothing', ls, lambda: [MixUp(args.alpha)]),
        'ce-clean': ('cross entropy, clean labels (reference)', ce, list),
    }


# ---- data ---------------------------------------------------------------------------------------
def resolve_data(path: str | None) -> Path:
    """The CIFAR-10 folder: `--data`, else the shared copy next to the repo, else a download."""
    if path is not None:
        if not Path(path).exists(): raise SystemExit(f"error: --data {path!r} does not exist")
        return Path(path)
    if DEFAULT_DATA.is_dir(): return DEFAULT_DATA
    print(f'{DEFAULT_DATA} not found: downloading CIFAR-10 ({URLs.CIFAR})', flush=True)
    try:
        return untar_data(URLs.CIFAR)
    except DownloadError as e:
        raise SystemExit(f'error: {e}') from None


def decode(labelled, num_workers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Every (image, label) of labelled data as two tensors, in order, read once through its item transforms."""
    dl = DataLoader(labelled, batch_size=500, shuffle=False, num_workers=num_workers)
    xs, ys = zip(*dl)
    return torch.cat(xs), torch.cat(ys)


def load(args: argparse.Namespace):
    path = resolve_data(args.data)
    start = time.perf_counter()
    try:
        sd = cifar10_data(path, n_per_class=args.n_per_class, valid_n_per_class=args.test_n_per_class)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f'error: {e}') from None
    (train_x, train_y), (test_x, test_y) = decode(sd.train, args.num_workers), decode(sd.valid, args.num_workers)
    vocab = list(sd.train.proc_y.vocab)
    print(f'read {len(train_x)} training and {len(test_x)} test images of {len(vocab)} classes from {path} '
          f'in {time.perf_counter() - start:.1f} s', flush=True)
    return path, train_x, train_y, test_x, test_y, vocab


# ---- training -----------------------------------------------------------------------------------
class RandomCropFlip(Callback):
    """Training batches only: random crop after zero padding of `pad` pixels, and random horizontal flip."""
    _order = 1  # after the device move, before normalization (the padding is black, as torchvision's)

    def __init__(self, pad: int = 4):
        self.pad = pad

    def begin_batch(self) -> None:
        if not self.in_train: return
        xb = self.xb
        n, c, h, w = xb.shape
        padded = F.pad(xb, (self.pad,) * 4)
        top = torch.randint(0, 2 * self.pad + 1, (n, 1), device=xb.device)
        left = torch.randint(0, 2 * self.pad + 1, (n, 1), device=xb.device)
        rows = top + torch.arange(h, device=xb.device)
        cols = left + torch.arange(w, device=xb.device)
        flip = torch.rand(n, 1, device=xb.device) < 0.5
        cols = torch.where(flip, cols.flip(1), cols)
        batch = torch.arange(n, device=xb.device)[:, None, None, None]
        channel = torch.arange(c, device=xb.device)[None, :, None, None]
        self.run.xb = padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def make_model(args: argparse.Namespace, data: DataBunch) -> nn.Module:
    if args.arch == 'resnet18':
        return resnet18_cifar(data.c_out, data.c_in, width=max(1, round(64 * args.width)))
    return init_cnn(get_cnn_model(data, [max(1, round(c * args.width)) for c in CNN_WIDTHS]))


def lr_schedule(args: argparse.Namespace) -> list[Callback]:
    if args.sched == 'const': return []
    if args.sched == 'cos': return [ParamScheduler('lr', sched_cos(args.lr, 0.))]
    warmup = 0.3  # one-cycle: linear warm-up from lr/25, cosine down to 0
    return [ParamScheduler('lr', combine_scheds([warmup, 1 - warmup], [sched_lin(args.lr / 25, args.lr),
                                                                       sched_cos(args.lr, 0.)]))]


def train_one(args: argparse.Namespace, method: str, seed: int, data: DataBunch, test_dl: DataLoader,
              norm: Normalize, methods: dict) -> float:
    """Train one method from a seeded initialisation (no validation during training); the clean test accuracy in %."""
    _, make_loss, make_cbs = methods[method]
    torch.manual_seed(seed)  # initial weights, batch order, augmentation and MixUp draws
    model = make_model(args, data)
    cbs = [DeviceCallback(args.device), BatchTransformXCallback(norm)] + make_cbs() + lr_schedule(args)
    if args.augment: cbs.append(RandomCropFlip())
    opt_func = partial(torch.optim.SGD, momentum=args.momentum, weight_decay=args.wd)
    learn = Learner(model, data, make_loss(), opt_func=opt_func, lr=args.lr, cbs=cbs)
    learn.fit(args.epochs)
    preds, targets = learn.get_preds(dl=test_dl)
    return 100 * accuracy(preds, targets).item()


# ---- report -------------------------------------------------------------------------------------
def mean_std(values: list[float]) -> str:
    if len(values) == 1: return f'{values[0]:.2f}'
    return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'


def report(args: argparse.Namespace, results: dict[str, list[float]], methods: dict, setting: str,
           total_s: float) -> str:
    n_seeds = len(next(iter(results.values())))
    lines = [f'### Clean test accuracy under {args.noise:.0%} symmetric label noise', '', setting, '',
             f'| method | clean test accuracy, % (mean ± std, {n_seeds} seed{"s" * (n_seeds > 1)}) | per seed | '
             f'lab, % (ResNet-18, full scale) |',
             '|---|---|---|---|']
    for name, accs in results.items():
        lab = LAB_REFERENCE.get(name)
        lines.append(f'| {methods[name][0]} | {mean_std(accs)} | {", ".join(f"{a:.2f}" for a in accs)} | '
                     f'{"" if lab is None else f"{lab:.2f}"} |')
    device = torch.device(args.device)
    hardware = (torch.cuda.get_device_name(device) if device.type == 'cuda'
                else f'CPU, {torch.get_num_threads()} threads ({os.cpu_count()} cores visible)')
    lines += ['', f'Command: `python bench/noisy_labels.py {shlex.join(sys.argv[1:])}`',
              f'Versions: minilearn {minilearn.__version__}, torch {torch.__version__}, '
              f'Python {platform.python_version()}; {hardware}; total {total_s / 60:.1f} min.', '']
    return '\n'.join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], epilog='Defaults are the lab\'s full scale.',
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--data', help=f'CIFAR-10 folder (train/<class>/, test/<class>/ images, or the python batches); '
                                  f'default {DEFAULT_DATA} if it exists, else a download with untar_data(URLs.CIFAR)')
    p.add_argument('--n-per-class', type=int, default=2000, help='training images per class (first in file order)')
    p.add_argument('--test-n-per-class', type=int, default=None, help='test images per class (default: all)')
    p.add_argument('--noise', type=float, default=0.5, help='fraction of training labels redrawn uniformly at random')
    p.add_argument('--methods', default=DEFAULT_METHODS, help=f'comma-separated, default {DEFAULT_METHODS}')
    p.add_argument('--seeds', type=int, default=3, help='number of seeds (0, 1, ...): mean ± std over them')
    p.add_argument('--arch', choices=('resnet18', 'cnn'), default='resnet18',
                   help='ResNet-18 for 32x32 inputs, or the course CNN (get_cnn_model, 0.39 M parameters at width 1)')
    p.add_argument('--width', type=float, default=1.0, help='channel-width multiplier (ResNet-18: 64·width base)')
    p.add_argument('--epochs', type=int, default=20)
    p.add_argument('--bs', type=int, default=128)
    p.add_argument('--lr', type=float, default=0.1)
    p.add_argument('--momentum', type=float, default=0.9)
    p.add_argument('--wd', type=float, default=5e-4, help='weight decay')
    p.add_argument('--sched', choices=('cos', 'const', 'one-cycle'), default='cos',
                   help='learning-rate schedule over the run (cosine annealing to 0 by default)')
    p.add_argument('--no-augment', dest='augment', action='store_false',
                   help='no random crop and flip of training batches')
    p.add_argument('--alpha', type=float, default=1.0, help='MixUp Beta(alpha, alpha) parameter')
    p.add_argument('--ls-eps', type=float, default=0.1, help='label smoothing eps')
    p.add_argument('--soft-beta', type=float, default=0.95, help='soft bootstrapping beta')
    p.add_argument('--hard-beta', type=float, default=0.8, help='hard bootstrapping beta')
    p.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    p.add_argument('--num-threads', type=int, default=None, help='torch CPU threads (default: torch\'s choice)')
    p.add_argument('--num-workers', type=int, default=min(4, os.cpu_count() or 1),
                   help='DataLoader workers for decoding the images once')
    p.add_argument('--out', help='also write the markdown table to this file')
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(',') if m.strip()]
    valid = list(method_table(args))
    unknown = [m for m in methods if m not in valid]
    if not methods or unknown: p.error(f"unknown method(s) {unknown}; choose from {', '.join(valid)}")
    if len(set(methods)) != len(methods): p.error(f'--methods lists a method twice: {args.methods}')
    for name in ('n_per_class', 'seeds', 'epochs', 'bs'):
        if getattr(args, name) < 1: p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.test_n_per_class is not None and args.test_n_per_class < 1: p.error('--test-n-per-class must be at least 1')
    if not 0 <= args.noise <= 1: p.error('--noise must lie in [0, 1]')
    if args.width <= 0 or args.lr <= 0 or args.alpha <= 0: p.error('--width, --lr and --alpha must be positive')
    if args.num_threads is not None and args.num_threads < 1: p.error('--num-threads must be at least 1')
    args.methods = methods
    args.device = str(torch.device(args.device) if args.device else default_device())
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.num_threads: torch.set_num_threads(args.num_threads)
    start = time.perf_counter()
    path, train_x, train_y, test_x, test_y, vocab = load(args)
    n_classes = len(vocab)
    norm = Normalize(train_x.mean((0, 2, 3)), train_x.std((0, 2, 3)))
    test_dl = DataLoader(Dataset(test_x, test_y), batch_size=2 * args.bs)
    methods = method_table(args)
    results: dict[str, list[float]] = {m: [] for m in args.methods}
    n_runs, run = len(args.methods) * args.seeds, 0
    changed_fractions = []
    for seed in range(args.seeds):
        noisy_y, changed = inject_label_noise(train_y, args.noise, n_classes=n_classes,
                                              generator=torch.Generator().manual_seed(seed))
        changed_fractions.append(changed.float().mean().item())
        for method in args.methods:
            labels = train_y if method == 'ce-clean' else noisy_y
            data = DataBunch.from_datasets(Dataset(train_x, labels), None, bs=args.bs, c_in=train_x.shape[1],
                                           c_out=n_classes)
            run += 1
            wall, cpu = time.perf_counter(), time.process_time()
            acc = train_one(args, method, seed, data, test_dl, norm, methods)
            results[method].append(acc)
            print(f'[{run:>2}/{n_runs}] {method:<12} seed {seed}  clean test accuracy {acc:6.2f} %  '
                  f'({time.perf_counter() - wall:.1f} s, {time.process_time() - cpu:.1f} s CPU)', flush=True)
    n_params = sum(p.numel() for p in make_model(args, DataBunch(None, None, 3, n_classes)).parameters())
    model = f'ResNet-18 (base width {max(1, round(64 * args.width))})' if args.arch == 'resnet18' \
        else f'course CNN (widths {[max(1, round(c * args.width)) for c in CNN_WIDTHS]})'
    counts = torch.bincount(train_y, minlength=n_classes)
    per_class = f'{counts.min()}' if counts.min() == counts.max() else f'{counts.min()}-{counts.max()}'
    setting = (f'{path.name}: {len(train_x)} training images ({per_class}/class), {len(test_x)} clean test '
               f'images; {args.noise:.0%} of labels redrawn ({statistics.mean(changed_fractions):.1%} changed); '
               f'{model}, {n_params / 1e6:.2f} M parameters; {args.epochs} epoch{"s" * (args.epochs > 1)}, bs {args.bs}, SGD lr {args.lr} '
               f'momentum {args.momentum} wd {args.wd}, {args.sched} schedule, '
               f'{"random crop + flip" if args.augment else "no augmentation"}.')
    table = report(args, results, methods, setting, time.perf_counter() - start)
    print('\n' + table)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(table)
        print(f'written to {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
