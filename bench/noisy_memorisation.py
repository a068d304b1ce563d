"""The label-noise study where noise hurts: training long enough for cross entropy to memorise the noisy labels.

The sibling of bench/noisy_labels.py (whose short regime barely lets CE fit the noise): here every method trains
until CE has memorised its training labels, so what a method is worth shows as the gap it keeps open between
CE's collapse and CE on the clean labels. Two regimes (--regimes):

  mnist   MNIST, 8,000 training / 2,000 test images: a seeded split of the official test set (the t10k idx
          files of ../shared/data/mnist); where the folder also holds the training files, the official
          60,000 / 10,000 split instead. MLP 784-256-10 (PyTorch's default init), Adam lr 1e-3, batch size 128,
          no augmentation, 60 epochs. Noise: 50 % symmetric, 45 % pair, 40 % asymmetric (MNIST's mapping
          7→1, 2→7, 5↔6, 3→8).
  cifar   CIFAR-10 at CPU scale, bench/noisy_labels.py's memorisation regime: 400 training images per class,
          200 test images per class, the 6-layer Conv-BN-ReLU net at width 16, SGD lr 0.1, momentum 0.9,
          weight decay 5e-4, batch size 128, lr annealed to 0 by a cosine, no augmentation, 24 epochs (CE fits
          100 % of its noisy training labels there). Noise: 50 % symmetric (--noises adds pair / asymmetric).

Rows (--methods), every one from the same initial weights, noisy labels and batch order per seed:
  ce              cross entropy
  ce-clean        cross entropy on the clean labels: the ceiling
  ce-es           cross entropy on 90 % of the noisy training set, the epoch chosen by accuracy on the other
                  10 % (noisy labels): the honest early-stopping baseline; its "final" is the chosen epoch's
  gce, sce        generalized (Zhang & Sabuncu 2018, q 0.7) / symmetric (Wang et al. 2019: MNIST α 0.01, β 1;
                  CIFAR-10 α 0.1, β 1) cross entropy
  hard-boot       hard bootstrapping (Reed et al. 2015, β 0.8)
  mixup           MixUp, α 8, one λ per batch (Zhang et al. 2018's corrupted-label experiment)
  clean-retrain   out-of-fold probabilities (4 folds of CE, the regime's recipe and epochs) -> confident learning
                  (cleanlab, prune_by_noise_rate) -> drop the flagged items -> CE from the seed's initial weights
  elr             early-learning regularization (Liu et al. 2020), β 0.7, λ 3
  coteach, jocor  Co-teaching (Han et al. 2018) and JoCoR (Wei et al. 2020; co_lambda 0.1): two networks, forget
                  rate τ = the fraction of training labels the noise changed (the noise rate the papers assume
                  known), reached linearly over 10 epochs
ELR, Co-teaching and JoCoR are minilearn callbacks (minilearn.ELR, CoTeaching, JoCoR); a method whose callback
the installed minilearn lacks is listed as unavailable.

Scores per run: clean test accuracy after every epoch (the curve, kept in the raw JSON), "final" (the last
epoch), "last-5" (mean of the last 5 epochs) and "best" (the best epoch: an oracle, chosen on the test set,
as papers report it). Methods are compared by the paired difference to CE over seeds (mean, 95 % t-interval)
and by gap closure = (method − CE) / (CE clean − CE) on the 5-seed means. Cost: training seconds per epoch
relative to CE's in the same study (clean-retrain counts its folds; evaluation excluded).

Detection of the changed labels (precision / recall / F1): loss rankings of CE's memorised model and of the
out-of-fold models (top n, n the true count), confident learning on either probabilities, and the area under
the margin (AUM, Pleiss et al. 2020: minilearn.AreaUnderMargin over CE's whole training, lowest n flagged).

Every finished run is saved at once under --raw (one JSON per run, plus a .npz of arrays for CE and
clean-retrain), and a run already there is not run again: an interrupted study resumes. Two processes can
share one --raw folder (--shard 0/2 and --shard 1/2 split the runs by estimated cost, each writes only its
own runs, atomically), or write two folders that a last call merges (--raw a --also-read b --report-only).

    python bench/noisy_memorisation.py --raw bench/noisy_memorisation_raw --out bench/noisy_memorisation.md \
        --figure bench/noisy_memorisation.png
    python bench/noisy_memorisation.py --smoke --raw /tmp/smoke     # generated data, seconds (tested)

Cost on one idle CPU core (1 thread), measured: an MNIST CE run (60 epochs, evaluation included) takes about 13 s,
a CIFAR one (24 epochs) about 35 s; with two networks, folds and the rest, a (noise, seed) cell of 11 rows is about
16.6 CE runs, so the whole study is about 55 min (MNIST, 15 cells) + 47 min (CIFAR, 5 cells) of one core, about
50 min on two processes (--shard 0/2 and 1/2 on the same --raw, then --report-only). A GPU gains little at this size.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))
import minilearn  # noqa: E402
from minilearn.callback import Callback, Order  # noqa: E402
from minilearn.callbacks.device import ChannelsLast, DeviceCallback  # noqa: E402
from minilearn.callbacks.mixup import MixUp  # noqa: E402
from minilearn.callbacks.schedule import ParamScheduler, sched_cos  # noqa: E402
from minilearn.callbacks.transforms import BatchTransformXCallback, Normalize  # noqa: E402
from minilearn.data.core import DataBunch, Dataset  # noqa: E402
from minilearn.data.external import cifar10_data, read_mnist  # noqa: E402
from minilearn.inference import get_preds  # noqa: E402
from minilearn.learner import Learner  # noqa: E402
from minilearn.losses import GeneralizedCrossEntropy, HardBootstrappingLoss, SymmetricCrossEntropy  # noqa: E402
from minilearn.noisy import ASYMMETRIC_MAPPINGS, clean_dataset, find_label_issues, inject_label_noise, \
    out_of_fold_probs  # noqa: E402


def _load_sibling(name: str) -> Any:
    """bench/<name>.py as a module (the bench folder is not a package)."""
    spec = importlib.util.spec_from_file_location(f'_bench_{name}', BENCH / f'{name}.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


base = _load_sibling('noisy_labels')  # paired t-intervals, precision/recall, the bn6 net, the data folder

SHARED_DATA = next((p / 'shared' / 'data' for p in REPO.parents if (p / 'shared' / 'data').is_dir()),
                   REPO.parent / 'shared' / 'data')
ALL_METHODS = ('ce', 'ce-clean', 'ce-es', 'gce', 'sce', 'hard-boot', 'mixup', 'clean-retrain', 'elr', 'coteach',
               'jocor')
LIBRARY_CALLBACKS = {'elr': 'ELR', 'coteach': 'CoTeaching', 'jocor': 'JoCoR', 'aum': 'AreaUnderMargin'}
FIGURE_METHODS = ('ce', 'ce-clean', 'elr', 'coteach', 'jocor')
# Relative cost of a run (CE = 1), to balance shards: two networks, or 4 folds of 3/4 of the data plus a retrain.
METHOD_COST = {'coteach': 2.2, 'jocor': 2.3, 'clean-retrain': 4.0, 'ce-es': 0.9, 'mixup': 1.1, 'elr': 1.1}

REGIMES: dict[str, dict[str, Any]] = {
    'mnist': dict(data='mnist', n_train=8000, n_test=2000, arch='mlp:256', opt='adam', lr=1e-3, momentum=0., wd=0.,
                  bs=128, sched='const', epochs=60, noises='symmetric:0.5,pair:0.45,asymmetric:0.4', gce_q=0.7,
                  sce_alpha=0.01, sce_beta=1.0, hard_beta=0.8, mixup_alpha=8.0, folds=4, elr_beta=0.7, elr_lam=3.0,
                  num_gradual=10, co_lambda=0.1, es_frac=0.1, cost=1.0),  # cost: CPU seconds of an epoch, relative
    'cifar': dict(data='cifar10', n_per_class=400, test_n_per_class=200, arch='bn6:16', opt='sgd', lr=0.1,
                  momentum=0.9, wd=5e-4, bs=128, sched='cos', epochs=24, noises='symmetric:0.5', gce_q=0.7,
                  sce_alpha=0.1, sce_beta=1.0, hard_beta=0.8, mixup_alpha=8.0, folds=4, elr_beta=0.7, elr_lam=3.0,
                  num_gradual=10, co_lambda=0.1, es_frac=0.1, cost=6.5),
}
# Generated data instead of files, tiny nets, a few epochs: the whole pipeline in seconds (tests/).
SMOKE = {'mnist': dict(data='synthetic', size=8, n_per_class=16, test_n_per_class=10, arch='mlp:32', epochs=6,
                       bs=32, num_gradual=2),
         'cifar': dict(data='synthetic', size=8, n_per_class=16, test_n_per_class=10, arch='bn6:4', epochs=6,
                       bs=32, noises='symmetric:0.5', num_gradual=2)}
LAST = 5  # "last-5": the mean of the last 5 epochs


# ---- the methods ----------------------------------------------------------------------------------------
def available(method: str) -> bool:
    """Whether the installed minilearn has what `method` needs (the newer callbacks may be missing)."""
    name = LIBRARY_CALLBACKS.get(method)
    return name is None or name in minilearn.__all__


def method_spec(method: str, r: dict[str, Any]) -> tuple[str, str]:
    """(description, its own hyper-parameters) of a row."""
    return {
        'ce': ('CE', '-'),
        'ce-clean': ('CE on the clean labels (ceiling)', '-'),
        'ce-es': ('CE, epoch chosen on a noisy validation split', f"{r['es_frac']:.0%} of the training items held "
                  f"out with their noisy labels"),
        'gce': ('GCE', f"q={r['gce_q']}"),
        'sce': ('SCE', f"alpha={r['sce_alpha']}, beta={r['sce_beta']}, A=-4"),
        'hard-boot': ('hard bootstrapping', f"beta={r['hard_beta']}"),
        'mixup': ('MixUp', f"alpha={r['mixup_alpha']}, one λ per batch"),
        'clean-retrain': ('clean and retrain', f"{r['folds']} folds of CE, cleanlab prune_by_noise_rate, drop, CE"),
        'elr': ('ELR', f"beta={r['elr_beta']}, lam={r['elr_lam']}"),
        'coteach': ('Co-teaching', f"τ = changed fraction, num_gradual={r['num_gradual']}"),
        'jocor': ('JoCoR', f"τ = changed fraction, co_lambda={r['co_lambda']}, num_gradual={r['num_gradual']}"),
    }[method]


def make_loss(method: str, r: dict[str, Any]) -> nn.Module:
    if method == 'gce': return GeneralizedCrossEntropy(q=r['gce_q'])
    if method == 'sce': return SymmetricCrossEntropy(alpha=r['sce_alpha'], beta=r['sce_beta'])
    if method == 'hard-boot': return HardBootstrappingLoss(beta=r['hard_beta'])
    return nn.CrossEntropyLoss()


def method_callbacks(method: str, r: dict[str, Any], peer: Callable[[], nn.Module], forget_rate: float) -> list:
    if method == 'mixup': return [MixUp(r['mixup_alpha'], per_sample=False)]
    if method == 'elr': return [minilearn.ELR(beta=r['elr_beta'], lam=r['elr_lam'])]
    if method == 'coteach':
        return [minilearn.CoTeaching(peer(), forget_rate, num_gradual=r['num_gradual'])]
    if method == 'jocor':
        return [minilearn.JoCoR(peer(), forget_rate, co_lambda=r['co_lambda'], num_gradual=r['num_gradual'])]
    return []


# ---- models ---------------------------------------------------------------------------------------------
def make_model(arch: str, x_shape: tuple, n_classes: int) -> nn.Module:
    name, width = arch.split(':')
    if name == 'mlp':  # 784-256-10 for MNIST, PyTorch's default initialisation
        return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(x_shape), int(width)), nn.ReLU(),
                             nn.Linear(int(width), n_classes))
    return base.make_model(arch, x_shape[0], n_classes)


# ---- data ------------------------------------------------------------------------------------------------
def parse_noises(text: str) -> list[tuple[str, float]]:
    out = []
    for item in (t.strip() for t in text.split(',') if t.strip()):
        kind, _, ratio = item.partition(':')
        try:
            out.append((kind, float(ratio)))
        except ValueError:
            raise ValueError(f"a noise is kind:ratio, e.g. symmetric:0.5, got {item!r}") from None
    return out


def noise_name(kind: str, ratio: float) -> str:
    return f'{kind}-{round(ratio * 100)}'


def load_regime(regime: str, r: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Training and test tensors (float in [0, 1]) of a regime, its normalization, and the noisy labels per seed."""
    start = time.perf_counter()
    if r['data'] == 'synthetic':  # class prototypes plus noise: learnable in a few steps, memorisable too
        g = torch.Generator().manual_seed(1 if regime == 'mnist' else 2)
        shape = (1, r['size'], r['size']) if regime == 'mnist' else (3, r['size'], r['size'])
        n_train, n = 10 * r['n_per_class'], 10 * (r['n_per_class'] + r['test_n_per_class'])
        prototypes = torch.rand((10,) + shape, generator=g)
        y = torch.arange(n) % 10
        x = (prototypes[y] + 0.6 * torch.randn((n,) + shape, generator=g)).clamp(0, 1)
        train_x, train_y, test_x, test_y = x[:n_train], y[:n_train], x[n_train:], y[n_train:]
        source = 'generated class prototypes plus noise'
    elif r['data'] == 'mnist':
        path = Path(args.mnist_path)
        if any(path.glob('train-images*idx3-ubyte*')):
            (train_x, train_y), (test_x, test_y) = read_mnist(path, 'train'), read_mnist(path, 'test')
            source = f'{path}: the official 60,000 / 10,000 split'
        else:
            x, y = read_mnist(path, 'test')
            order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
            train, test = order[:r['n_train']], order[r['n_train']:r['n_train'] + r['n_test']]
            train_x, train_y, test_x, test_y = x[train], y[train], x[test], y[test]
            source = f'{path}: the official test set split {len(train)} / {len(test)} (seeded)'
        train_x, test_x = train_x.unsqueeze(1).float() / 255, test_x.unsqueeze(1).float() / 255
    else:
        path = Path(args.cifar_path)
        if not path.exists(): raise SystemExit(f"error: CIFAR-10 folder {path} not found (give --cifar-path)")
        sd = cifar10_data(path, n_per_class=r['n_per_class'], valid_n_per_class=r['test_n_per_class'])

        def decode(ll):
            xs, ys = zip(*DataLoader(ll, batch_size=500))
            return torch.cat(xs).float(), torch.cat(ys)
        (train_x, train_y), (test_x, test_y) = decode(sd.train), decode(sd.valid)
        if train_x.max() > 1: train_x, test_x = train_x / 255, test_x / 255
        source = str(path)
    data = dict(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y, n_classes=10, source=source,
                norm=None if regime == 'mnist' else Normalize(train_x.mean((0, 2, 3)), train_x.std((0, 2, 3))))
    data['noisy'] = {}
    for kind, ratio in r['noises']:
        mapping = ('mnist' if regime == 'mnist' else 'cifar10') if kind == 'asymmetric' else None
        for seed in range(args.seeds):
            data['noisy'][noise_name(kind, ratio), seed] = inject_label_noise(
                train_y, ratio, n_classes=10, generator=torch.Generator().manual_seed(seed), kind=kind,
                mapping=mapping)
    data['load_s'] = time.perf_counter() - start
    return data


