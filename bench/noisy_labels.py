"""The label-noise study: clean test accuracy of noise-robust methods, ranked by paired differences over seeds.

The lab it follows: CIFAR-10, 2000 training images per class, 50 % symmetric label noise, ResNet-18,
SGD lr 0.1 (constant), momentum 0.9, weight decay 5e-4, batch size 128, random crop + flip, 20 epochs;
MixUp α = 0.2 with one λ per batch; soft bootstrapping β = 0.95, hard β = 0.8. It reports CE 76.51 %,
soft bootstrapping 74.54 %, hard bootstrapping 76.03 %, mixup 77.35 %.

Two independent choices, each a named preset:

  --recipe  the hyper-parameters (every one printed in the report):
            lab        exactly the lab's (above); LS ε 0.1, GCE q 0.7, SCE α 0.1 β 1, CutMix α 1 are the
                       methods' papers' values; clean-and-retrain uses 4 folds and cleanlab's default rule
            cos        the lab with cosine annealing of the lr to 0 and MixUp α = 1 (a decaying schedule,
                       the recipe the README's earlier table used)
  --scale   data, architectures, epochs and seeds:
            full       the lab's scale (a GPU): 2000/class, all 10000 test images, ResNet-18 (width 64),
                       the 6-layer Conv-BN-ReLU net (width 32) and the course CNN; 20 epochs; 5 seeds;
                       memorisation regime 60 epochs
            cpu        fits ~40 minutes on 2 idle cores (2 worker processes, 1 thread each): 400/class,
                       2000 test images (200/class), the 6-layer BN net at width 16 and the course CNN at
                       half width; 8 epochs; 5 seeds; memorisation regime (bn6 only, 2 seeds) 24 epochs
            smoke      generated shapes (no files), tiny: checks the whole pipeline in seconds (tested)
  Any preset value can be overridden (--epochs, --seeds, --archs bn6:16,cnn:0.5, ...).

    python bench/noisy_labels.py --recipe lab --scale cpu --out bench/noisy_labels_results.md
    python bench/noisy_labels.py --recipe lab --scale full --device cuda      # the lab's scale

What is measured. For each seed, `inject_label_noise` (generator seeded by the seed) redraws --noise of
the training labels (the lab convention: a redrawn label may equal the true one; "flipped" below means
changed). Every method of a seed trains on the same noisy labels, from the same initial weights
(torch.manual_seed(seed) before the model is built) and in the same batch order (the training
loader's own seed). The data path is the library's: tensors in memory (DataBunch.from_tensors),
ChannelsLast, and batch augmentation RandomCropPad(4) + RandomFlip() after normalization. Scores: clean test accuracy after the last epoch ("final") and the
mean of the test accuracies after each of the last 3 epochs ("last-3"): at a constant lr the last
step's noise moves the final accuracy by points. Methods are compared by the paired difference to CE
over seeds (mean and a 95 % t-interval): per-method mean ± std over seeds is dominated by the
seed-to-seed spread shared by all methods.

Methods (--methods):
  ce, ls, soft-boot, hard-boot        cross entropy, label smoothing, Reed et al.'s bootstrapping
  mixup-batch, mixup                  MixUp with one λ per batch (the lab) / one λ per sample (max(λ, 1−λ))
  gce, sce                            generalized (Zhang & Sabuncu 2018) / symmetric (Wang et al. 2019) CE
  cutmix                              CutMix (Yun et al. 2019), one box per batch
  clean-retrain                       out-of-fold probabilities (minilearn.out_of_fold_probs, k folds,
                                      CE, same recipe and epochs) -> confident learning
                                      (find_label_issues, cleanlab) -> drop the flagged items -> CE
                                      retrained from the seed's initial weights on the rest
  ce-clean                            CE on the clean labels (a reference, not in the default list)

Detection (no extra training in the short regime): against the known changed labels, precision /
recall / F1 of (a) in-sample loss ranking (the CE row's model on its own training items, top n with n
the true count), (b) out-of-fold loss ranking (the clean-retrain folds, top n), (c) confident learning
on the out-of-fold probabilities (its own count), (d) confident learning on the in-sample
probabilities, (e) area under the margin (AreaUnderMargin on the CE row's own training run, lowest first),
top n with n the true count, and (f) the same ranking cut at the count confident learning estimates on the
in-sample probabilities (one run, no folds). Regimes: "short" (the recipe's epochs, augmentation on) and "memorise" (CE and the folds
trained --memorise-epochs without augmentation, lr annealed to 0, until CE fits most noisy labels).
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import platform
import shlex
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import minilearn  # noqa: E402
from minilearn.callback import Callback, Order  # noqa: E402
from minilearn.callbacks.augment import RandomCropPad, RandomFlip  # noqa: E402
from minilearn.callbacks.device import ChannelsLast, DeviceCallback, default_device  # noqa: E402
from minilearn.callbacks.mixup import CutMix, MixUp  # noqa: E402
from minilearn.callbacks.noise import AreaUnderMargin  # noqa: E402
from minilearn.callbacks.schedule import ParamScheduler, sched_cos  # noqa: E402
from minilearn.callbacks.transforms import BatchTransformXCallback, Normalize  # noqa: E402
from minilearn.data.core import DataBunch, Dataset  # noqa: E402
from minilearn.data.external import cifar10_data  # noqa: E402
from minilearn.data.shapes import make_shapes  # noqa: E402
from minilearn.inference import get_preds  # noqa: E402
from minilearn.learner import Learner  # noqa: E402
from minilearn.losses import (GeneralizedCrossEntropy, HardBootstrappingLoss, LabelSmoothingCrossEntropy,  # noqa: E402
                              SoftBootstrappingLoss, SymmetricCrossEntropy)
from minilearn.models import get_cnn_model, init_cnn, resnet18_cifar  # noqa: E402
from minilearn.noisy import clean_dataset, find_label_issues, inject_label_noise, out_of_fold_probs  # noqa: E402


# shared/ beside the repository (or beside a folder above it, as for a git worktree)
DEFAULT_DATA = next((p / 'shared' / 'data' / 'cifar10' for p in REPO.parents
                     if (p / 'shared' / 'data' / 'cifar10').is_dir()), REPO.parent / 'shared' / 'data' / 'cifar10')
ALL_METHODS = ('ce', 'ls', 'soft-boot', 'hard-boot', 'mixup-batch', 'mixup', 'gce', 'sce', 'cutmix', 'clean-retrain',
               'ce-clean')
LAB_REFERENCE = {'ce': 76.51, 'soft-boot': 74.54, 'hard-boot': 76.03, 'mixup-batch': 77.35}  # ResNet-18, full scale

RECIPES: dict[str, dict[str, Any]] = {
    'lab': dict(lr=0.1, momentum=0.9, wd=5e-4, bs=128, sched='const', augment=True, alpha=0.2, soft_beta=0.95,
                hard_beta=0.8, ls_eps=0.1, gce_q=0.7, sce_alpha=0.1, sce_beta=1.0, cutmix_alpha=1.0, folds=4,
                cl_filter='prune_by_noise_rate'),
}
RECIPES['cos'] = dict(RECIPES['lab'], sched='cos', alpha=1.0)
SCALES: dict[str, dict[str, Any]] = {
    'full': dict(data='cifar10', n_per_class=2000, test_n_per_class=None, archs='resnet18:64,bn6:32,cnn:1',
                 epochs=20, seeds=5, memorise_epochs=60, memorise_archs='bn6:32', memorise_seeds=5),
    'cpu': dict(data='cifar10', n_per_class=400, test_n_per_class=200, archs='bn6:16,cnn:0.5', epochs=8, seeds=5,
                memorise_epochs=24, memorise_archs='bn6:16', memorise_seeds=2),
    'smoke': dict(data='shapes', n_per_class=16, test_n_per_class=4, archs='bn6:4,cnn:0.125', epochs=2, seeds=2,
                  memorise_epochs=3, memorise_archs='bn6:4', memorise_seeds=1),
}
CNN_WIDTHS = (32, 64, 128, 256)  # the course CNN (get_cnn_model) at width 1: 0.39 M parameters
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093}


# ---- models -------------------------------------------------------------------------------------
def bn6(c_in: int, c_out: int, width: int) -> nn.Sequential:
    """Six 3x3 Conv-BN-ReLU layers (widths w, w, 2w, 2w, 4w, 4w; stride 2 in layers 1, 3, 5), pooling, linear.

    Striding from the first layer (16x16 maps) makes it about twice as fast on a CPU as striding after it.
    """
    chans = [c_in, width, width, 2 * width, 2 * width, 4 * width, 4 * width]
    layers: list[nn.Module] = []
    for i in range(6):
        layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=1 if i % 2 else 2, padding=1, bias=False),
                   nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
    return init_cnn(nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(chans[-1], c_out)))


def make_model(arch: str, c_in: int, c_out: int) -> nn.Module:
    name, width = arch.split(':')
    if name == 'resnet18': return resnet18_cifar(c_out, c_in, width=int(width))
    if name == 'bn6': return bn6(c_in, c_out, int(width))
    return init_cnn(get_cnn_model(DataBunch(None, None, c_in, c_out),
                                  [max(1, round(c * float(width))) for c in CNN_WIDTHS]))


def describe_arch(arch: str) -> str:
    name, width = arch.split(':')
    n = sum(p.numel() for p in make_model(arch, 3, 10).parameters())
    label = {'resnet18': f'ResNet-18 (width {width})', 'bn6': f'6-layer Conv-BN-ReLU (width {width})',
             'cnn': f'course CNN (widths {[max(1, round(c * float(width))) for c in CNN_WIDTHS]})'}[name]
    return f'{label}, {n / 1e6:.2f} M parameters'


class TestAccuracy(Callback):
    """Clean test accuracy after each of the last `last` epochs (no training-time callback applies)."""
    _order = Order.PROGRESS

    def __init__(self, test_dl: DataLoader, last: int = 3):
        self.test_dl, self.last, self.accs = test_dl, last, []

    def after_epoch(self) -> None:
        if self.run.epoch < self.run.epochs - self.last: return
        preds, targets = get_preds(self.run, dl=self.test_dl)
        self.accs.append(100 * (preds.argmax(1) == targets).float().mean().item())


# ---- the methods ----------------------------------------------------------------------------------
def method_specs(r: dict[str, Any]) -> dict[str, tuple[str, str, Any, Any]]:
    """name -> (description, its own hyper-parameters, loss factory, callbacks factory)."""
    ce = nn.CrossEntropyLoss
    specs = {
        'ce': ('cross entropy', '-', ce, list),
        'ls': ('label smoothing', f"eps={r['ls_eps']}", partial(LabelSmoothingCrossEntropy, eps=r['ls_eps']), list),
        'soft-boot': ('soft bootstrapping', f"beta={r['soft_beta']}",
                      partial(SoftBootstrappingLoss, beta=r['soft_beta']), list),
        'hard-boot': ('hard bootstrapping', f"beta={r['hard_beta']}",
                      partial(HardBootstrappingLoss, beta=r['hard_beta']), list),
        'mixup-batch': ('MixUp, one λ per batch', f"alpha={r['alpha']}, per_sample=False", ce,
                        lambda: [MixUp(r['alpha'], per_sample=False)]),
        'mixup': ('MixUp, one λ per sample', f"alpha={r['alpha']}, per_sample=True (λ=max(λ,1−λ))", ce,
                  lambda: [MixUp(r['alpha'])]),
        'gce': ('generalized cross entropy', f"q={r['gce_q']}", partial(GeneralizedCrossEntropy, q=r['gce_q']), list),
        'sce': ('symmetric cross entropy', f"alpha={r['sce_alpha']}, beta={r['sce_beta']}, A=-4",
                partial(SymmetricCrossEntropy, alpha=r['sce_alpha'], beta=r['sce_beta']), list),
        'clean-retrain': ('clean and retrain (confident learning on out-of-fold probabilities)',
                          f"k={r['folds']} folds of CE, filter_by={r['cl_filter']!r}, drop flagged, CE retrained",
                          ce, list),
        'cutmix': ('CutMix, one box per batch', f"alpha={r['cutmix_alpha']}, exact_area=True", ce,
                   lambda: [CutMix(r['cutmix_alpha'])]),
        'ce-clean': ('cross entropy on the clean labels (reference)', '-', ce, list),
    }
    return specs


# ---- data (loaded once in the parent; worker processes inherit it by fork) -------------------------
DATA: dict[str, Any] = {}


def load_data(args: argparse.Namespace) -> None:
    start = time.perf_counter()
    if args.data == 'shapes':
        n_classes = 10
        x, y = make_shapes(n_classes * (args.n_per_class + args.test_n_per_class), size=32, n_classes=n_classes)
        x = x.float() / 255
        n_train = n_classes * args.n_per_class
        train_x, train_y, test_x, test_y, source = x[:n_train], y[:n_train], x[n_train:], y[n_train:], 'shapes'
    else:
        path = Path(args.data_path) if args.data_path else DEFAULT_DATA
        if not path.exists(): raise SystemExit(f"error: CIFAR-10 folder {path} not found (give --data-path)")
        sd = cifar10_data(path, n_per_class=args.n_per_class, valid_n_per_class=args.test_n_per_class)

        def decode(ll):
            xs, ys = zip(*DataLoader(ll, batch_size=500, num_workers=args.num_workers))
            return torch.cat(xs).float().div_(255) if xs[0].dtype == torch.uint8 else torch.cat(xs), torch.cat(ys)
        (train_x, train_y), (test_x, test_y) = decode(sd.train), decode(sd.valid)
        source = str(path)
    DATA.update(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, n_classes=int(train_y.max()) + 1,
                norm=Normalize(train_x.mean((0, 2, 3)), train_x.std((0, 2, 3))), source=source,
                load_s=time.perf_counter() - start)
    DATA['noisy'] = {}
    for seed in range(max(args.seeds, args.memorise_seeds)):
        DATA['noisy'][seed] = inject_label_noise(train_y, args.noise, n_classes=DATA['n_classes'],
                                                 generator=torch.Generator().manual_seed(seed))


# ---- one training run ------------------------------------------------------------------------------
def _loader_seed(seed: int) -> int:
    """The training loader's own shuffling seed: the same batch order for every method of a seed."""
    return 10_000 + seed


