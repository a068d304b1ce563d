"""Transfer-learning study: does fastai's `fine_tune` recipe beat training the pretrained body at one learning
rate, and training from scratch, when the target task has few images?

No pretrained weights can be downloaded here, so the pretraining is part of the experiment: a torchvision
architecture is trained with minilearn on CIFAR-10 classes 0-4 (10,000 images), its weights saved, and
`vision_learner(..., pretrained=PATH)` builds the transfer learners on classes 5-9 with N images per class:

  fine_tune   learn.fine_tune(E)                        (frozen head epoch, then discriminative rates)
  unfrozen    learn.unfreeze(); fit_one_cycle(E+1, lr)  (the pretrained body, one learning rate)
  scratch     pretrained=False; fit_one_cycle(E+1, lr)  (the same architecture from random weights)

Every row trains E+1 epochs on the same images; accuracy is on the clean CIFAR-10 test images of classes 5-9;
differences are paired by seed (same subset, same head initialisation) with a 95 % t-interval. The cost
line compares the images per second of `fine_tune`'s frozen epoch with its unfrozen ones, timed in the same
process one after the other.

    python bench/transfer.py --threads 1                        # the study (about 4 min on one free core)
    python bench/transfer.py --smoke --out /tmp/t.md             # generated data, seconds (tests/)
"""
from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_run_options, mean_std, paired, start_run  # noqa: E402

from minilearn import (BatchTransformXCallback, Callback, DataBunch, Learner, Normalize,  # noqa: E402
                       RandomCropPad, RandomFlip, TensorLoader, vision_learner)
from minilearn.vision import IMAGENET_STATS  # noqa: E402

CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
SCALES = {  # pretrain epochs, fine-tune epochs E (each row trains E+1), images per class, seeds, test images per class
    'cpu': dict(pre_epochs=3, epochs=4, sizes=(50, 200), seeds=5, test_per_class=None),  # ~4 min on a free core (26 s of it pretraining)
    'quick': dict(pre_epochs=1, epochs=2, sizes=(50, 200), seeds=2, test_per_class=200),
    'smoke': dict(pre_epochs=1, epochs=1, sizes=(4, 8), seeds=2, test_per_class=None),
}


def default_data() -> str:
    """The nearest `shared/data/cifar10` above this script (the repository's `../shared/data/cifar10`)."""
    for folder in Path(__file__).resolve().parents:
        if (folder / 'shared' / 'data' / 'cifar10').is_dir(): return str(folder / 'shared' / 'data' / 'cifar10')
    return '../shared/data/cifar10'


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--data', default=default_data(), help='CIFAR-10 image folders train/<class>, test/<class>')
    p.add_argument('--arch', default='shufflenet_v2_x0_5', help='a torchvision model name')
    p.add_argument('--cut', type=int, default=-1, help="body = children[:cut] (shufflenet pools in forward: -1)")
    p.add_argument('--scale', choices=tuple(SCALES), default='cpu')
    p.add_argument('--smoke', action='store_true', help='generated data and the smoke scale (seconds)')
    p.add_argument('--seeds', type=int, default=None)
    p.add_argument('--bs', type=int, default=32)
    p.add_argument('--lr', type=float, default=1e-3, help="the one-lr rows' max_lr (fastai's default lr)")
    p.add_argument('--base-lr', type=float, default=2e-3, help="fine_tune's base_lr (fastai's default)")
    p.add_argument('--pre-lr', type=float, default=3e-3)
    p.add_argument('--weights', default=None, help='reuse pretrained weights from this file (else trained here)')
    p.add_argument('--out', default=None, help='write the markdown report here')
    add_run_options(p)
    args = p.parse_args(argv)
    if args.smoke: args.scale = 'smoke'
    args.s = dict(SCALES[args.scale])
    if args.seeds is not None: args.s['seeds'] = args.seeds
    return args