# ---- one run ------------------------------------------------------------------------------------------------
class EpochCurve(Callback):
    """Per epoch: the training pass's seconds, then clean test accuracy and accuracy on a (noisy) validation split."""
    _order = Order.PROGRESS

    def __init__(self, test_dl: Any, val_dl: Any = None):
        self.test_dl, self.val_dl = test_dl, val_dl
        self.test, self.val, self.train_s = [], [], []

    def begin_epoch(self) -> None:
        self._start = time.perf_counter()

    def after_epoch(self) -> None:
        self.train_s.append(time.perf_counter() - self._start)
        self.test.append(self._accuracy(self.test_dl))
        if self.val_dl is not None: self.val.append(self._accuracy(self.val_dl))

    def _accuracy(self, dl: Any) -> float:
        preds, targets = get_preds(self.run, dl=dl)
        return 100 * (preds.argmax(1) == targets).float().mean().item()


def _loader(x: torch.Tensor, y: torch.Tensor) -> DataLoader:
    return DataLoader(Dataset(x, y), batch_size=1024)


def _loader_seed(seed: int) -> int:
    return 10_000 + seed  # the training loader's shuffling seed: the same batch order for every method of a seed


def make_learner(r: dict[str, Any], data: dict, seed: int, bunch: DataBunch, loss: Any, cbs: list,
                 device: str) -> Learner:
    torch.manual_seed(seed)  # the same initial weights for every method of a seed (a peer draws the next ones)
    model = make_model(r['arch'], tuple(data['train_x'].shape[1:]), data['n_classes'])
    all_cbs = [DeviceCallback(device)] + cbs
    if data['norm'] is not None: all_cbs.append(BatchTransformXCallback(data['norm']))
    if not r['arch'].startswith('mlp'): all_cbs.append(ChannelsLast())
    if r['sched'] == 'cos': all_cbs.append(ParamScheduler('lr', sched_cos(r['lr'], 0.)))
    opt_func = partial(torch.optim.Adam, weight_decay=r['wd']) if r['opt'] == 'adam' else \
        partial(torch.optim.SGD, momentum=r['momentum'], weight_decay=r['wd'])
    return Learner(model, bunch, loss, opt_func=opt_func, lr=r['lr'], cbs=all_cbs)