def make_learner(args: argparse.Namespace, arch: str, seed: int, data: DataBunch, loss: Any, cbs: list,
                 augment: bool, sched: str, epochs_for_sched: int) -> Learner:
    r = args.r
    torch.manual_seed(seed)  # the same initial weights for every method of a seed
    model = make_model(arch, 3, DATA['n_classes'])
    all_cbs = [DeviceCallback(args.device), BatchTransformXCallback(DATA['norm'])] + cbs
    if args.channels_last: all_cbs.append(ChannelsLast())
    if augment: all_cbs += [RandomCropPad(4), RandomFlip()]  # after normalization: the padding is the mean
    if sched == 'cos': all_cbs.append(ParamScheduler('lr', sched_cos(r['lr'], 0.)))
    opt_func = partial(torch.optim.SGD, momentum=r['momentum'], weight_decay=r['wd'])
    return Learner(model, data, loss, opt_func=opt_func, lr=r['lr'], cbs=all_cbs)


def train(args: argparse.Namespace, arch: str, seed: int, x: torch.Tensor, y: torch.Tensor, method: str,
          epochs: int, augment: bool, sched: str, in_sample: bool = False) -> dict:
    _, _, make_loss, make_cbs = method_specs(args.r)[method]
    data = DataBunch.from_tensors(x, y, bs=args.r['bs'], c_in=3, c_out=DATA['n_classes'], seed=_loader_seed(seed))
    test = TestAccuracy(DataLoader(Dataset(DATA['test_x'], DATA['test_y']), batch_size=512), last=min(3, epochs))
    aum = [AreaUnderMargin()] if in_sample else []  # reads the training logits, changes nothing
    learn = make_learner(args, arch, seed, data, make_loss(), make_cbs() + [test] + aum, augment, sched, epochs)
    learn.fit(epochs)
    out = dict(final=test.accs[-1], last3=statistics.mean(test.accs))
    if in_sample:
        probs, _ = get_preds(learn, dl=DataLoader(Dataset(x, y), batch_size=512))
        out['probs'] = probs.numpy()
        out['aum'] = aum[0].scores
    return out


