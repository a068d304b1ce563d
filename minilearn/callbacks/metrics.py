"""Running averages of the loss and metrics, per epoch, for training and validation."""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import torch

from ..core import batch_size, callable_name, listify
from ..callback import Callback

__all__ = ['accuracy', 'AvgStats', 'AvgStatsCallback', 'metric_name', 'format_time']


def accuracy(out: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """Fraction of items whose highest score is the target class ((N, C, ...) scores, (N, ...) targets)."""
    return (out.argmax(dim=1) == yb).float().mean()


def metric_name(metric: Callable) -> str:
    """A metric's column name: its function name (through partials), else its class name."""
    return callable_name(metric)


def format_time(seconds: float) -> str:
    """mm:ss (or h:mm:ss)."""
    seconds = int(seconds)
    h, m, s = seconds // 3600, (seconds // 60) % 60, seconds % 60
    return f'{h}:{m:02d}:{s:02d}' if h else f'{m:02d}:{s:02d}'


def _kept(value: Any) -> Any:
    return value.detach() if isinstance(value, torch.Tensor) else float(value)


def _weighted_sum(total: Any, values: list, sizes: list[int]) -> Any:
    """total + Σ value·size over a pass's batches (tensors stacked and summed in a few kernels)."""
    tensors = [(v, n) for v, n in zip(values, sizes) if isinstance(v, torch.Tensor)]
    total = total + sum(v * n for v, n in zip(values, sizes) if not isinstance(v, torch.Tensor))
    if not tensors: return total
    stacked = torch.stack([v.float() for v, _ in tensors])
    weights = torch.tensor([n for _, n in tensors], dtype=stacked.dtype).to(stacked.device, non_blocking=True)
    return total + (stacked * weights.view((-1,) + (1,) * (stacked.ndim - 1))).sum(0)


class AvgStats:
    """Sums of loss and metrics weighted by batch size, kept on the batch's device until read.

    A batch only keeps its detached values (no arithmetic beyond the metrics themselves); they are
    summed every `fold_every` batches and when `tot_loss`, `tot_mets` or the stats are read.
    """
    fold_every = 256

    def __init__(self, metrics: Any, in_train: bool):
        self.metrics, self.in_train = listify(metrics), in_train
        self.reset()

    def reset(self) -> None:
        """Start a new pass."""
        self.count, self._tot_loss, self._tot_mets = 0, 0., [0.] * len(self.metrics)
        self._pending: list[tuple[int, Any, list]] = []  # (batch size, loss, metric values) not summed yet

    def accumulate(self, run: Any) -> None:
        """Add the current batch (`run.loss`, `run.pred`, `run.yb`); no host synchronisation."""
        bn = batch_size(run.xb, run.yb)
        self.count += bn
        self._pending.append((bn, _kept(run.loss), [_kept(m(run.pred, run.yb)) for m in self.metrics]))
        if len(self._pending) >= self.fold_every: self._fold()

    def _fold(self) -> None:
        if not self._pending: return
        pending, self._pending = self._pending, []
        sizes = [bn for bn, _, _ in pending]
        self._tot_loss = _weighted_sum(self._tot_loss, [loss for _, loss, _ in pending], sizes)
        self._tot_mets = [_weighted_sum(total, [mets[i] for _, _, mets in pending], sizes)
                          for i, total in enumerate(self._tot_mets)]

    @property
    def tot_loss(self) -> Any:
        """The loss summed over items so far (a tensor on the batches' device once a batch was added)."""
        self._fold()
        return self._tot_loss

    @tot_loss.setter
    def tot_loss(self, value: Any) -> None:
        self._fold()
        self._tot_loss = value

    @property
    def tot_mets(self) -> list:
        """Each metric summed over items so far."""
        self._fold()
        return self._tot_mets

    @tot_mets.setter
    def tot_mets(self, values: list) -> None:
        self._fold()
        self._tot_mets = list(values)

    @property
    def all_stats(self) -> list[float]:
        """Summed loss then summed metrics, as Python floats (one read from the device)."""
        sums = [self.tot_loss] + self.tot_mets
        tensors = [s for s in sums if isinstance(s, torch.Tensor)]
        if not tensors: return [float(s) for s in sums]
        values = iter(torch.stack([t.reshape(()) for t in tensors]).tolist())
        return [next(values) if isinstance(s, torch.Tensor) else float(s) for s in sums]

    @property
    def avg_stats(self) -> list[float]:
        """Average loss then average metrics over the pass (nan before any batch)."""
        if not self.count: return [math.nan] * (1 + len(self.metrics))
        return [s / self.count for s in self.all_stats]

    @property
    def names(self) -> list[str]:
        prefix = 'train' if self.in_train else 'valid'
        return [f'{prefix}_loss'] + [f'{prefix}_{metric_name(m)}' for m in self.metrics]

    def __repr__(self) -> str:
        if not self.count: return ''
        return f"{'train' if self.in_train else 'valid'}: {self.avg_stats}"


class AvgStatsCallback(Callback):
    """Average loss and metrics per epoch; logs one row per epoch and keeps them in `history`."""
    run_during_lr_find = False

    def __init__(self, metrics: Any = None):
        self.train_stats, self.valid_stats = AvgStats(metrics, True), AvgStats(metrics, False)
        self.history: list[dict] = []

    @property
    def metric_names(self) -> list[str]:
        """The columns: `epoch`, train and valid loss and metrics, `time`."""
        return ['epoch'] + self.train_stats.names + self.valid_stats.names + ['time']

    def begin_fit(self) -> None:
        if self.run.start_epoch == 0: self.history = []  # resuming keeps the loaded history
        self.run.logger(self.metric_names)

    def begin_epoch(self) -> None:
        self.train_stats.reset()
        self.valid_stats.reset()
        self.start_time = time.time()

    def after_loss(self) -> None:
        stats = self.train_stats if self.run.in_train else self.valid_stats
        with torch.no_grad(): stats.accumulate(self.run)

    def after_epoch(self) -> None:
        elapsed = time.time() - self.start_time
        has_valid = self.run.data.valid_dl is not None
        values = self.train_stats.avg_stats + (self.valid_stats.avg_stats if has_valid
                                               else [None] * len(self.valid_stats.names))
        row = {'epoch': self.run.epoch, **dict(zip(self.metric_names[1:-1], values)), 'time': elapsed}
        self.history.append(row)
        self.run.logger([str(self.run.epoch)] + ['-' if v is None else f'{v:.6f}' for v in values]
                        + [format_time(elapsed)])

    def state_dict(self) -> dict:
        return {'history': [dict(r) for r in self.history]}

    def load_state_dict(self, state: dict) -> None:
        self.history = [dict(r) for r in state['history']]