def train(r: dict[str, Any], data: dict, seed: int, x: torch.Tensor, y: torch.Tensor, method: str, device: str,
          forget_rate: float = 0., val: tuple | None = None, in_sample: bool = False, aum: bool = False) -> dict:
    """Train one method from the seed's initial weights; its per-epoch curves, and arrays for detection."""
    bunch = DataBunch.from_tensors(x, y, bs=r['bs'], c_out=data['n_classes'], seed=_loader_seed(seed))
    curve = EpochCurve(_loader(data['test_x'], data['test_y']), None if val is None else _loader(*val))
    shape = tuple(data['train_x'].shape[1:])
    peer = partial(make_model, r['arch'], shape, data['n_classes'])
    cbs = method_callbacks(method, r, peer, forget_rate) + [curve]
    area = minilearn.AreaUnderMargin() if aum else None
    if area is not None: cbs.append(area)
    learn = make_learner(r, data, seed, bunch, make_loss(method, r), cbs, device)
    learn.fit(r['epochs'])
    out: dict[str, Any] = dict(test=curve.test, train_s=curve.train_s)
    if val is not None: out['val'] = curve.val
    arrays = {}
    if in_sample: arrays['probs'] = get_preds(learn, dl=_loader(x, y))[0].numpy()
    if area is not None: arrays['aum'] = torch.as_tensor(area.scores).cpu().numpy()
    return dict(out, arrays=arrays)