def oof(args: argparse.Namespace, arch: str, seed: int, y: torch.Tensor, epochs: int, augment: bool,
        sched: str) -> np.ndarray:
    def make(bunch: DataBunch) -> Learner:
        rows = torch.as_tensor(bunch.train_ds.indices)  # the fold's training items, gathered from memory
        bunch.train_dl = DataBunch.from_tensors(DATA['train_x'][rows], y[rows], bs=args.r['bs'],
                                                seed=_loader_seed(seed)).train_dl
        return make_learner(args, arch, seed, bunch, nn.CrossEntropyLoss(), [], augment, sched, epochs)
    return out_of_fold_probs(make, Dataset(DATA['train_x'], y), k=args.r['folds'], epochs=epochs, bs=args.r['bs'],
                             seed=seed, progress=False).numpy()


def run_task(task: tuple) -> tuple[tuple, dict, float]:
    """One unit of work (run in a worker process): ('train', arch, seed, method) or ('memorise', arch, seed)."""
    args = ARGS
    if args.device == 'cpu': torch.set_num_threads(args.threads)
    start = time.perf_counter()
    kind, arch, seed = task[:3]
    noisy_y = DATA['noisy'][seed].labels
    r = args.r
    if kind == 'train':
        method = task[3]
        if method == 'clean-retrain':
            probs = oof(args, arch, seed, noisy_y, args.epochs, r['augment'], r['sched'])
            mask = find_label_issues(labels=noisy_y, pred_probs=probs, filter_by=r['cl_filter'])
            kept = clean_dataset(Dataset(DATA['train_x'], noisy_y), mask).indices
            out = train(args, arch, seed, DATA['train_x'][kept], noisy_y[kept], 'ce', args.epochs, r['augment'],
                        r['sched'])
            out.update(oof=probs, n_dropped=int(mask.sum()))
        else:
            y = DATA['train_y'] if method == 'ce-clean' else noisy_y
            out = train(args, arch, seed, DATA['train_x'], y, method, args.epochs, r['augment'], r['sched'],
                        in_sample=method == 'ce')
    else:  # the memorisation regime: CE and its folds without augmentation, lr annealed to 0
        out = train(args, arch, seed, DATA['train_x'], noisy_y, 'ce', args.memorise_epochs, False, 'cos',
                    in_sample=True)
        out['oof'] = oof(args, arch, seed, noisy_y, args.memorise_epochs, False, 'cos')
    return task, out, time.perf_counter() - start


