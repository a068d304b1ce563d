"""MixUp and label smoothing against plain cross entropy, over seeds: the setting of nbs/10b_mixup_label_smoothing.

Each seed generates its own shapes (`shapes_databunch(seed=seed)`), redraws a share of the training labels
(`add_label_noise`, symmetric; the validation labels stay clean), and trains the notebook's four variants from
the same initial weights on the same batches: cross entropy, `MixUp(alpha)`, `LabelSmoothingCrossEntropy(eps)`,
both. Seed 0 is exactly the notebook's run. Reported: clean validation accuracy after the last epoch, mean ± sd
over seeds, each variant's paired difference from cross entropy (and MixUp + label smoothing's from MixUp) with
its 95 % t-interval, and how many of its noisy training labels cross entropy fits in the last epoch.

    python bench/regularizers.py --seeds 5 --jobs 2          # the notebook's setting, ~5 min on 2 cores
    python bench/regularizers.py --smoke                      # seconds (tested)

Every run uses one torch thread; `--jobs N` runs N seeds at once in worker processes. Only accuracies are
compared, so running seeds side by side does not bias the figures.
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
sys.path.insert(0, str(BENCH))
from _common import mean_std, paired  # noqa: E402

from minilearn import (AvgStatsCallback, BatchTransformXCallback, DeviceCallback,  # noqa: E402
                       LabelSmoothingCrossEntropy, Learner, MixUp, Normalize, accuracy, add_label_noise,
                       channel_stats, get_cnn_model, init_cnn, shapes_databunch)

VARIANTS = ('cross entropy', 'MixUp', 'label smoothing', 'MixUp + label smoothing')
# The notebook's settings (nbs/10b_mixup_label_smoothing.ipynb); --smoke shrinks them.
SETTING = dict(n_train=10_000, n_valid=1000, bs=64, noise=0.2, epochs=16, nfs=[16, 32, 64, 64], lr=1e-2,
               alpha=0.4, eps=0.1, variants=list(VARIANTS))
SMOKE = dict(n_train=200, n_valid=100, epochs=2, nfs=[8, 16])


def run_seed(seed: int, s: dict) -> dict:
    """Each variant's clean validation accuracy (%) and accuracy on its noisy training labels (%) after the last
    epoch, and its seconds; `wrong`: the share (%) of training labels the noise changed."""
    torch.set_num_threads(1)
    torch.manual_seed(seed)  # the loader draws its shuffling seed from it
    data = shapes_databunch(n_train=s['n_train'], n_valid=s['n_valid'], bs=s['bs'], seed=seed)
    noise = add_label_noise(data.train_ds, s['noise'], generator=torch.Generator().manual_seed(seed))
    mean, std = channel_stats(data.train_dl, n_batches=20)
    cbfs = [DeviceCallback, partial(BatchTransformXCallback, Normalize(mean, std)), partial(AvgStatsCallback, accuracy)]
    result = {'wrong': 100 * noise.changed.float().mean().item()}
    for name in s['variants']:
        smoothing = 'smoothing' in name
        loss_func = LabelSmoothingCrossEntropy(eps=s['eps']) if smoothing else F.cross_entropy
        extra = [partial(MixUp, alpha=s['alpha'])] if 'MixUp' in name else []
        torch.manual_seed(seed + 1)  # same initial weights and MixUp draws
        data.train_dl.set_epoch(0)   # same batches in the same order (a second fit would read the next epochs)
        learn = Learner(init_cnn(get_cnn_model(data, s['nfs'])), data, loss_func, lr=s['lr'],
                        opt_func=torch.optim.Adam, cb_funcs=cbfs + extra)
        learn.logger = lambda *row: None
        start = time.perf_counter()
        learn.fit_one_cycle(s['epochs'])
        last = learn.avg_stats.history[-1]
        result[name] = dict(acc=100 * last['valid_accuracy'], train_acc=100 * last['train_accuracy'],
                            seconds=time.perf_counter() - start)
    return result


def report(results: dict[int, dict], s: dict) -> str:
    """A markdown table: mean ± sd over seeds, paired differences from cross entropy, each seed's figures."""
    seeds = sorted(results)
    acc = {v: [results[k][v]['acc'] for k in seeds] for v in s['variants']}
    lines = [f"{s['n_train']:,} generated shapes, {s['noise']:.0%} symmetric label noise, clean validation set of "
             f"{s['n_valid']:,}; CNN {s['nfs']}, Adam, one cycle to lr {s['lr']}, {s['epochs']} epochs, "
             f"bs {s['bs']}; "
             f"MixUp α {s['alpha']}, label smoothing ε {s['eps']}; seeds {', '.join(map(str, seeds))}.", '',
             '| variant | valid accuracy (%), mean ± sd | − cross entropy, 95 % CI | per seed |', '|---|---|---|---|']
    for v in s['variants']:
        diff = '' if v == VARIANTS[0] else paired(acc[v], acc[VARIANTS[0]])
        lines.append(f"| {v} | {mean_std(acc[v])} | {diff} | {' '.join(f'{a:.1f}' for a in acc[v])} |")
    if {'MixUp', 'MixUp + label smoothing'} <= set(acc):
        both = paired(acc['MixUp + label smoothing'], acc['MixUp'])
        lines += ['', f'MixUp + label smoothing − MixUp, 95 % CI: {both}']
    fitted = [results[k][VARIANTS[0]]['train_acc'] for k in seeds]
    correct = [100 - results[k]['wrong'] for k in seeds]
    seconds = [results[k][v]['seconds'] for k in seeds for v in s['variants']]
    lines += ['', f'Cross entropy fits {min(fitted):.1f}–{max(fitted):.1f} % of its noisy training labels in the '
              f'last epoch, where {min(correct):.1f}–{max(correct):.1f} % of the training labels are correct.',
              f'Seconds per fit (1 thread, {len(seeds)} seeds): {min(seconds):.0f}–{max(seconds):.0f}. '
              '* marks an interval that excludes 0.']
    return '\n'.join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--seeds', type=int, default=5, help='seeds 0 .. N-1')
    p.add_argument('--jobs', type=int, default=1, help='seeds run at once (processes of one thread each)')
    p.add_argument('--smoke', action='store_true', help='tiny data and net, 2 epochs (seconds)')
    p.add_argument('--alpha', type=float, default=SETTING['alpha'], help="MixUp's Beta(α, α)")
    p.add_argument('--eps', type=float, default=SETTING['eps'], help="label smoothing's ε")
    p.add_argument('--noise', type=float, default=SETTING['noise'], help='share of training labels redrawn')
    p.add_argument('--variants', nargs='+', choices=VARIANTS, default=list(VARIANTS), metavar='VARIANT',
                   help=f"a subset of {', '.join(repr(v) for v in VARIANTS)} (cross entropy is always run)")
    p.add_argument('--json', help='also write the per-seed results to this file')
    args = p.parse_args(argv)
    if args.seeds < 1 or args.jobs < 1: p.error('--seeds and --jobs must be at least 1')
    if not 0 <= args.noise <= 1: p.error(f'--noise must be in [0, 1], got {args.noise}')
    if not 0 <= args.eps < 1: p.error(f'--eps must be in [0, 1), got {args.eps}')
    if not args.alpha > 0: p.error(f'--alpha must be positive, got {args.alpha}')
    s = dict(SETTING, **(SMOKE if args.smoke else {}), alpha=args.alpha, eps=args.eps, noise=args.noise,
             variants=[v for v in VARIANTS if v == VARIANTS[0] or v in args.variants])
    print('command: python ' + shlex.join(['bench/regularizers.py'] + (argv if argv is not None else sys.argv[1:])))
    seeds = range(args.seeds)
    if args.jobs == 1:
        results = {k: run_seed(k, s) for k in seeds}
    else:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = dict(zip(seeds, pool.map(run_seed, seeds, [s] * args.seeds)))
    if args.json: Path(args.json).write_text(json.dumps(results, indent=1))
    print(report(results, s))
    return 0


if __name__ == '__main__':
    sys.exit(main())