def oof(r: dict[str, Any], data: dict, seed: int, y: torch.Tensor, device: str) -> tuple[np.ndarray, float]:
    """Out-of-fold probabilities of the noisy training set (CE folds, the regime's recipe), their training seconds."""
    seconds = []

    def make(bunch: DataBunch) -> Learner:
        rows = torch.as_tensor(bunch.train_ds.indices)  # the fold's training items, gathered from memory
        bunch.train_dl = DataBunch.from_tensors(data['train_x'][rows], y[rows], bs=r['bs'],
                                                seed=_loader_seed(seed)).train_dl
        timer = EpochCurve(_loader(data['test_x'][:1], data['test_y'][:1]))
        seconds.append(timer.train_s)
        return make_learner(r, data, seed, bunch, nn.CrossEntropyLoss(), [timer], device)
    probs = out_of_fold_probs(make, Dataset(data['train_x'], y), k=r['folds'], epochs=r['epochs'], bs=r['bs'],
                              seed=seed, progress=False).numpy()
    return probs, sum(sum(s) for s in seconds)


def run_one(regime: str, r: dict[str, Any], data: dict, noise: str, seed: int, method: str, device: str) -> dict:
    noisy = data['noisy'][noise, seed]
    x, y = data['train_x'], noisy.labels
    forget_rate = float(noisy.changed.float().mean())
    if method == 'ce-clean':
        return train(r, data, seed, x, data['train_y'], 'ce', device)
    if method == 'ce':
        return train(r, data, seed, x, y, 'ce', device, in_sample=True, aum=available('aum'))
    if method == 'ce-es':
        order = torch.randperm(len(y), generator=torch.Generator().manual_seed(20_000 + seed))
        n_val = round(len(y) * r['es_frac'])
        held, kept = order[:n_val], order[n_val:]
        out = train(r, data, seed, x[kept], y[kept], 'ce', device, val=(x[held], y[held]))
        out['chosen_epoch'] = int(np.argmax(out['val']))  # the first epoch of the best noisy validation accuracy
        return out
    if method == 'clean-retrain':
        probs, fold_s = oof(r, data, seed, y, device)
        mask = find_label_issues(labels=y, pred_probs=probs, filter_by='prune_by_noise_rate')
        kept = torch.as_tensor(clean_dataset(Dataset(x, y), mask).indices, dtype=torch.long)
        out = train(r, data, seed, x[kept], y[kept], 'ce', device)
        out.update(n_dropped=int(mask.sum()), fold_s=fold_s,
                   dropped_noisy=int((mask & noisy.changed).sum()))
        out['arrays']['oof'] = probs
        return out
    return train(r, data, seed, x, y, method, device, forget_rate=forget_rate)