ARGS: argparse.Namespace = argparse.Namespace()


# ---- statistics and detection -----------------------------------------------------------------------
def mean_std(values: list[float]) -> str:
    if len(values) == 1: return f'{values[0]:.2f}'
    return f'{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}'


def paired(values: list[float], reference: list[float]) -> str:
    """Mean paired difference and its 95 % t-interval over seeds."""
    d = [a - b for a, b in zip(values, reference)]
    if len(d) < 2: return f'{d[0]:+.2f}'
    m, s = statistics.mean(d), statistics.stdev(d)
    half = T_975.get(len(d) - 1, 1.96) * s / math.sqrt(len(d))
    mark = ' *' if m - half > 0 or m + half < 0 else ''
    return f'{m:+.2f} [{m - half:+.2f}, {m + half:+.2f}]{mark}'


def prf(flagged: np.ndarray, truth: np.ndarray) -> tuple[float, float, float, int]:
    tp = int((flagged & truth).sum())
    p = tp / max(1, int(flagged.sum()))
    r = tp / max(1, int(truth.sum()))
    return p, r, 0 if p + r == 0 else 2 * p * r / (p + r), int(flagged.sum())


def detections(labels: np.ndarray, changed: np.ndarray, in_probs: np.ndarray, oof_probs: np.ndarray,
               filter_by: str, aum: torch.Tensor | None = None) -> dict[str, tuple]:
    n_true = int(changed.sum())
    idx = np.arange(len(labels))

    def mask(indices: torch.Tensor) -> np.ndarray:
        flagged = np.zeros(len(labels), dtype=bool)
        flagged[indices.numpy()] = True
        return flagged

    def top_loss(probs: np.ndarray) -> np.ndarray:
        loss = -np.log(np.clip(probs[idx, labels], 1e-12, None))
        flagged = np.zeros(len(labels), dtype=bool)
        flagged[np.argsort(-loss, kind='stable')[:n_true]] = True
        return flagged

    def cl(probs: np.ndarray) -> np.ndarray:
        return find_label_issues(labels=labels, pred_probs=probs, filter_by=filter_by).numpy()
    return {'in-sample loss ranking (true count)': prf(top_loss(in_probs), changed),
            'out-of-fold loss ranking (true count)': prf(top_loss(oof_probs), changed),
            'confident learning, out-of-fold probs': prf(cl(oof_probs), changed),
            'confident learning, in-sample probs': prf(cl(in_probs), changed),
            **({} if aum is None else {  # the CE model's own training run: no folds
                'area under the margin (true count)': prf(mask(find_label_issues(aum=aum, n_issues=n_true)), changed),
                "area under the margin (confident learning's count, in-sample probs)": prf(mask(find_label_issues(
                    aum=aum, labels=labels, pred_probs=in_probs)), changed)})}


