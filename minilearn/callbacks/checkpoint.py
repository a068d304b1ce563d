"""Checkpoint callbacks: keep the best (or every) model, stop early, stop on a non-finite loss."""
from __future__ import annotations

import math
import warnings
from typing import Any

import torch

from ..callback import Callback, CancelTrainException, Order
from .metrics import AvgStatsCallback

__all__ = ['TrackerCallback', 'SaveModelCallback', 'EarlyStoppingCallback', 'TerminateOnNaNCallback']


class TrackerCallback(Callback):
    """Follows one AvgStats column (`monitor`) epoch by epoch and keeps its best value."""
    _order = Order.TRACKER
    run_during_lr_find = False

    def __init__(self, monitor: str = 'valid_loss', mode: str = 'min', min_delta: float = 0.):
        if mode not in ('min', 'max'): raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        if not isinstance(monitor, str): raise TypeError(f"monitor must be a column name (str), got {monitor!r}")
        if not math.isfinite(min_delta) or min_delta < 0:
            raise ValueError(f"min_delta must be a finite number >= 0, got {min_delta!r}")
        self.monitor, self.mode, self.min_delta = monitor, mode, min_delta
        self.best = math.inf if mode == 'min' else -math.inf

    def _check_monitor(self) -> None:
        stats = self.run.find_cb(AvgStatsCallback)
        who = type(self).__name__
        if stats is None:
            raise ValueError(f"{who} monitors {self.monitor!r}, a column of AvgStatsCallback, but the learner has "
                             f"no AvgStatsCallback: add one (cb_funcs=partial(AvgStatsCallback, accuracy))")
        if stats._order >= self._order:
            raise ValueError(f"{who} (_order {self._order}) must run after AvgStatsCallback (_order {stats._order})")
        valid = [n for n in stats.metric_names if n not in ('epoch', 'time')]
        if self.monitor not in valid:
            raise ValueError(f"{who}: unknown monitor {self.monitor!r}; valid names: {', '.join(valid)}")
        if self.monitor.startswith('valid_') and self.run.data.valid_dl is None:
            raise ValueError(f"{who} monitors {self.monitor!r} but there is no validation set (valid_dl=None); "
                             f"monitor a train_ column or give a validation set")
        self.stats = stats

    def begin_fit(self) -> None:
        self._check_monitor()
        if self.run.start_epoch == 0: self.best = math.inf if self.mode == 'min' else -math.inf

    def _current(self) -> float:
        row = self.stats.history[-1]
        return row[self.monitor]

    def _improved(self, value: float) -> bool:
        if value is None or math.isnan(value): return False
        return value < self.best - self.min_delta if self.mode == 'min' else value > self.best + self.min_delta

    def state_dict(self) -> dict:
        return {'best': float(self.best)}

    def load_state_dict(self, state: dict) -> None:
        self.best = float(state['best'])


class SaveModelCallback(TrackerCallback):
    """Save a checkpoint when `monitor` improves (`<fname>.pth`), or every epoch (`<fname>_<epoch>.pth`).

    Files go to `<learn.path>/<learn.model_dir>`, on rank 0 only. A per-epoch file is written at the end of
    epoch index k, so it resumes with `fit(epochs, start_epoch=k + 1)`; the epoch at which
    EarlyStoppingCallback stops is not saved (it did not improve). The weights are not reloaded after
    training: load the best with `learn.load(fname)`.
    """
    _order = Order.SAVE_MODEL

    def __init__(self, fname: str = 'model', monitor: str = 'valid_loss', mode: str = 'min',
                 every_epoch: bool = False, with_opt: bool = True):
        super().__init__(monitor, mode)
        if not isinstance(fname, str) or not fname or '/' in fname:
            raise ValueError(f"fname must be a file name without folder or suffix, got {fname!r}")
        self.fname, self.every_epoch, self.with_opt = fname, every_epoch, with_opt

    def begin_fit(self) -> None:
        if not self.every_epoch: super().begin_fit()

    def _file(self, suffix: str = '') -> Any:
        return self.run.path / self.run.model_dir / f'{self.fname}{suffix}.pth'

    def after_epoch(self) -> None:
        if self.every_epoch:
            self.run.save(self._file(f'_{self.run.epoch}'), with_opt=self.with_opt)
            return
        value = self._current()
        if self._improved(value):
            self.best = value
            self.run.save(self._file(), with_opt=self.with_opt)