def scores(out: dict, method: str) -> dict[str, float]:
    test = out['test']
    final = test[out['chosen_epoch']] if method == 'ce-es' else test[-1]
    return dict(final=final, last5=statistics.mean(test[-LAST:]), best=max(test))


# ---- saving and resuming ------------------------------------------------------------------------------------
def run_key(task: tuple) -> str:
    return '__'.join(map(str, task))


def config_of(regime: str, r: dict[str, Any], args: argparse.Namespace) -> dict:
    """What a saved run depends on besides its (regime, noise, seed, method) key."""
    return dict(regime=regime, recipe={k: v for k, v in r.items() if k not in ('noises', 'cost')},
                smoke=args.smoke, mnist_path=str(args.mnist_path) if r['data'] == 'mnist' else None)


def save_run(folder: Path, task: tuple, config: dict, out: dict, seconds: float) -> None:
    """One JSON per run (curves, scores, timing) and a .npz of its arrays, each written atomically."""
    folder.mkdir(parents=True, exist_ok=True)
    key, arrays = run_key(task), out.pop('arrays', {})
    if arrays:
        tmp = folder / f'{key}.tmp.npz'
        np.savez(tmp, **arrays)
        os.replace(tmp, folder / f'{key}.npz')
    record = dict(task=list(task), config=config, seconds=seconds, out=out, arrays=sorted(arrays),
                  versions=dict(minilearn=minilearn.__version__, torch=torch.__version__,
                                threads=torch.get_num_threads()))
    tmp = folder / f'{key}.json.tmp'
    tmp.write_text(json.dumps(record))
    os.replace(tmp, folder / f'{key}.json')  # the JSON last: a run counts as done once its JSON is there


def load_run(folders: list[Path], task: tuple, config: dict) -> dict | None:
    for folder in folders:
        path = folder / f'{run_key(task)}.json'
        if not path.is_file(): continue
        record = json.loads(path.read_text())
        if record['config'] != config:
            raise SystemExit(f"error: {path} is a run of another configuration ({record['config']}, this study: "
                             f"{config}); give another --raw folder or delete it")
        out = dict(record['out'], seconds=record['seconds'])
        if record['arrays']:
            with np.load(folder / f'{run_key(task)}.npz', allow_pickle=False) as arrays:
                out['arrays'] = {k: arrays[k] for k in record['arrays']}
        return out
    return None


def shard_of(tasks: list[tuple], regimes: dict[str, dict], n: int) -> dict[tuple, int]:
    """Each task's shard: in the study's order, to the shard with the least estimated work so far."""
    load, owner = [0.] * n, {}
    for task in tasks:
        i = load.index(min(load))
        owner[task] = i
        load[i] += regimes[task[0]]['cost'] * regimes[task[0]]['epochs'] * METHOD_COST.get(task[3], 1.)
    return owner


# ---- statistics, detection, the report ---------------------------------------------------------------------------
MIN_GAP = 0.5  # points: below this the ceiling is not above CE and a closure is noise divided by noise


def gap_closure(method: float, ce: float, clean: float) -> float:
    """(method − CE) / (CE clean − CE): 0 is CE, 1 closes the gap to the clean-label ceiling; NaN without a gap."""
    return (method - ce) / (clean - ce) if clean - ce >= MIN_GAP else float('nan')


def detections(labels: np.ndarray, changed: np.ndarray, ce: dict, cr: dict | None) -> dict[str, tuple]:
    n_true, idx = int(changed.sum()), np.arange(len(labels))

    def lowest(score: np.ndarray) -> np.ndarray:
        flagged = np.zeros(len(labels), dtype=bool)
        flagged[np.argsort(score, kind='stable')[:n_true]] = True
        return flagged

    def loss_rank(probs: np.ndarray) -> np.ndarray:
        return lowest(np.log(np.clip(probs[idx, labels], 1e-12, None)))  # lowest log-probability = highest loss

    def cl(probs: np.ndarray) -> np.ndarray:
        return find_label_issues(labels=labels, pred_probs=probs, filter_by='prune_by_noise_rate').numpy()
    arrays = ce['arrays']
    out = {'in-sample loss ranking (true count)': base.prf(loss_rank(arrays['probs']), changed)}
    if cr is not None: out['out-of-fold loss ranking (true count)'] = base.prf(loss_rank(cr['arrays']['oof']), changed)
    if 'aum' in arrays: out['AUM ranking, lowest first (true count)'] = base.prf(lowest(arrays['aum']), changed)
    if cr is not None: out['confident learning, out-of-fold probs'] = base.prf(cl(cr['arrays']['oof']), changed)
    out['confident learning, in-sample probs'] = base.prf(cl(arrays['probs']), changed)
    return out


def cost_ratio(runs: list[dict], ce_runs: list[dict]) -> float:
    """Training seconds per epoch relative to CE's (same seeds): folds included, evaluation excluded."""
    def per_epoch(o: dict) -> float:
        return (sum(o['train_s']) + o.get('fold_s', 0.)) / len(o['train_s'])
    return statistics.mean(per_epoch(o) for o in runs) / statistics.mean(per_epoch(o) for o in ce_runs)