# ---- the report ------------------------------------------------------------------------------------
def report(args: argparse.Namespace, results: dict, total_s: float) -> str:
    r, specs = args.r, method_specs(args.r)
    n_train, n_test = len(DATA['train_y']), len(DATA['test_y'])
    changed = statistics.mean(DATA['noisy'][s].changed.float().mean().item() for s in range(args.seeds))
    aug = 'random crop (pad 4, after normalization: the padding is the mean) + horizontal flip (RandomCropPad, RandomFlip)'
    sched = 'constant lr' if r['sched'] == 'const' else 'lr annealed to 0 by a cosine'
    lines = [f'## Label noise: {args.noise:.0%} symmetric, recipe `{args.recipe}`, scale `{args.scale}`', '',
             f'Data: {DATA["source"]}: {n_train} training images ({args.n_per_class}/class), {n_test} clean test '
             f'images; {args.noise:.0%} of the labels redrawn uniformly ({changed:.1%} changed, mean over seeds).',
             f'Shared hyper-parameters (every method): SGD lr {r["lr"]}, momentum {r["momentum"]}, weight decay '
             f'{r["wd"]}, batch size {r["bs"]}, {args.epochs} epochs, {sched}, '
             f'{aug if r["augment"] else "no augmentation"}; {args.seeds} seeds (0..{args.seeds - 1}); a seed '
             f'fixes the noise, the initial weights and the batch order for every method.',
             'Scores: clean test accuracy (%) after the last epoch ("final") and the mean over the last 3 epochs '
             '("last-3"). Δ: the paired difference to CE over seeds, mean [95 % t-interval]; * marks an interval '
             'that excludes 0. Rank methods by Δ only.', '']
    for arch in args.archs:
        res = results['train'].get(arch, {})
        lines += [f'### {describe_arch(arch)}', '',
                  '| method | its hyper-parameters | final, mean ± std | last-3, mean ± std | Δ final vs CE | '
                  'Δ last-3 vs CE | final per seed | lab (ResNet-18, full) |', '|---|---|---|---|---|---|---|---|']
        ce = res.get('ce')
        for m in args.methods:
            if m not in res: continue
            finals, last3 = [o['final'] for o in res[m]], [o['last3'] for o in res[m]]
            d_final = paired(finals, [o['final'] for o in ce]) if ce and m != 'ce' else ''
            d_last3 = paired(last3, [o['last3'] for o in ce]) if ce and m != 'ce' else ''
            extra = ''
            if m == 'clean-retrain':
                extra = f" (dropped {statistics.mean(o['n_dropped'] for o in res[m]):.0f} of {n_train} on average)"
            lab = LAB_REFERENCE.get(m)
            lines.append(f'| {specs[m][0]}{extra} | {specs[m][1]} | {mean_std(finals)} | {mean_std(last3)} | '
                         f'{d_final} | {d_last3} | {", ".join(f"{a:.1f}" for a in finals)} | '
                         f'{"" if lab is None else lab} |')
        lines.append('')
    lines += ['### Detecting the changed labels: precision / recall / F1 (flagged count), mean over seeds', '',
              f'"short": the models of the table above (the CE row for in-sample, the clean-retrain folds for '
              f'out-of-fold; {args.epochs} epochs, the recipe\'s schedule and augmentation). "memorise": CE and '
              f'{r["folds"]} folds trained {args.memorise_epochs} epochs without augmentation, lr annealed to 0 by '
              f'a cosine, {args.memorise_seeds} seed(s). Confident learning: cleanlab filter_by={r["cl_filter"]!r}.',
              '', '| regime | architecture | detector | precision | recall | F1 | flagged (true) |',
              '|---|---|---|---|---|---|---|']
    for regime, per_arch in results['detect'].items():
        for arch, per_seed in per_arch.items():
            n_true = statistics.mean(float(DATA['noisy'][s].changed.sum()) for s in per_seed)
            for det in [d for d in next(iter(per_seed.values())) if all(d in v for v in per_seed.values())]:
                vals = np.array([per_seed[s][det] for s in per_seed])
                p, rc, f1, n = vals.mean(0)
                lines.append(f'| {regime} | {arch} | {det} | {p:.3f} | {rc:.3f} | {f1:.3f} | {n:.0f} ({n_true:.0f}) |')
    if results['memorise']:
        lines += ['', '| memorise regime | CE fit of the given labels, all / changed items | clean test final | '
                  'out-of-fold accuracy vs the true labels |', '|---|---|---|---|']
        for arch, per_seed in results['memorise'].items():
            fit_all = statistics.mean(v['fit_all'] for v in per_seed.values())
            fit_changed = statistics.mean(v['fit_changed'] for v in per_seed.values())
            final = statistics.mean(v['final'] for v in per_seed.values())
            oof_acc = statistics.mean(v['oof_acc'] for v in per_seed.values())
            lines.append(f'| {arch} | {fit_all:.1%} / {fit_changed:.1%} | {final:.2f} | {oof_acc:.1%} |')
        short = results.get('short_fit', {})
        if short:
            lines += ['', 'Short regime, for comparison: ' + '; '.join(
                f'{arch}: CE fits {v[0]:.1%} of all given labels, {v[1]:.1%} of the changed ones, out-of-fold '
                f'accuracy vs the true labels {v[2]:.1%}' for arch, v in short.items()) + '.']
    device = torch.device(args.device)
    hardware = (torch.cuda.get_device_name(device) if device.type == 'cuda' else
                f'CPU, {args.jobs} worker process(es) x {args.threads} thread(s), {os.cpu_count()} cores visible')
    run_s = results.get('run_seconds')
    runs = '' if run_s is None else f'; the runs took {run_s / 60:.1f} min in all (sum over the workers)'
    lines += ['', f'Command: `python bench/noisy_labels.py {shlex.join(args.argv)}`',
              f'Versions: minilearn {minilearn.__version__}, torch {torch.__version__}, Python '
              f'{platform.python_version()}; {hardware}; this invocation {total_s / 60:.1f} min (data read in '
              f'{DATA["load_s"]:.0f} s){runs}.', '']
    return '\n'.join(lines)