# ---- data ----------------------------------------------------------------------------------------------
def read_folder(root: Path, classes: range, per_class: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images (N, 3, 32, 32) and labels (class index - classes.start), files in sorted order."""
    xs, ys = [], []
    for c in classes:
        files = sorted((root / CLASSES[c]).iterdir())[:per_class]
        for f in files:
            xs.append(torch.from_numpy(np.array(Image.open(f).convert('RGB'))).permute(2, 0, 1))
            ys.append(c - classes.start)
    return torch.stack(xs), torch.tensor(ys)


def generated(n_per_class: int, classes: range, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Smoke data: a bright square whose position is the class, on noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(len(classes)).repeat_interleave(n_per_class)
    x = (torch.rand(len(y), 3, 32, 32, generator=g) * 120).to(torch.uint8)
    for i, c in enumerate(y.tolist()):
        r, col = divmod(c + classes.start, 4)
        x[i, :, r * 8:(r + 1) * 8, col * 8:(col + 1) * 8] = 250
    return x, y


def load(args: argparse.Namespace) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    if args.smoke:
        return {'pre': generated(16, range(0, 5), 0), 'pool': generated(16, range(5, 10), 1),
                'test': generated(8, range(5, 10), 2)}
    root, per_test = Path(args.data), args.s['test_per_class']
    return {'pre': read_folder(root / 'train', range(0, 5), None),
            'pool': read_folder(root / 'train', range(5, 10), max(args.s['sizes'])),
            'test': read_folder(root / 'test', range(5, 10), per_test)}


def subset(x: torch.Tensor, y: torch.Tensor, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` images per class drawn with `seed`."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.cat([(y == c).nonzero().flatten()[torch.randperm(int((y == c).sum()), generator=g)[:n]]
                     for c in y.unique()])
    return x[idx], y[idx]


# ---- training --------------------------------------------------------------------------------------------
class FitTimer(Callback):
    """Images and seconds of each fit's training batches (no validation here): (frozen, unfrozen) in fine_tune."""
    run_during_lr_find = False

    def __init__(self) -> None:
        self.fits: list[tuple[int, float]] = []

    def begin_fit(self) -> None:
        self.n, self.start = 0, time.perf_counter()

    def after_batch(self) -> None:
        if self.run.in_train: self.n += len(self.run.yb)

    def after_fit(self) -> None:
        self.fits.append((self.n, time.perf_counter() - self.start))


def augment() -> list:
    return [RandomCropPad(4), RandomFlip()]


def pretrain(args: argparse.Namespace, x: torch.Tensor, y: torch.Tensor, path: Path) -> float:
    torch.manual_seed(0)
    model = torchvision.models.get_model(args.arch, weights=None, num_classes=5)
    data = DataBunch.from_tensors(x, y, bs=args.bs * 2, c_out=5, seed=0)
    opt = partial(torch.optim.AdamW, betas=(0.9, 0.99), eps=1e-5, weight_decay=0.01)
    learn = Learner(model, data, F.cross_entropy, opt_func=opt, lr=args.pre_lr,
                    cbs=[BatchTransformXCallback(Normalize(*IMAGENET_STATS)), *augment()])
    start = time.perf_counter()
    learn.fit_one_cycle(args.s['pre_epochs'])
    torch.save(learn.model.state_dict(), path)
    return time.perf_counter() - start


def accuracy_on(learn: Learner, x: torch.Tensor, y: torch.Tensor) -> float:
    preds, targets = learn.get_preds(dl=TensorLoader(x, y, bs=256))
    return 100 * (preds.argmax(1) == targets).float().mean().item()


def run_one(args: argparse.Namespace, method: str, weights: Path, x: torch.Tensor, y: torch.Tensor,
            test: tuple[torch.Tensor, torch.Tensor], seed: int) -> tuple[float, list[tuple[int, float]]]:
    torch.manual_seed(seed)
    data = DataBunch.from_tensors(x, y, bs=args.bs, c_out=5, seed=seed)
    timer = FitTimer()
    learn = vision_learner(data, args.arch, pretrained=False if method == 'scratch' else weights, cut=args.cut,
                           normalize=IMAGENET_STATS, lr=args.lr, cbs=[timer, *augment()])
    epochs = args.s['epochs']
    if method == 'fine_tune':
        learn.fine_tune(epochs, base_lr=args.base_lr)
    else:
        learn.unfreeze()
        learn.fit_one_cycle(epochs + 1, args.lr)
    return accuracy_on(learn, *test), timer.fits


# ---- report ------------------------------------------------------------------------------------------------
METHODS = ('fine_tune', 'unfrozen', 'scratch')


def report(args: argparse.Namespace, acc: dict, speeds: list[float], pre_seconds: float, n_pre: int, n_test: int,
           command: str) -> str:
    s = args.s
    lines = [f"### Transfer: {args.arch} pretrained on CIFAR-10 classes 0-4, fine-tuned on classes 5-9", '',
             f"Accuracy (%) on the {n_test} clean test images of classes 5-9, mean ± sd over {s['seeds']} seeds; "
             f"paired differences (fine_tune minus the row) with 95 % t-intervals, * when the interval excludes 0. "
             f"Every row trains {s['epochs'] + 1} epochs (fine_tune: 1 frozen + {s['epochs']}), batch {args.bs}, "
             f"AdamW (fastai's Adam settings), random crop + flip; one-lr rows at max_lr {args.lr}, "
             f"fine_tune base_lr {args.base_lr}.", '',
             '| images per class | fine_tune | unfrozen, one lr | scratch | fine_tune − unfrozen | fine_tune − scratch |',
             '|---|---|---|---|---|---|']
    for n in s['sizes']:
        a = acc[n]
        lines.append(f"| {n} | {mean_std(a['fine_tune'])} | {mean_std(a['unfrozen'])} | {mean_std(a['scratch'])} | "
                     f"{paired(a['fine_tune'], a['unfrozen'])} | {paired(a['fine_tune'], a['scratch'])} |")
    ratio = statistics.median(speeds) if speeds else float('nan')
    lines += ['', f"Cost: the frozen epoch trains at {ratio:.2f}x the images per second of the unfrozen ones "
                  f"(median over the {len(speeds)} fine_tune runs, each timed in one process, frozen then unfrozen; "
                  f"the CPU is shared, so absolute rates are indicative only). Pretraining: "
                  f"{s['pre_epochs']} epochs on {n_pre} images, {pre_seconds:.0f} s.", '',
              f"Command: `{command}`", '']
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start_run(args)
    command = 'python bench/transfer.py ' + ' '.join(sys.argv[1:] if argv is None else argv)
    t0 = time.perf_counter()
    sets = load(args)
    shapes = ', '.join(f'{k} {tuple(v[0].shape)}' for k, v in sets.items())
    print(f"data: {shapes} ({time.perf_counter() - t0:.0f} s)")
    weights = Path(args.weights) if args.weights else Path(args.out or 'transfer').with_suffix('.pretrained.pth')
    pre_seconds = 0.
    if not args.weights:
        pre_seconds = pretrain(args, *sets['pre'], weights)
        print(f"pretrained {args.arch} in {pre_seconds:.0f} s -> {weights}")
    acc = {n: {m: [] for m in METHODS} for n in args.s['sizes']}
    speeds = []
    for seed in range(args.s['seeds']):
        for n in args.s['sizes']:
            x, y = subset(*sets['pool'], n, seed)
            for method in METHODS:
                a, fits = run_one(args, method, weights, x, y, sets['test'], seed)
                acc[n][method].append(a)
                if method == 'fine_tune':
                    (n0, t0_), (n1, t1) = fits
                    speeds.append((n0 / t0_) / (n1 / t1))
                print(f"seed {seed} n {n} {method}: {a:.2f} % ({time.perf_counter() - t0:.0f} s)", flush=True)
    text = report(args, acc, speeds, pre_seconds, len(sets['pre'][1]), len(sets['test'][1]), command)
    print(text)
    if args.out: Path(args.out).write_text(text)
    return 0


if __name__ == '__main__':
    sys.exit(main())