def fmt(v: float, spec: str = '.2f') -> str:
    return '' if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def report(args: argparse.Namespace, regimes: dict, datas: dict, raw: dict, total_s: float) -> tuple[str, dict]:
    lines = ['# Label noise where it hurts: the memorisation regime', '',
             f'{args.seeds} seeds (0..{args.seeds - 1}); a seed fixes the noise, the initial weights (a second '
             f'network draws the next ones) and the batch order of every method. Clean test accuracy (%): final '
             f'(last epoch; for "CE, epoch chosen..." the chosen epoch), last-{LAST} (mean of the last {LAST} '
             f'epochs), best (the best epoch: an oracle chosen on the test set, as papers report it). Δ: paired '
             f'difference to CE, mean [95 % t-interval], * when it excludes 0. Gap closure: (method − CE) / '
             f'(CE clean − CE) on the means. Cost: training seconds per epoch relative to CE.', '']
    summary: dict[str, Any] = {}
    for regime, r in regimes.items():
        data = datas[regime]
        lines += [f'## {regime}: {data["source"]}', '',
                  f'{len(data["train_y"])} training, {len(data["test_y"])} test images; {describe(r, data)}.', '']
        for kind, ratio in r['noises']:
            noise = noise_name(kind, ratio)
            changed = statistics.mean(float(data['noisy'][noise, s].changed.float().mean()) for s in range(args.seeds))
            lines += [f'### {regime}, {ratio:.0%} {kind} noise ({changed:.1%} of the training labels changed)', '',
                      '| method | its hyper-parameters | final | last-5 | best (oracle) | Δ final vs CE | '
                      'Δ last-5 vs CE | gap closure, final / last-5 | cost per epoch vs CE |',
                      '|---|---|---|---|---|---|---|---|---|']
            runs = {m: [raw.get((regime, noise, s, m)) for s in range(args.seeds)] for m in args.methods}
            runs = {m: v for m, v in runs.items() if all(o is not None for o in v)}
            sc = {m: [scores(o, m) for o in v] for m, v in runs.items()}
            mean = {m: {k: statistics.mean(s[k] for s in v) for k in ('final', 'last5', 'best')} for m, v in sc.items()}
            summary[regime, noise] = mean
            for m in args.methods:
                if m not in runs: continue
                desc, hp = method_spec(m, r)
                if m == 'clean-retrain':
                    dropped = statistics.mean(o['n_dropped'] for o in runs[m])
                    desc += f' (dropped {dropped:.0f} of {len(data["train_y"])})'
                if m == 'ce-es':
                    desc += f" (epoch {statistics.mean(o['chosen_epoch'] + 1 for o in runs[m]):.0f} on average)"
                cells = [f"{base.mean_std([s[k] for s in sc[m]])}" for k in ('final', 'last5', 'best')]
                d_final = d_last5 = gap = cost = ''
                if 'ce' in runs and m != 'ce':
                    d_final = base.paired([s['final'] for s in sc[m]], [s['final'] for s in sc['ce']])
                    d_last5 = base.paired([s['last5'] for s in sc[m]], [s['last5'] for s in sc['ce']])
                if 'ce' in runs:
                    cost = f"{cost_ratio(runs[m], runs['ce']):.2f}"
                    if 'ce-clean' in runs and m not in ('ce', 'ce-clean'):
                        gap = ' / '.join(fmt(gap_closure(mean[m][k], mean['ce'][k], mean['ce-clean'][k]), '.0%')
                                         or 'no gap' for k in ('final', 'last5'))
                lines.append(f'| {desc} | {hp} | {" | ".join(cells)} | {d_final} | {d_last5} | {gap} | {cost} |')
            # Which method leads is a paired question too: each of the top three against the next one.
            ranked = sorted((m for m in sc if m != 'ce-clean'), key=lambda m: -mean[m]['final'])[:3]
            steps = [f"{method_spec(a, r)[0]} − {method_spec(b, r)[0]}: "
                     f"{base.paired([s['final'] for s in sc[a]], [s['final'] for s in sc[b]])}"
                     for a, b in zip(ranked, ranked[1:])]
            if steps: lines += ['', 'The leaders by final accuracy, each against the next, paired: ' + '; '.join(steps)]
            lines.append('')
    lines += detection_section(args, regimes, datas, raw)
    missing = [m for m in ALL_METHODS if not available(m)]
    if missing or not available('aum'):
        lines += ['', 'Not in the installed minilearn, so not run: ' +
                  ', '.join([LIBRARY_CALLBACKS[m] for m in missing] +
                            ([] if available('aum') else ['AreaUnderMargin (the AUM detector)'])) + '.']
    run_s = sum(o['seconds'] for o in raw.values())
    lines += ['', f'Command: `python bench/noisy_memorisation.py {shlex.join(args.argv)}`',
              f'Versions: minilearn {minilearn.__version__}, torch {torch.__version__}, Python '
              f'{platform.python_version()}; {args.device}, {args.threads} thread(s) per process, {os.cpu_count()} '
              f'cores visible; the runs took {run_s / 60:.1f} min in all (summed over processes); this invocation '
              f'{total_s / 60:.1f} min.', '']
    return '\n'.join(lines), summary


