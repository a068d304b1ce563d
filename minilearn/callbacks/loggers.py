"""Loggers: the per-epoch history as a CSV file, and scalars for TensorBoard."""
from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import torch

from ..core import is_main_process, optional_import
from ..callback import Callback, Order
from .metrics import AvgStatsCallback

__all__ = ['CSVLogger', 'TensorBoardCallback']


def _history_source(run: Any, who: str) -> Any:
    stats = getattr(run, 'avg_stats', None)
    if stats is None or not hasattr(stats, 'history'):
        raise ValueError(f"{who} logs the rows of AvgStatsCallback: add AvgStatsCallback(metrics) to the learner")
    return stats


class CSVLogger(Callback):
    """Write one row per epoch (`epoch`, the AvgStats columns, `time` in seconds) to `learn.path/fname`.

    The file is flushed after every epoch, so an interrupted run keeps the epochs it finished.
    `append=True` adds rows to an existing file (whose header must match); so does resuming a fit
    (`learn.position.resuming`: `start_epoch > 0`, or `resume=` a checkpoint).
    """
    _order = Order.LOGGER
    main_process_only = True
    run_during_lr_find = False

    def __init__(self, fname: str | Path = 'history.csv', append: bool = False):
        self.fname, self.append = Path(fname), append
        self.file = self.writer = None

    @property
    def path(self) -> Path:
        """Where the file is written: `fname` under the learner's path (unless absolute)."""
        return self.fname if self.fname.is_absolute() or self.run is None else Path(self.run.path) / self.fname

    def begin_fit(self) -> None:
        if not is_main_process(): return
        self.columns = _history_source(self.run, 'CSVLogger').metric_names
        path = self.path
        path.parent.mkdir(parents=True, exist_ok=True)
        append = self.append or self.run.position.resuming
        has_rows = append and path.is_file() and path.stat().st_size > 0
        if has_rows: self._check_header(path)
        self.file = open(path, 'a' if append else 'w', newline='')
        self.writer = csv.writer(self.file)
        if not has_rows: self._write(self.columns)

    def _check_header(self, path: Path) -> None:
        with open(path, newline='') as f:
            header = next(csv.reader(f), [])
        if header != self.columns:
            raise ValueError(f"CSVLogger(append=True): {path} has columns {header}, this run logs {self.columns}; "
                             f"use another fname or append=False")

    def _write(self, row: list) -> None:
        self.writer.writerow(row)
        self.file.flush()

    def after_epoch(self) -> None:
        if self.writer is None: return
        row = self.run.find_cb(AvgStatsCallback).history[-1]
        self._write(['' if row.get(c) is None else row.get(c) for c in self.columns])

    def after_fit(self) -> None:
        if self.file is not None: self.file.close()
        self.file = self.writer = None

    def read(self) -> list[dict]:
        """The logged rows as dicts of numbers (empty cells as None)."""
        with open(self.path, newline='') as f:
            return [{k: (None if v == '' else int(v) if k == 'epoch' else float(v)) for k, v in row.items()}
                    for row in csv.DictReader(f)]


class TensorBoardCallback(Callback):
    """Scalars for TensorBoard: per epoch the AvgStats columns, per training step the loss and each group's lr.

    Step scalars are buffered on the device and written at the end of each epoch (no host read per
    batch). `log_dir` defaults to `learn.path/'runs'`; only rank 0 writes in a distributed run.
    """
    _order = Order.LOGGER
    main_process_only = True
    run_during_lr_find = False

    def __init__(self, log_dir: str | Path | None = None):
        # At construction, so that a missing tensorboard fails before any training.
        self.writer_class = optional_import('torch.utils.tensorboard', 'TensorBoardCallback', 'tensorboard').SummaryWriter
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.writer = None
        self._losses: list[torch.Tensor] = []
        self._lrs: list[list[float]] = []

    def begin_fit(self) -> None:
        if not is_main_process(): return
        log_dir = self.log_dir if self.log_dir is not None else Path(self.run.path) / 'runs'
        self.writer = self.writer_class(log_dir=str(log_dir))
        self._losses, self._lrs, self._first_step = [], [], self.run.n_iter

    def after_batch(self) -> None:
        if self.writer is None or not self.run.in_train or not isinstance(self.run.loss, torch.Tensor): return
        self._losses.append(self.run.loss.detach())
        self._lrs.append([group['lr'] for group in self.run.opt.param_groups])

    def _write_steps(self) -> None:
        if not self._losses: return
        losses = torch.stack([loss.float().reshape(()) for loss in self._losses]).tolist()  # one read per epoch
        for step, (loss, lrs) in enumerate(zip(losses, self._lrs), start=self._first_step):
            self.writer.add_scalar('train/loss_step', loss, step)
            for i, lr in enumerate(lrs): self.writer.add_scalar(f'train/lr_group{i}', lr, step)
        self._first_step += len(losses)
        self._losses, self._lrs = [], []

    def after_epoch(self) -> None:
        if self.writer is None: return
        self._write_steps()
        stats = self.run.find_cb(AvgStatsCallback)
        if stats is not None and stats.history:
            for name, value in stats.history[-1].items():
                if name == 'epoch' or value is None or not math.isfinite(value): continue
                self.writer.add_scalar(f'epoch/{name}', value, self.run.epoch)
        self.writer.flush()

    def after_fit(self) -> None:
        if self.writer is None: return
        try:
            self._write_steps()  # the steps of an interrupted epoch
        finally:
            self.writer.close()
            self.writer = None
