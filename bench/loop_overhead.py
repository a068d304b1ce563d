"""Per-batch cost of minilearn's training loop against a hand-written PyTorch loop.

Variants, each training the same small CNN (same initial weights) with SGD on the same in-memory
batches, run interleaved round by round so machine noise hits all alike:
  (a)  raw       hand-written PyTorch loop (and `raw_again`, a second copy: its ratio is the noise floor)
  (b)  minilearn Learner with only its default callbacks
  (c)  minilearn + AvgStatsCallback(accuracy) + Recorder + ProgressCallback (output discarded)
  (c') (c) with whole-pass metrics too: AvgStatsCallback([accuracy, f1_score(), balanced_accuracy()])
  (a') raw_mix   (a) with MixUp and label-smoothed cross entropy written by hand
  (d)  minilearn (b) + MixUp + LabelSmoothingCrossEntropy: the regularizers' cost against their twin (a'),
       without the metrics, which (a') does not compute
  (a'') raw_cutmix (a) with CutMix written by hand the usual way (timm's): λ and the box drawn on the
       host from torch's CPU generator and read as ints, the box pasted by slicing
  (e)  minilearn (b) + CutMix + LabelSmoothingCrossEntropy against (a''): the cost of the device-side mask
  (f)  minilearn (b) + MixUpCutMix + LabelSmoothingCrossEntropy, shown against (a') for scale
  fastai / lightning at their leanest, when installed.
Prints the median ms/batch over the rounds, the median over rounds of the ratio to (a) (for (d): to
(a')), and for minilearn the time per batch spent inside its per-batch events, callbacks included (one
extra epoch, timed event by event: the loop's own cost, free of the noise of the whole-epoch ratios;
for (d) it includes MixUp's sampling and mixing, which (a') does by hand too).
Targets: (b) ≤ 1.02×; (c) and (c') ≤ 1.03× at bs 64 and ≤ 1.06× at bs 16; (d) ≤ 1.05× (a');
(e) ≤ 1.05× (a'').

    python bench/loop_overhead.py                       # full run
    python bench/loop_overhead.py --rounds 5 --batches 50   # quick look
    python bench/loop_overhead.py --threads 1 --clock cpu   # on a busy shared CPU machine
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from _common import add_run_options, start_run
from minilearn.callbacks.metrics import AvgStatsCallback, accuracy, balanced_accuracy, f1_score
from minilearn.callbacks.mixup import CutMix, MixUp, MixUpCutMix
from minilearn.callbacks.progress import ProgressCallback
from minilearn.callbacks.recorder import Recorder
from minilearn.data.core import DataBunch
from minilearn.learner import Learner
from minilearn.losses import LabelSmoothingCrossEntropy

EPS, ALPHA, LR = 0.1, 0.4, 0.01


class InMemoryBatches:
    """Precomputed (xb, yb) batches on the device: the loop is measured, not the DataLoader."""

    def __init__(self, batches: list):
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def small_cnn(n_classes: int = 10) -> nn.Module:
    def conv(c_in, c_out): return [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.ReLU()]
    return nn.Sequential(*conv(1, 8), *conv(8, 16), *conv(16, 32), *conv(32, 32),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, n_classes))


def make_batches(bs: int, n_batches: int, device: torch.device) -> InMemoryBatches:
    g = torch.Generator().manual_seed(0)
    return InMemoryBatches([(torch.randn(bs, 1, 28, 28, generator=g).to(device),
                             torch.randint(0, 10, (bs,), generator=g).to(device)) for _ in range(n_batches)])


def new_model(device: torch.device) -> nn.Module:
    torch.manual_seed(0)
    return small_cnn().to(device)


# ---- the hand-written loops -------------------------------------------------------------------------------
class RawLoop:
    def __init__(self, batches, device, mix: str | None = None):
        self.batches, self.mix = batches, mix  # None, 'mixup' or 'cutmix'
        self.model = new_model(device)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=LR)
        self.beta = torch.distributions.Beta(torch.tensor(ALPHA, device=device), torch.tensor(ALPHA, device=device))
        self.cpu_beta = torch.distributions.Beta(torch.tensor(1.), torch.tensor(1.))

    def epoch(self) -> None:
        model, opt = self.model, self.opt
        model.train()
        for xb, yb in self.batches:
            if self.mix == 'cutmix':
                h, w = xb.shape[-2:]
                side = math.sqrt(1 - self.cpu_beta.sample().item())
                cut_h, cut_w = round(h * side), round(w * side)
                cy, cx = torch.randint(h, ()).item(), torch.randint(w, ()).item()
                top, left = max(cy - cut_h // 2, 0), max(cx - cut_w // 2, 0)
                bottom, right = min(cy - cut_h // 2 + cut_h, h), min(cx - cut_w // 2 + cut_w, w)
                perm = torch.randperm(xb.shape[0], device=xb.device)
                xb = xb.clone()
                xb[:, :, top:bottom, left:right] = xb[perm, :, top:bottom, left:right]
                lam = 1 - (bottom - top) * (right - left) / (h * w)
                pred = model(xb)
                loss1 = F.cross_entropy(pred, yb, label_smoothing=EPS, reduction='none')
                loss2 = F.cross_entropy(pred, yb[perm], label_smoothing=EPS, reduction='none')
                loss = (lam * loss1 + (1 - lam) * loss2).mean()
            elif self.mix == 'mixup':
                lam = self.beta.sample((xb.shape[0],))
                lam = torch.maximum(lam, 1 - lam)
                perm = torch.randperm(xb.shape[0], device=xb.device)
                xb = torch.lerp(xb[perm], xb, lam.view(-1, 1, 1, 1))
                pred = model(xb)
                loss1 = F.cross_entropy(pred, yb, label_smoothing=EPS, reduction='none')
                loss2 = F.cross_entropy(pred, yb[perm], label_smoothing=EPS, reduction='none')
                loss = torch.lerp(loss2, loss1, lam).mean()
            else:
                loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            opt.zero_grad()


class MinilearnLoop:
    def __init__(self, batches, device, cbs_factory, loss_func=F.cross_entropy):
        self.cbs_factory = cbs_factory
        self.learn = Learner(new_model(device), DataBunch(batches, None), loss_func, lr=LR)
        self.learn.logger = lambda *args: None

    def epoch(self) -> None:
        self.learn.fit(1, cbs=self.cbs_factory())


def quiet_progress() -> ProgressCallback:
    return ProgressCallback(interactive=True)  # bars drawn (throttled); stdout goes to /dev/null


def with_stats() -> list:
    return [AvgStatsCallback([accuracy]), Recorder(), quiet_progress()]


def with_epoch_metrics() -> list:
    return [AvgStatsCallback([accuracy, f1_score(), balanced_accuracy()]), Recorder(), quiet_progress()]


# ---- other frameworks at their leanest (only when installed) ----------------------------------------------
class FastaiLoop:
    def __init__(self, batches, device):
        from fastai.callback.progress import ProgressCallback as FastaiProgress
        from fastai.data.core import DataLoaders
        from fastai.learner import Learner as FastaiLearner, Recorder as FastaiRecorder
        from fastai.optimizer import OptimWrapper
        self.learn = FastaiLearner(DataLoaders(batches, InMemoryBatches([]), device=device), new_model(device),
                                   loss_func=F.cross_entropy, opt_func=partial(OptimWrapper, opt=torch.optim.SGD),
                                   lr=LR)
        self.learn.remove_cbs([cb for cb in self.learn.cbs if isinstance(cb, (FastaiProgress, FastaiRecorder))])

    def epoch(self) -> None:
        with self.learn.no_logging(): self.learn.fit(1)


class LightningLoop:
    def __init__(self, batches, device):
        import lightning as L

        class Module(L.LightningModule):
            def __init__(self):
                super().__init__()
                self.model = new_model(device)

            def training_step(self, batch, batch_idx):
                xb, yb = batch
                return F.cross_entropy(self.model(xb), yb)

            def configure_optimizers(self):
                return torch.optim.SGD(self.parameters(), lr=LR)

        self.L, self.module, self.batches, self.device = L, Module(), batches, device

    def epoch(self) -> None:
        trainer = self.L.Trainer(max_epochs=1, accelerator='gpu' if self.device.type == 'cuda' else 'cpu',
                                 devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0)
        trainer.fit(self.module, train_dataloaders=self.batches)


# ---- measurement ------------------------------------------------------------------------------------------
def make_variants(batches, device, only: set[str] | None) -> tuple[dict, dict]:
    builders = {
        'raw': lambda: RawLoop(batches, device),
        'raw_again': lambda: RawLoop(batches, device),  # (a) twice: its ratio shows the measurement noise
        'minilearn': lambda: MinilearnLoop(batches, device, list),
        'minilearn+stats': lambda: MinilearnLoop(batches, device, with_stats),
        'minilearn+epoch_metrics': lambda: MinilearnLoop(batches, device, with_epoch_metrics),
        'raw_mix': lambda: RawLoop(batches, device, mix='mixup'),
        'minilearn+mix': lambda: MinilearnLoop(batches, device, lambda: [MixUp(ALPHA)],
                                               LabelSmoothingCrossEntropy(EPS)),
        'raw_cutmix': lambda: RawLoop(batches, device, mix='cutmix'),
        'minilearn+cutmix': lambda: MinilearnLoop(batches, device, lambda: [CutMix(1.0)],
                                                  LabelSmoothingCrossEntropy(EPS)),
        'minilearn+mixcut': lambda: MinilearnLoop(batches, device, lambda: [MixUpCutMix(ALPHA, 1.0)],
                                                  LabelSmoothingCrossEntropy(EPS)),
        'fastai': lambda: FastaiLoop(batches, device),
        'lightning': lambda: LightningLoop(batches, device),
    }
    variants, missing = {}, {}
    for name, build in builders.items():
        if only and name not in only: continue
        try:
            variants[name] = build()
        except ImportError as e:
            missing[name] = f'not installed ({e.name})'
    return variants, missing


def timed_epoch(loop, device: torch.device, clock) -> float:
    if device.type == 'cuda': torch.cuda.synchronize()
    start = clock()
    loop.epoch()
    if device.type == 'cuda': torch.cuda.synchronize()
    return clock() - start


BATCH_EVENTS = ('begin_batch', 'after_pred', 'after_loss', 'after_backward', 'after_step', 'after_cancel_batch',
                'after_batch')


def event_time(loop: MinilearnLoop, device: torch.device) -> float:
    """Seconds spent inside the learner's per-batch events (every callback included) during one epoch.

    A figure that machine noise hardly touches: the ratios above compare whole epochs.
    """
    spent = 0.
    dispatch = Learner.__call__

    def timed(learn, event_name):
        nonlocal spent
        if event_name not in BATCH_EVENTS: return dispatch(learn, event_name)
        start = time.perf_counter()
        try:
            return dispatch(learn, event_name)
        finally:
            if device.type == 'cuda': torch.cuda.synchronize()
            spent += time.perf_counter() - start

    Learner.__call__ = timed
    try:
        loop.epoch()
    finally:
        Learner.__call__ = dispatch
    return spent


BASELINES = {'raw_again': 'raw', 'minilearn': 'raw', 'minilearn+stats': 'raw', 'minilearn+epoch_metrics': 'raw',
             'fastai': 'raw', 'lightning': 'raw', 'minilearn+mix': 'raw_mix', 'minilearn+cutmix': 'raw_cutmix',
             'minilearn+mixcut': 'raw_mix'}
TARGETS = {('minilearn', None): 1.02, ('minilearn+stats', 64): 1.03, ('minilearn+stats', 16): 1.06,
           ('minilearn+epoch_metrics', 64): 1.03, ('minilearn+epoch_metrics', 16): 1.06, ('minilearn+mix', None): 1.05,
           ('minilearn+cutmix', None): 1.05}


def target_for(name: str, bs: int) -> float | None:
    return TARGETS.get((name, bs), TARGETS.get((name, None)))


def bench_batch_size(bs: int, args, device: torch.device) -> None:
    batches = make_batches(bs, args.batches, device)
    variants, missing = make_variants(batches, device, set(args.variants) if args.variants else None)
    times: dict[str, list[float]] = {name: [] for name in variants}
    clock = time.process_time if args.clock == 'cpu' else time.perf_counter
    with open(os.devnull, 'w') as devnull, contextlib.redirect_stdout(devnull):
        for _ in range(args.warmup):
            for loop in variants.values(): loop.epoch()
        for round_index in range(args.rounds):
            names = list(variants)
            if round_index % 2: names.reverse()  # no variant always runs right after the same one
            for name in names: times[name].append(timed_epoch(variants[name], device, clock) / args.batches * 1e3)
        in_events = {name: event_time(loop, device) / args.batches * 1e6 for name, loop in variants.items()
                     if isinstance(loop, MinilearnLoop)}
    print(f'\nbatch size {bs}: {args.batches} batches x {args.rounds} rounds')
    print(f"{'variant':<22}{'ms/batch':>10}{'ratio':>9}{'vs':>10}{'target':>13}{'events us/batch':>17}")
    for name, samples in times.items():
        base = BASELINES.get(name)
        # The ratio is the median of per-round ratios: slow drifts of a shared machine cancel out.
        ratio = statistics.median(t / b for t, b in zip(samples, times[base])) if base in times else None
        target = target_for(name, bs)
        verdict = '' if target is None or ratio is None else f'<={target:.2f} ' + ('ok' if ratio <= target else 'MISS')
        events = f'{in_events[name]:.1f}' if name in in_events else ''
        print(f"{name:<22}{statistics.median(samples):>10.3f}{f'{ratio:.3f}x' if ratio else '':>9}"
              f"{base or '':>10}{verdict:>13}{events:>17}")
    for name, why in missing.items(): print(f'{name:<22}{why:>10}')


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[16, 64, 256])
    parser.add_argument('--batches', type=int, default=200, help='timed batches per round and variant')
    parser.add_argument('--rounds', type=int, default=15)
    parser.add_argument('--warmup', type=int, default=1, help='untimed epochs per variant first')
    parser.add_argument('--variants', nargs='*', help='only these variants (names as printed)')
    add_run_options(parser)
    args = parser.parse_args(argv)
    device = start_run(args)
    for bs in args.batch_sizes: bench_batch_size(bs, args, device)


if __name__ == '__main__':
    main()