def describe(r: dict[str, Any], data: dict) -> str:
    opt = 'Adam' if r['opt'] == 'adam' else f"SGD momentum {r['momentum']}"
    sched = 'constant lr' if r['sched'] == 'const' else 'lr annealed to 0 by a cosine'
    arch = 'MLP ' + '-'.join(map(str, (math.prod(data['train_x'].shape[1:]), r['arch'].split(':')[1], 10))) \
        if r['arch'].startswith('mlp') else base.describe_arch(r['arch'])
    return (f"{arch}; {opt}, lr {r['lr']}, weight decay {r['wd']}, batch size {r['bs']}, {r['epochs']} epochs, "
            f"{sched}, no augmentation")


def detection_section(args: argparse.Namespace, regimes: dict, datas: dict, raw: dict) -> list[str]:
    lines = ['## Detecting the changed labels: precision / recall / F1 (flagged count), mean over seeds', '',
             'In-sample: CE\'s model after its last epoch (memorised) on its own training items; out-of-fold: the '
             'clean-and-retrain folds; AUM: the area under the margin over CE\'s whole training; confident learning: '
             'cleanlab, filter_by=prune_by_noise_rate. Rankings flag as many items as the noise changed.', '',
             '| regime | noise | detector | precision | recall | F1 | flagged (true) | CE fit of its labels, all / '
             'changed |', '|---|---|---|---|---|---|---|---|']
    for regime, r in regimes.items():
        data = datas[regime]
        for kind, ratio in r['noises']:
            noise = noise_name(kind, ratio)
            per_seed, fits = [], []
            for s in range(args.seeds):
                ce, cr = raw.get((regime, noise, s, 'ce')), raw.get((regime, noise, s, 'clean-retrain'))
                if ce is None: continue
                noisy = data['noisy'][noise, s]
                labels, changed = noisy.labels.numpy(), noisy.changed.numpy()
                per_seed.append(detections(labels, changed, ce, cr))
                fit = ce['arrays']['probs'].argmax(1) == labels
                fits.append((fit.mean(), fit[changed].mean() if changed.any() else float('nan')))
            if not per_seed: continue
            n_true = statistics.mean(float(data['noisy'][noise, s].changed.sum()) for s in range(len(per_seed)))
            fit_all, fit_changed = np.mean(fits, 0)
            for det in per_seed[0]:
                p, rc, f1, n = np.mean([d[det] for d in per_seed if det in d], 0)
                lines.append(f'| {regime} | {noise} | {det} | {p:.3f} | {rc:.3f} | {f1:.3f} | {n:.0f} ({n_true:.0f}) '
                             f'| {fit_all:.1%} / {fit_changed:.1%} |')
    return lines + ['']


def curves_json(regimes: dict, raw: dict, seeds: int) -> dict:
    """Every run's per-epoch clean test accuracy (and noisy validation accuracy), keyed regime/noise/method."""
    out: dict[str, Any] = {}
    for (regime, noise, seed, method), o in sorted(raw.items()):
        entry = out.setdefault(regime, {}).setdefault(noise, {}).setdefault(method, {})
        entry[str(seed)] = {k: o[k] for k in ('test', 'val', 'train_s') if k in o}
    return out


