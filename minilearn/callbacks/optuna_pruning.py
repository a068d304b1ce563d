"""OptunaPruningCallback: report an AvgStats column to an Optuna trial after every epoch, stop the fit when the
study's pruner says so.

As `optuna_integration`'s pruning callbacks for Lightning and fastai do (report, ask `should_prune`, raise
`optuna.TrialPruned`), with one difference: the fit is first stopped the learner's way
(`CancelTrainException`), so every callback's `after_fit` restores what it changed, and `TrialPruned` is
raised from this callback's `after_fit`, once the learner is back in order; `study.optimize` then records
the trial as pruned.
"""
from __future__ import annotations

from typing import Any

from ..callback import Callback, CancelTrainException, Order
from ..core import optional_import
from .checkpoint import TrackerCallback

__all__ = ['OptunaPruningCallback']


class OptunaPruningCallback(TrackerCallback):
    """After every epoch, `trial.report(value of monitor, epoch)`; when `trial.should_prune()`, stop the fit and
    raise `optuna.TrialPruned` (from `after_fit`). `monitor` is an AvgStatsCallback column (checked at begin_fit).
    `pruned_at` is the epoch it stopped after (None while not pruned)."""
    _order = Order.TRACKER
    run_during_lr_find = False

    def __init__(self, trial: Any, monitor: str = 'valid_loss'):
        self.optuna = optional_import('optuna', 'OptunaPruningCallback', 'optuna')  # fails before any training
        if not (callable(getattr(trial, 'report', None)) and callable(getattr(trial, 'should_prune', None))):
            raise TypeError(f"OptunaPruningCallback: trial must be an optuna Trial (with report and should_prune), "
                            f"got {type(trial).__name__}")
        super().__init__(monitor)
        self.trial, self.pruned_at = trial, None

    def begin_fit(self) -> None:
        super().begin_fit()  # checks the monitor
        self.pruned_at = None

    def after_epoch(self) -> None:
        value = self._current()
        self.trial.report(float('nan') if value is None else float(value), self.run.epoch)
        if self.trial.should_prune():
            self.pruned_at = self.run.epoch
            raise CancelTrainException()

    def after_fit(self) -> None:
        if self.pruned_at is None: return
        raise self.optuna.TrialPruned(f"trial {getattr(self.trial, 'number', '')} pruned after epoch {self.pruned_at} "
                                      f"({self.monitor} = {self.stats.history[-1][self.monitor]})")

    # Nothing for checkpoints (the trial holds the reports): the protocol's defaults, not TrackerCallback's `best`.
    state_dict = Callback.state_dict
    load_state_dict = Callback.load_state_dict
