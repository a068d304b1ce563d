"""The `minilearn tune` job: an Optuna study over the `minilearn train` job.

Each trial draws the learning rate and the weight decay (log-uniform), MixUp's alpha or no MixUp, and label
smoothing's epsilon or none (when `--loss` is not given), trains into `--out/trial_<n>` like `minilearn train`
(its metrics.json says `pruned` for a pruned trial) and reports the validation accuracy after every epoch
(`OptunaPruningCallback`); the study maximizes the last epoch's. A median pruner, as Optuna's own examples
use, stops a trial whose accuracy is below the median of the earlier trials at the same epoch. The study
lives in `--storage` under `--study`: running the command again continues it. cli.py has checked the options.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Any

from .callbacks.optuna_pruning import OptunaPruningCallback
from .core import optional_import
from .train_job import _cpu_threads, build_learner, fit_and_write
from .train_spec import one_line

__all__ = ['run_tune', 'suggest', 'MONITOR']

MONITOR = 'valid_accuracy'  # comparable across losses and MixUp, unlike valid_loss
LR_RANGE, WD_RANGE, MIXUP_RANGE, SMOOTHING_RANGE = (1e-3, 1.0), (1e-6, 1e-2), (0.1, 1.0), (0.01, 0.3)


def suggest(trial: Any, args: argparse.Namespace) -> dict[str, Any]:
    """The options a trial chooses: `lr`, `wd`, `mixup` (alpha or None), `label_smoothing` (epsilon or None)."""
    choice = {'lr': trial.suggest_float('lr', *LR_RANGE, log=True),
              'wd': trial.suggest_float('wd', *WD_RANGE, log=True),
              'mixup': trial.suggest_float('mixup_alpha', *MIXUP_RANGE, log=True)
              if trial.suggest_categorical('mixup', [False, True]) else None,
              'label_smoothing': None}
    if args.loss is None and trial.suggest_categorical('label_smoothing', [False, True]):
        choice['label_smoothing'] = trial.suggest_float('smoothing_eps', *SMOOTHING_RANGE)
    return choice


def _train_command(args: argparse.Namespace, choice: dict[str, Any], out: str) -> str:
    words = list(args.train_command) + ['--lr', repr(choice['lr']), '--wd', repr(choice['wd'])]
    if choice['mixup'] is not None: words += ['--mixup', repr(choice['mixup'])]
    if choice['label_smoothing'] is not None: words += ['--label-smoothing', repr(choice['label_smoothing'])]
    return shlex.join(words + ['--out', out])


def _objective(args: argparse.Namespace):
    def objective(trial: Any) -> float:
        choice = suggest(trial, args)
        trial_args = argparse.Namespace(**{**vars(args), **choice, 'out': args.out / f'trial_{trial.number}',
                                           'quiet': True})
        learn, report = build_learner(trial_args)
        learn.add_cb(OptunaPruningCallback(trial, MONITOR))
        report = fit_and_write(trial_args, learn, report, None)
        return report['final'][MONITOR]
    return objective


def _progress(quiet: bool):
    def show(study: Any, trial: Any) -> None:
        if quiet: return
        value = '' if trial.value is None else f' {MONITOR} {trial.value:.4f}'
        steps = len(trial.intermediate_values)
        params = ', '.join(f'{k}={v:.3g}' if isinstance(v, float) else f'{k}={v}' for k, v in trial.params.items())
        print(f"trial {trial.number}: {trial.state.name.lower()}{value} after {steps} epoch(s) ({params})", flush=True)
    return show


def run_tune(args: argparse.Namespace, prog: str) -> int:
    """Run `minilearn tune` with checked options: run the trials, print the best and how to reproduce it; returns
    the exit status (2: a setup problem, shown as one line; 130: interrupted)."""
    try:
        optuna = optional_import('optuna', 'minilearn tune', 'optuna')
        args.out.mkdir(parents=True, exist_ok=True)
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # the trials' progress is shown by _progress
        study = optuna.create_study(study_name=args.study, storage=None if args.storage == 'memory' else args.storage,
                                    load_if_exists=True, direction='maximize',
                                    pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
        if study.direction != optuna.study.StudyDirection.MAXIMIZE:
            raise ValueError(f"study {args.study!r} in {args.storage} minimizes; tune maximizes {MONITOR}: "
                             f"choose another --study")
    except (ValueError, TypeError, OSError, ImportError) as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return 2
    done = len(study.trials)
    study.sampler = optuna.samplers.TPESampler(seed=args.seed + done)  # a continued study draws new points
    if not args.quiet:
        print(f"{prog}: study {args.study!r} in {args.storage}"
              + (f", continuing after {done} trial(s)" if done else ''), flush=True)
    try:
        with _cpu_threads(args.threads):
            study.optimize(_objective(args), n_trials=args.trials, timeout=args.timeout,
                           callbacks=[_progress(args.quiet)])
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; run the same command again to continue the study", file=sys.stderr)
        return 130
    states = [t.state.name.lower() for t in study.trials]
    counts = ', '.join(f'{states.count(s)} {s}' for s in sorted(set(states)))
    try:
        best = study.best_trial
    except ValueError:
        print(f"{prog}: no trial completed ({counts})", file=sys.stderr)
        return 1
    choice = suggest(optuna.trial.FixedTrial(best.params), args)
    print(f"{prog}: {len(states)} trial(s) in study {args.study!r} ({counts}); best: trial {best.number}, "
          f"{MONITOR} {best.value:.4f}\nreproduce it with: "
          f"{_train_command(args, choice, str(args.out / 'best'))}", flush=True)
    return 0
