"""Cost per epoch of the noise-robust methods against cross entropy, timed alone (interleaved rounds).

The memorisation study (bench/noisy_memorisation.py) records each run's epoch times, but its runs are minutes
apart and share the machine with whatever else runs then. Here every method of the study's MNIST regime (MLP
784-256-10, Adam, bs 128, 8,000 training images at 50 % symmetric noise) trains `--epochs` epochs from the same
initial weights, the methods interleaved in each of `--rounds` rounds, one torch thread; the figure is the median
over rounds of the training seconds per epoch (evaluation excluded), divided by CE's median.

    python bench/noise_cost.py --rounds 5 --epochs 3
    python bench/noise_cost.py --smoke            # generated data, seconds (tested)

Clean-and-retrain is left out: its cost is k folds plus a retrain (about k·(k−1)/k + 1 CE runs), by construction.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
from minilearn.callback import Callback  # noqa: E402
from minilearn.data.core import DataBunch  # noqa: E402

sys.path.insert(0, str(BENCH))
import noisy_memorisation as study  # noqa: E402

METHODS = ('ce', 'gce', 'sce', 'hard-boot', 'mixup', 'elr', 'coteach', 'jocor')


class EpochTimer(Callback):
    """Wall seconds of each training pass (the fit has no validation loader: begin_epoch to after_epoch)."""

    def begin_fit(self) -> None:
        self.seconds: list[float] = []

    def begin_epoch(self) -> None:
        self.start = time.perf_counter()

    def after_epoch(self) -> None:
        self.seconds.append(time.perf_counter() - self.start)


def epoch_seconds(r: dict, data: dict, method: str, epochs: int) -> float:
    """Median training seconds per epoch of `method` over `epochs` epochs (the first epoch included)."""
    y = data['noisy']['symmetric-50', 0].labels
    bunch = DataBunch.from_tensors(data['train_x'], y, bs=r['bs'], c_out=data['n_classes'], seed=0)
    peer = lambda: study.make_model(r['arch'], tuple(data['train_x'].shape[1:]), data['n_classes'])  # noqa: E731
    timer = EpochTimer()
    cbs = study.method_callbacks(method, r, peer, 0.45) + [timer]
    learn = study.make_learner(r, data, 0, bunch, study.make_loss(method, r), cbs, 'cpu')
    learn.data.valid_dl = None  # training passes only
    learn.fit(epochs)
    return statistics.median(timer.seconds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--rounds', type=int, default=5)
    p.add_argument('--epochs', type=int, default=3)
    p.add_argument('--smoke', action='store_true', help='generated data, tiny net (seconds)')
    p.add_argument('--mnist-path', default=str(study.SHARED_DATA / 'mnist'))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    r = dict(study.REGIMES['mnist'], noises=[('symmetric', 0.5)])
    if args.smoke: r.update(study.SMOKE['mnist'], noises=[('symmetric', 0.5)])
    data = study.load_regime('mnist', r, argparse.Namespace(mnist_path=args.mnist_path, seeds=1))
    times: dict[str, list[float]] = {m: [] for m in METHODS}
    for i in range(args.rounds):
        order = METHODS if i % 2 == 0 else METHODS[::-1]  # interleaved, alternating direction
        for m in order: times[m].append(epoch_seconds(r, data, m, args.epochs))
    ce = statistics.median(times['ce'])
    print(f"MNIST regime ({len(data['train_x'])} training images, bs {r['bs']}, {r['arch']}), 1 thread, "
          f"{args.rounds} interleaved rounds of {args.epochs} epochs; median seconds per training epoch:\n")
    print('| method | s / epoch | vs CE |')
    print('|---|---|---|')
    for m in METHODS:
        s = statistics.median(times[m])
        print(f'| {study.method_spec(m, r)[0]} | {s:.3f} | {s / ce:.2f}× |')
    return 0


if __name__ == '__main__':
    sys.exit(main())
