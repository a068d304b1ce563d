"""Progress bars (fastprogress) over epochs and batches, with the per-epoch table."""
from __future__ import annotations

import time
from functools import partial
from typing import Any

import torch
from fastprogress.fastprogress import IN_NOTEBOOK, ConsoleMasterBar, ConsoleProgressBar, NBMasterBar, NBProgressBar

from ..callback import Callback, Order
from ..core import TablePrinter, is_interactive

__all__ = ['ProgressCallback']


class _PlainMasterBar:
    """For logs (CI, files, pipes): table rows as plain lines, no bars and no carriage returns."""

    def __init__(self) -> None:
        self.rows = TablePrinter()

    def write(self, line: Any, table: bool = False) -> None:
        if table: self.rows(line)
        else: print(line, flush=True)


class ProgressCallback(Callback):
    """A master bar over epochs, a bar over batches showing the smoothed loss, and the epoch table.

    Bars are drawn in Jupyter and in terminals; when output goes to a log, only table rows are written.
    The loss is read from the device at most `max_updates_per_sec` times a second.
    """
    _order = Order.PROGRESS
    main_process_only = True

    def __init__(self, beta: float = 0.98, max_updates_per_sec: float = 10., interactive: bool | None = None):
        self.beta, self.min_interval, self.interactive = beta, 1. / max_updates_per_sec, interactive
        self.mbar = self.pb = None
        self.pending: list[torch.Tensor] = []  # training losses not yet in the smoothed loss

    def _is_interactive(self) -> bool:
        if self.interactive is not None: return self.interactive
        return is_interactive()

    def begin_fit(self) -> None:
        self.bars = self._is_interactive()
        if self.bars:
            master_cls = NBMasterBar if IN_NOTEBOOK else ConsoleMasterBar
            self.mbar = master_cls(range(self.run.epochs))
            # The first update draws the bar; drawing it again (on_iter_begin) would leave a second, stale
            # display in a notebook's saved output. It starts at 0 (fastprogress times from there), then moves
            # to where a resumed fit starts.
            self.mbar.update(0)
            if self.run.position.epoch: self.mbar.update(self.run.position.epoch)
        else:
            self.mbar = _PlainMasterBar()
        self.old_logger = self.run.logger
        self.run.logger = partial(self.mbar.write, table=True)
        self.pb, self.smooth_loss, self.n_smoothed, self.last_shown, self.pending = None, None, 0, 0., []

    def begin_epoch(self) -> None:
        if self.bars: self.mbar.update(self.run.epoch)  # first: the epoch's bar takes its label from the master
        self._new_bar()

    def begin_validate(self) -> None:
        self._new_bar()

    def _new_bar(self) -> None:
        self._close_bar()
        if not self.bars: return
        bar_cls = NBProgressBar if IN_NOTEBOOK else ConsoleProgressBar
        self.pb = bar_cls(self.run.dl, parent=self.mbar)
        self.pb.update(0)

    def after_loss(self) -> None:
        # Without a bar (logs) the smoothed loss is never shown: nothing to keep. With one, the losses are
        # only kept here and smoothed when shown (throttled), so a batch costs no arithmetic.
        if self.pb is None or not self.run.in_train or not isinstance(self.run.loss, torch.Tensor): return
        self.pending.append(self.run.loss.detach())

    def _smooth(self) -> None:
        """Fold the pending losses into the exponential moving average: smooth·βⁿ + Σ (1−β)·β^(n−1−k)·loss_k."""
        if not self.pending: return
        losses = torch.stack([loss.float().reshape(()) for loss in self.pending])
        n, beta = len(self.pending), self.beta
        weights = torch.tensor([(1 - beta) * beta ** (n - 1 - k) for k in range(n)], dtype=losses.dtype)
        recent = (losses * weights.to(losses.device, non_blocking=True)).sum()
        self.smooth_loss = recent if self.smooth_loss is None else self.smooth_loss * beta ** n + recent
        self.n_smoothed += n
        self.pending = []

    def after_batch(self) -> None:
        if self.pb is None: return
        now = time.time()
        last = self.run.iter + 1 >= self.run.iters
        if now - self.last_shown < self.min_interval and not last: return
        self.last_shown = now
        if self.run.in_train and self.pending: self._smooth()
        if self.run.in_train and self.smooth_loss is not None:  # the only host read during an epoch, throttled
            self.pb.comment = f'loss {self.smooth_loss.item() / (1 - self.beta ** self.n_smoothed):.4f}'
        self.pb.update(self.run.iter + 1)

    def _close_bar(self) -> None:
        if self.pb is not None and self.pb.last_v is not None: self.pb.on_iter_end()
        self.pb = None

    def after_fit(self) -> None:
        if self.mbar is None: return  # begin_fit never ran (an earlier callback failed)
        self._close_bar()
        if self.bars: self.mbar.on_iter_end()
        self.run.logger, self.mbar = self.old_logger, None