def figure(regimes: dict, raw: dict, seeds: int, path: Path) -> None:
    """Clean test accuracy per epoch at 50 % symmetric noise: the memorisation curve, mean over seeds ± std."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    panels = [(regime, noise_name(k, v)) for regime, r in regimes.items() for k, v in r['noises']
              if (k, v) == ('symmetric', 0.5)]
    if not panels: return
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (regime, noise) in zip(axes[0], panels):
        for method in FIGURE_METHODS:
            runs = [raw.get((regime, noise, s, method)) for s in range(seeds)]
            if any(o is None for o in runs): continue
            curves = np.array([o['test'] for o in runs])
            epochs = np.arange(1, curves.shape[1] + 1)
            line, = ax.plot(epochs, curves.mean(0), label=method_spec(method, regimes[regime])[0])
            if len(runs) > 1:
                ax.fill_between(epochs, curves.mean(0) - curves.std(0), curves.mean(0) + curves.std(0),
                                color=line.get_color(), alpha=0.2)
        ax.set(title=f'{regime}, 50 % symmetric noise ({seeds} seed{"s" if seeds > 1 else ""})', xlabel='epoch',
               ylabel='clean test accuracy (%)')
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- command line -----------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    head, rest = __doc__.split('\n\n', 1)
    p = argparse.ArgumentParser(description=head, formatter_class=argparse.RawDescriptionHelpFormatter, epilog=rest)
    p.add_argument('--regimes', default='mnist,cifar', help='comma-separated from mnist, cifar')
    p.add_argument('--smoke', action='store_true', help='generated data, tiny nets, a few epochs (seconds)')
    p.add_argument('--seeds', type=int, default=None, help='default 5 (smoke: 2)')
    p.add_argument('--methods', default=None, help=f'comma-separated from {", ".join(ALL_METHODS)} (default: all '
                                                   f'the installed minilearn has)')
    p.add_argument('--noises', default=None, help="override every regime's noises, e.g. symmetric:0.5,pair:0.45")
    p.add_argument('--epochs', type=int, default=None, help="override every regime's epochs")
    p.add_argument('--mnist-path', default=str(SHARED_DATA / 'mnist'),
                   help='MNIST idx files (t10k only: split 8,000 / 2,000; with the train files: the official split)')
    p.add_argument('--cifar-path', default=str(SHARED_DATA / 'cifar10'))
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=1, help='torch threads (1: one process per core)')
    p.add_argument('--raw', required=True, help='folder of the finished runs (one JSON each): runs in it are not run '
                                                'again, new ones are written to it')
    p.add_argument('--also-read', action='append', default=[], metavar='FOLDER',
                   help='more folders of finished runs (read only), e.g. another process\'s --raw, to merge')
    p.add_argument('--shard', default='0/1', help='i/n: run only this process\'s share of the runs (n processes '
                                                 'sharing one --raw folder, e.g. 0/2 and 1/2)')
    p.add_argument('--report-only', action='store_true', help='run nothing: the report from the runs saved')
    p.add_argument('--out', help='write the markdown report here (and <out>.curves.json)')
    p.add_argument('--figure', default=None, help='the memorisation-curve PNG (default: beside --out)')
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.seeds is None: args.seeds = 2 if args.smoke else 5
    if args.seeds < 1: p.error('--seeds must be at least 1')
    try:
        i, n = map(int, args.shard.split('/'))
        if not 0 <= i < n: raise ValueError
    except ValueError:
        p.error(f'--shard is i/n with 0 <= i < n, got {args.shard!r}')
    args.shard = (i, n)
    args.regime_names = [g.strip() for g in args.regimes.split(',') if g.strip()]
    unknown = [g for g in args.regime_names if g not in REGIMES]
    if unknown or not args.regime_names: p.error(f'--regimes are from {", ".join(REGIMES)}, got {args.regimes!r}')
    names = [m for m in ALL_METHODS if available(m)] if args.methods is None else \
        [m.strip() for m in args.methods.split(',') if m.strip()]
    bad = [m for m in names if m not in ALL_METHODS]
    if bad: p.error(f"unknown method(s) {bad}; choose from {', '.join(ALL_METHODS)}")
    missing = [m for m in names if not available(m)]
    if missing:
        p.error(f"method(s) {missing} need minilearn.{', minilearn.'.join(LIBRARY_CALLBACKS[m] for m in missing)}, "
                f"which the installed minilearn lacks")
    args.methods = names
    args.regimes_cfg = {}
    for g in args.regime_names:
        r = dict(REGIMES[g], **(SMOKE[g] if args.smoke else {}))
        if args.noises: r['noises'] = args.noises
        if args.epochs: r['epochs'] = args.epochs
        try:
            r['noises'] = parse_noises(r['noises'])
            for kind, ratio in r['noises']:  # the library's own checks, before any data is read or run made
                inject_label_noise(torch.arange(10), ratio, kind=kind,
                                   mapping=('mnist' if g == 'mnist' else 'cifar10') if kind == 'asymmetric' else None)
        except ValueError as e:
            p.error(f'--noises: {e}')
        if r['epochs'] < LAST: p.error(f'--epochs must be at least {LAST} (the last-{LAST} score)')
        args.regimes_cfg[g] = r
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    regimes = args.regimes_cfg
    datas = {g: load_regime(g, r, args) for g, r in regimes.items()}
    for g, data in datas.items():
        print(f'{g}: {len(data["train_y"])} training, {len(data["test_y"])} test items from {data["source"]} '
              f'({data["load_s"]:.1f} s)', flush=True)
    # seed-major (an interrupted study has whole seeds), then regime, noise, and the longest runs first
    tasks = [(g, noise_name(*nz), s, m) for s in range(args.seeds) for g, r in regimes.items() for nz in r['noises']
             for m in sorted(args.methods, key=lambda m: -METHOD_COST.get(m, 1.))]
    configs = {g: config_of(g, r, args) for g, r in regimes.items()}
    folder = Path(args.raw)
    folders = [folder] + [Path(f) for f in args.also_read]
    raw = {t: o for t in tasks if (o := load_run(folders, t, configs[t[0]])) is not None}
    owner = shard_of(tasks, regimes, args.shard[1])
    todo = [t for t in tasks if t not in raw and owner[t] == args.shard[0]] if not args.report_only else []
    print(f'{len(raw)} of {len(tasks)} runs already saved; this process runs {len(todo)} '
          f'(shard {args.shard[0]}/{args.shard[1]})', flush=True)
    for done, task in enumerate(todo, 1):
        regime, noise, seed, method = task
        t0 = time.perf_counter()
        out = run_one(regime, regimes[regime], datas[regime], noise, seed, method, args.device)
        seconds = time.perf_counter() - t0
        arrays = dict(out.get('arrays', {}))
        save_run(folder, task, configs[regime], out, seconds)
        raw[task] = dict(out, arrays=arrays, seconds=seconds)
        s = scores(out, method)
        print(f'[{done:>3}/{len(todo)}] {" ".join(map(str, task)):<44} final {s["final"]:6.2f}  last-5 '
              f'{s["last5"]:6.2f}  best {s["best"]:6.2f}  ({seconds:.0f} s, {(time.perf_counter() - start) / 60:.1f} '
              f'min)', flush=True)
    left = [t for t in tasks if t not in raw]
    if left:
        print(f'{len(left)} runs are not saved yet (other shards, or an interrupted study): when every process has '
              f'finished, run again with --report-only (and --also-read for other folders)', flush=True)
        return 0
    text, _ = report(args, regimes, datas, raw, time.perf_counter() - start)
    print('\n' + text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix('.curves.json').write_text(json.dumps(curves_json(regimes, raw, args.seeds)))
        print(f'written to {out} and {out.with_suffix(".curves.json")}')
    fig_path = Path(args.figure) if args.figure else Path(args.out).with_suffix('.png') if args.out else None
    if fig_path is not None:
        figure(regimes, raw, args.seeds, fig_path)
        print(f'figure: {fig_path}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