class EarlyStoppingCallback(TrackerCallback):
    """Stop training when `monitor` has not improved by more than `min_delta` for `patience` epochs."""
    _order = Order.EARLY_STOPPING

    def __init__(self, monitor: str = 'valid_loss', mode: str = 'min', patience: int = 1, min_delta: float = 0.):
        super().__init__(monitor, mode, min_delta)
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"patience must be a positive int (epochs without improvement), got {patience!r}")
        self.patience, self.wait, self.best_epoch = patience, 0, None

    def begin_fit(self) -> None:
        super().begin_fit()
        if self.run.start_epoch == 0: self.wait, self.best_epoch = 0, None

    def after_epoch(self) -> None:
        value = self._current()
        if self._improved(value):
            self.best, self.best_epoch, self.wait = value, self.run.epoch, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            warnings.warn(f"EarlyStopping: no improvement of {self.monitor} (best {self.best:.6g} at epoch "
                          f"{self.best_epoch}) for {self.wait} epoch(s); stopped after epoch {self.run.epoch}",
                          stacklevel=2)
            raise CancelTrainException()

    def state_dict(self) -> dict:
        return {'best': float(self.best), 'wait': self.wait, 'best_epoch': self.best_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.wait, self.best_epoch = float(state['best']), int(state['wait']), state['best_epoch']


class TerminateOnNaNCallback(Callback):
    """Stop training at the first non-finite loss, saying at which epoch and batch, without a host sync.

    On the CPU the check happens before backward, so no optimizer step follows the bad batch. On CUDA the
    flag is copied to pinned memory asynchronously and read once the copy is done (`n_slots` copies may
    be in flight): training stops a batch or so later (at the latest at the end of the epoch), naming the
    bad batch. Other devices copy the flag synchronously.
    """
    _order = Order.TERMINATE_ON_NAN

    def __init__(self, n_slots: int = 8):
        if isinstance(n_slots, bool) or not isinstance(n_slots, int) or n_slots < 1:
            raise ValueError(f"n_slots must be a positive int, got {n_slots!r}")
        self.n_slots = n_slots
        self._device = None

    def begin_fit(self) -> None:
        self._device = None  # set up on the first loss, once the model is on its device

    def _setup(self, device: torch.device) -> None:
        # "Loss was finite" flags on the CPU (pinned for CUDA, one per slot) read through a numpy view, so
        # reading one needs no Tensor method call and, on the CPU, no copy.
        on_cuda = device.type == 'cuda'
        self._flags = torch.ones(self.n_slots if on_cuda else 1, dtype=torch.bool, pin_memory=on_cuda)
        self._flags_np = self._flags.numpy()
        self._slot_views = [self._flags[i] for i in range(len(self._flags))]
        self._events = [torch.cuda.Event() for _ in self._slot_views] if on_cuda else []
        self._pending: list[tuple[int, Any, tuple]] = []  # (slot, CUDA event, where) in submission order
        self._device = device

    def after_loss(self) -> None:
        loss = self.run.loss
        if not isinstance(loss, torch.Tensor): return
        if loss.device != self._device: self._setup(loss.device)
        where = (self.run.epoch, self.run.iter, self.run.in_train)
        if self._device.type == 'cuda': return self._check_async(loss, where)
        if self._device.type == 'cpu': torch.all(torch.isfinite(loss.detach()), out=self._slot_views[0])
        else: self._slot_views[0].copy_(torch.isfinite(loss.detach()).all())
        if not self._flags_np[0]: self._stop(where)

    def _check_async(self, loss: torch.Tensor, where: tuple) -> None:
        self._check_done(wait=False)
        if len(self._pending) == self.n_slots: self._check_done(wait=True, only_oldest=True)
        busy = {slot for slot, _, _ in self._pending}
        free = next(i for i in range(self.n_slots) if i not in busy)
        self._slot_views[free].copy_(torch.isfinite(loss.detach()).all(), non_blocking=True)
        self._events[free].record()
        self._pending.append((free, self._events[free], where))

    def _check_done(self, wait: bool, only_oldest: bool = False) -> None:
        while self._pending:
            slot, event, where = self._pending[0]
            if wait: event.synchronize()
            elif not event.query(): return
            self._pending.pop(0)
            if not self._flags_np[slot]: self._stop(where)
            if only_oldest: return

    def after_epoch(self) -> None:
        if self._device is not None and self._device.type == 'cuda': self._check_done(wait=True)

    def _stop(self, where: tuple) -> None:
        epoch, batch, in_train = where
        self._pending = []
        warnings.warn(f"TerminateOnNaN: non-finite loss at epoch {epoch}, {'training' if in_train else 'validation'} "
                      f"batch {batch}; training stopped", stacklevel=2)
        raise CancelTrainException()