# ---- command line -----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split('\n\n', 1)[1])
    p.add_argument('--recipe', choices=sorted(RECIPES), default='lab')
    p.add_argument('--scale', choices=sorted(SCALES), default=None,
                   help="default: 'full' when CUDA is available, else 'cpu'")
    p.add_argument('--data', choices=('cifar10', 'shapes'), default=None, help='default: the scale\'s')
    p.add_argument('--data-path', default=None, help=f'CIFAR-10 folder (default {DEFAULT_DATA})')
    p.add_argument('--n-per-class', type=int, default=None)
    p.add_argument('--test-n-per-class', type=int, default=None)
    p.add_argument('--archs', default=None, help='comma-separated name:width, names resnet18, bn6, cnn')
    p.add_argument('--epochs', type=int, default=None)
    p.add_argument('--seeds', type=int, default=None)
    p.add_argument('--memorise-epochs', type=int, default=None)
    p.add_argument('--memorise-archs', default=None, help="architectures of the memorisation regime ('' for none)")
    p.add_argument('--memorise-seeds', type=int, default=None)
    p.add_argument('--noise', type=float, default=0.5)
    p.add_argument('--methods', default=None, help=f'comma-separated from {", ".join(ALL_METHODS)} '
                                                   f'(default: all but ce-clean)')
    for key, value in RECIPES['lab'].items():
        if key in ('sched', 'cl_filter', 'augment'): continue
        p.add_argument(f"--{key.replace('_', '-')}", type=type(value), default=None, help=f"override the recipe's {key}")
    p.add_argument('--device', default=None, help='default: cuda if available, else cpu')
    p.add_argument('--jobs', type=int, default=None, help='worker processes (default 2 on CPU, 1 on a GPU)')
    p.add_argument('--threads', type=int, default=1, help='torch threads per worker on CPU (1: fastest on a busy machine)')
    p.add_argument('--no-channels-last', dest='channels_last', action='store_false',
                   help='no ChannelsLast callback (channels-last is ~25 %% faster on a CPU)')
    p.add_argument('--raw', default=None, help='save every finished run here (torch.save) and skip the runs already '
                                               'in it: an interrupted study resumes; default: --out + .raw.pt')
    p.add_argument('--num-workers', type=int, default=2, help='DataLoader workers for decoding the images once')
    p.add_argument('--out', help='also write the markdown report to this file')
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.device = str(torch.device(args.device) if args.device else default_device())
    if args.scale is None: args.scale = 'full' if args.device.startswith('cuda') else 'cpu'
    for key, value in SCALES[args.scale].items():
        if getattr(args, key) is None: setattr(args, key, value)
    args.r = dict(RECIPES[args.recipe])
    for key in args.r:
        if getattr(args, key, None) is not None: args.r[key] = getattr(args, key)
    if args.test_n_per_class is None and args.data == 'shapes': p.error('--test-n-per-class is needed with shapes')
    args.archs = [a for a in args.archs.split(',') if a]
    args.memorise_archs = [a for a in args.memorise_archs.split(',') if a]
    for arch in args.archs + args.memorise_archs:
        name, _, width = arch.partition(':')
        if name not in ('resnet18', 'bn6', 'cnn') or not width:
            p.error(f"--archs entries are name:width with name resnet18, bn6 or cnn, got {arch!r}")
    available = [m for m in ALL_METHODS if m in method_specs(args.r)]
    args.methods = [m for m in available if m != 'ce-clean'] if args.methods is None else \
        [m.strip() for m in args.methods.split(',') if m.strip()]
    unknown = [m for m in args.methods if m not in available]
    if unknown: p.error(f"unknown or unavailable method(s) {unknown}; choose from {', '.join(available)}")
    if 'ce' not in args.methods:  # the reference of every paired difference and of the detection table
        print("note: without 'ce' in --methods the report has no paired differences and no detection table "
              "(finished runs in --raw are reused, so 'ce' costs nothing once it has run)", file=sys.stderr)
    for name in ('n_per_class', 'epochs', 'seeds', 'threads'):
        if getattr(args, name) < 1: p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.memorise_archs and args.memorise_seeds < 1: p.error('--memorise-seeds must be at least 1')
    if args.jobs is None: args.jobs = 1 if args.device.startswith('cuda') else 2
    return args


CONFIG_KEY = ('config',)


def run_config(args: argparse.Namespace) -> dict:
    """What a saved run depends on besides its (kind, arch, seed, method) key."""
    keys = ('data', 'n_per_class', 'test_n_per_class', 'epochs', 'memorise_epochs', 'noise', 'channels_last')
    return dict(recipe=dict(args.r), **{k: getattr(args, k) for k in keys})


def cost(task: tuple, args: argparse.Namespace) -> float:
    """Rough relative cost, to start the longest tasks first."""
    if task[0] == 'memorise': return args.memorise_epochs * args.r['folds']
    return args.epochs * (args.r['folds'] if task[3] == 'clean-retrain' else 1)


def main(argv: list[str] | None = None) -> int:
    global ARGS
    ARGS = args = parse_args(argv)
    start = time.perf_counter()
    if args.device == 'cpu': torch.set_num_threads(args.threads)
    load_data(args)
    print(f'{len(DATA["train_y"])} training, {len(DATA["test_y"])} test images from {DATA["source"]} '
          f'({DATA["load_s"]:.0f} s); recipe {args.recipe} {args.r}; scale {args.scale}', flush=True)
    tasks = [('train', arch, seed, m) for seed in range(args.seeds) for arch in args.archs for m in args.methods]
    tasks += [('memorise', arch, seed) for arch in args.memorise_archs for seed in range(args.memorise_seeds)]
    # seed by seed (a cut-short study has whole seeds), the longest runs of a seed first
    tasks.sort(key=lambda t: (t[2], -cost(t, args)))
    raw_path = Path(args.raw) if args.raw else Path(args.out + '.raw.pt') if args.out else None
    raw: dict[tuple, dict] = {}
    config = run_config(args)
    if raw_path is not None and raw_path.exists():
        saved = torch.load(raw_path, weights_only=False)
        if saved.get(CONFIG_KEY, config) != config:
            raise SystemExit(f"error: {raw_path} holds runs of another configuration ({saved[CONFIG_KEY]}); give "
                             f"another --raw (or --out)")
        raw = {t: o for t, o in saved.items() if t in tasks}
        print(f'{len(raw)} of {len(tasks)} runs already in {raw_path}', flush=True)
    todo = [t for t in tasks if t not in raw]
    results: dict[str, Any] = {'train': {}, 'detect': {'short': {}, 'memorise': {}}, 'memorise': {}, 'short_fit': {}}
    if args.jobs > 1:
        pool = multiprocessing.get_context('fork').Pool(args.jobs)
        stream = pool.imap_unordered(run_task, todo)
    else:
        pool, stream = None, map(run_task, todo)
    try:
        for done, (task, out, seconds) in enumerate(stream, len(raw) + 1):
            raw[task] = dict(out, seconds=seconds)
            if raw_path is not None:
                torch.save({**raw, CONFIG_KEY: config}, raw_path.with_suffix('.tmp'))
                os.replace(raw_path.with_suffix('.tmp'), raw_path)
            score = f"final {out['final']:6.2f}  last-3 {out['last3']:6.2f}"
            print(f'[{done:>3}/{len(tasks)}] {" ".join(map(str, task)):<34} {score}  ({seconds:.0f} s, '
                  f'{(time.perf_counter() - start) / 60:.1f} min)', flush=True)
    finally:
        if pool is not None: pool.close()
    if all('seconds' in raw[t] for t in tasks): results['run_seconds'] = sum(raw[t]['seconds'] for t in tasks)
    for seed in range(args.seeds):
        for arch in args.archs:
            for m in args.methods:
                results['train'].setdefault(arch, {}).setdefault(m, []).append(raw[('train', arch, seed, m)])
    labels_of = {s: DATA['noisy'][s].labels.numpy() for s in DATA['noisy']}
    changed_of = {s: DATA['noisy'][s].changed.numpy() for s in DATA['noisy']}
    true = DATA['train_y'].numpy()

    if 'clean-retrain' in args.methods and 'ce' in args.methods:
        for arch in args.archs:
            fits = []
            for s in range(args.seeds):
                in_probs, oof_probs = raw[('train', arch, s, 'ce')]['probs'], raw[('train', arch, s, 'clean-retrain')]['oof']
                results['detect']['short'].setdefault(arch, {})[s] = detections(
                    labels_of[s], changed_of[s], in_probs, oof_probs, args.r['cl_filter'],
                    raw[('train', arch, s, 'ce')].get('aum'))
                pred = in_probs.argmax(1)
                fits.append(((pred == labels_of[s]).mean(), (pred == labels_of[s])[changed_of[s]].mean(),
                             (oof_probs.argmax(1) == true).mean()))
            results['short_fit'][arch] = np.mean(fits, 0)
    for arch in args.memorise_archs:
        for s in range(args.memorise_seeds):
            out = raw[('memorise', arch, s)]
            results['detect']['memorise'].setdefault(arch, {})[s] = detections(
                labels_of[s], changed_of[s], out['probs'], out['oof'], args.r['cl_filter'], out.get('aum'))
            pred = out['probs'].argmax(1)
            results['memorise'].setdefault(arch, {})[s] = dict(
                fit_all=float((pred == labels_of[s]).mean()), fit_changed=float((pred == labels_of[s])[changed_of[s]].mean()),
                final=out['final'], oof_acc=float((out['oof'].argmax(1) == true).mean()))
    text = report(args, results, time.perf_counter() - start)
    print('\n' + text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f'written to {args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
