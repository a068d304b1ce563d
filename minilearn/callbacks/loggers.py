"""Loggers: one protocol (`LoggerCallback`) that every logger follows, the per-epoch history as a CSV file, and
scalars for TensorBoard. MLflow's logger is `callbacks/mlflow_logger.py`; it follows the same protocol.

What every logger receives, and when:
- `log_params`: the fit's hyper-parameters once, at `begin_fit`, under flat names (`fit_hyperparameters`);
- `log_epoch`: every `AvgStatsCallback` row at step = the learner's epoch index (absolute: a resumed fit
  continues the steps of the fit it resumes, never repeats them or goes back);
- `log_steps`: the training loss of every batch (and each parameter group's lr) at step = the number of
  training batches before it (`n_iter`), read from the `Recorder` at the end of each epoch, so that nothing
  reads the device per batch (without a Recorder, only the epoch rows are logged);
- `log_status`: how the fit ended, at `after_fit`: 'finished' (a `CancelTrainException`, such as early
  stopping's, included), 'failed' (an exception, passed along) or 'interrupted' (Ctrl-C, a signal);
- `log_artifact`: a file kept with the run (a plot, a checkpoint), for those that keep files.
Only rank 0 logs in a distributed run (`main_process_only`).
"""
from __future__ import annotations

import csv
import inspect
import json
import math
import sys
from pathlib import Path
from typing import Any

from ..callback import Callback, Order, TrainEvalCallback
from ..core import callable_name, is_main_process, optional_import, unwrap_loss, unwrap_partial
from .metrics import AvgStatsCallback
from .recorder import Recorder

__all__ = ['LoggerCallback', 'CSVLogger', 'TensorBoardCallback', 'fit_hyperparameters', 'FIT_STATUSES']

FIT_STATUSES = ('finished', 'failed', 'interrupted')
_SCALARS = (bool, int, float, str, type(None))


def _history_source(run: Any, who: str) -> Any:
    stats = run.find_cb(AvgStatsCallback)
    if stats is None:
        raise ValueError(f"{who} logs the rows of AvgStatsCallback: add AvgStatsCallback(metrics) to the learner")
    return stats


def _value(value: Any) -> Any:
    """A hyper-parameter value as a logger can store it: numbers, strings and None as they are; paths, sequences
    and other objects as text (callables and objects by their name)."""
    if isinstance(value, _SCALARS): return value
    if isinstance(value, Path): return str(value)
    if isinstance(value, (list, tuple)) and all(isinstance(v, _SCALARS) for v in value): return str(list(value))
    if callable(value): return callable_name(value)
    return type(value).__name__


def _public_arguments(obj: Any) -> dict[str, Any]:
    """The arguments of `obj`'s constructor that it keeps under the same name (`MixUp(alpha=0.4)` -> alpha)."""
    try:
        parameters = inspect.signature(type(obj).__init__).parameters
    except (TypeError, ValueError):
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    kept = getattr(obj, '__dict__', {})  # instance attributes, or properties (never a callback's learner fallback)
    return {name: _value(getattr(obj, name)) for name, p in parameters.items()
            if name != 'self' and p.kind in kinds and not name.startswith('_')
            and (name in kept or isinstance(getattr(type(obj), name, None), property))}


def _partial_arguments(f: Any) -> dict[str, Any]:
    keywords: dict[str, Any] = {}
    while hasattr(f, 'keywords') and hasattr(f, 'func'):  # nested partials: the outer ones win
        keywords = {**f.keywords, **keywords}
        f = f.func
    return {k: _value(v) for k, v in keywords.items()}


def _dataset_size(dl: Any) -> int | None:
    dataset = getattr(dl, 'dataset', None)
    try:
        return len(dataset) if dataset is not None else None
    except TypeError:
        return None


def fit_hyperparameters(learn: Any) -> dict[str, Any]:
    """The hyper-parameters of the fit about to run, under flat names: `lr`, `opt_func` (and `opt_func.<keyword>`
    of a partial), `loss_func` (and its public arguments), `bs`, `epochs`, `model`, `n_params`, `n_train`,
    `n_valid`, `callbacks`, and each callback's public arguments as `<Class>.<argument>` (`MixUp.alpha`)."""
    data, loss = learn.data, unwrap_loss(learn.loss_func)
    params: dict[str, Any] = {'lr': learn.lr, 'opt_func': callable_name(learn.opt_func),
                              **{f'opt_func.{k}': v for k, v in _partial_arguments(learn.opt_func).items()},
                              'loss_func': callable_name(loss),
                              **{f'loss_func.{k}': v for k, v in {**_partial_arguments(loss),
                                                                   **_public_arguments(unwrap_partial(loss))}.items()},
                              'bs': getattr(data.train_dl, 'batch_size', None), 'epochs': learn.epochs,
                              'model': type(learn.model).__name__,
                              'n_params': sum(p.numel() for p in learn.model.parameters()),
                              'n_train': _dataset_size(data.train_dl),
                              'n_valid': _dataset_size(data.valid_dl) if data.valid_dl is not None else 0}
    cbs = [cb for cb in sorted(learn.cbs, key=lambda cb: cb._order) if not isinstance(cb, TrainEvalCallback)]
    params['callbacks'] = ', '.join(type(cb).__name__ for cb in cbs)
    for cb in cbs:
        params.update({f'{type(cb).__name__}.{k}': v for k, v in _public_arguments(cb).items()})
    return params


class LoggerCallback(Callback):
    """Base of the loggers: it reads what to log from the learner at the right events and hands it to the
    `log_*` methods below, which a logger overrides (each does nothing here). See the module docstring."""
    _order = Order.LOGGER
    main_process_only = True
    run_during_lr_find = False

    # ---- what a logger implements ------------------------------------------------------------------------
    def open(self) -> None:
        """Start logging a fit (open a file, a writer, a tracker's run); called first at `begin_fit`."""

    def log_params(self, params: dict[str, Any]) -> None:
        """The fit's hyper-parameters (`fit_hyperparameters`), once per fit."""

    def log_epoch(self, row: dict[str, Any], step: int) -> None:
        """An AvgStatsCallback row (`epoch`, every `train_*`/`valid_*` column, `time`) at step = epoch index."""

    def log_steps(self, values: dict[str, list[float]], first_step: int) -> None:
        """Per training batch: `values[name][i]` at step `first_step + i` (`loss_step`, `lr_group<k>`)."""

    def log_status(self, status: str, error: BaseException | None) -> None:
        """How the fit ended: one of FIT_STATUSES, and the exception of a failed or interrupted one."""

    def log_artifact(self, path: str | Path) -> None:
        """Keep a file (a plot, a checkpoint) with the run; loggers that keep no files ignore it."""

    def close(self) -> None:
        """Stop logging the fit (flush and close); called last at `after_fit`, which always runs."""

    # ---- the events ---------------------------------------------------------------------------------------
    def begin_fit(self) -> None:
        self.logging = False  # True once open() succeeded: after_fit then reports the status and closes
        if not is_main_process(): return
        self.stats = _history_source(self.run, type(self).__name__)
        self.recorder = self.run.find_cb(Recorder)
        # Recorder index `_next_record` holds the loss of training step `_next_step`.
        self._next_step = self.run.n_iter
        self._next_record = self.recorder.n_losses if self.recorder is not None else 0
        # An exception being handled around the call of fit is not this fit's failure (see after_fit).
        self._outer_exception = sys.exc_info()[1]
        self.open()
        self.logging = True
        self.log_params(fit_hyperparameters(self.run))

    def after_epoch(self) -> None:
        if not self.logging: return
        self._log_new_steps()
        self.log_epoch(dict(self.stats.history[-1]), self.run.epoch)

    def after_fit(self) -> None:
        if not getattr(self, 'logging', False): return
        self.logging = False
        # after_fit runs in the learner's `finally`: the exception that ends the fit, if any, is being raised.
        error = sys.exc_info()[1]
        if error is self._outer_exception: error = None
        status = 'finished' if error is None else 'interrupted' if isinstance(error, KeyboardInterrupt) else 'failed'
        try:
            self._log_new_steps()  # the steps of an interrupted epoch
            self.log_status(status, error)
        finally:
            self.close()

    def _log_new_steps(self) -> None:
        recorder = self.recorder
        if recorder is None or recorder.n_losses <= self._next_record: return
        start = self._next_record
        losses = recorder.losses_from(start)  # one read of the device per epoch
        values = {'loss_step': losses,
                  **{f'lr_group{k}': lrs[start:start + len(losses)] for k, lrs in enumerate(recorder.lrs)}}
        self.log_steps(values, self._next_step)
        self._next_step += len(values['loss_step'])
        self._next_record += len(values['loss_step'])


class CSVLogger(LoggerCallback):
    """Write one row per epoch (`epoch`, the AvgStats columns, `time` in seconds) to `learn.path/fname`, and the
    fit's hyper-parameters to `<fname without suffix>.params.json` beside it.

    The file is flushed after every epoch, so an interrupted run keeps the epochs it finished.
    `append=True` adds rows to an existing file (whose header must match); so does resuming a fit
    (`learn.position.resuming`: `start_epoch > 0`, or `resume=` a checkpoint).
    """

    def __init__(self, fname: str | Path = 'history.csv', append: bool = False):
        self.fname, self.append = Path(fname), append
        self.file = self.writer = None

    @property
    def path(self) -> Path:
        """Where the file is written: `fname` under the learner's path (unless absolute)."""
        return self.fname if self.fname.is_absolute() or self.run is None else Path(self.run.path) / self.fname

    @property
    def params_path(self) -> Path:
        """Where the hyper-parameters are written: `history.params.json` beside `history.csv`."""
        return self.path.with_suffix('.params.json')

    def open(self) -> None:
        self.columns = self.stats.metric_names
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

    def log_params(self, params: dict[str, Any]) -> None:
        self.params_path.write_text(json.dumps(params, indent=2) + '\n')

    def log_epoch(self, row: dict[str, Any], step: int) -> None:
        self._write(['' if row.get(c) is None else row.get(c) for c in self.columns])

    def close(self) -> None:
        if self.file is not None: self.file.close()
        self.file = self.writer = None

    def read(self) -> list[dict]:
        """The logged rows as dicts of numbers (empty cells as None)."""
        with open(self.path, newline='') as f:
            return [{k: (None if v == '' else int(v) if k == 'epoch' else float(v)) for k, v in row.items()}
                    for row in csv.DictReader(f)]


class TensorBoardCallback(LoggerCallback):
    """Scalars for TensorBoard: per epoch the AvgStats columns (`epoch/<column>`), per training step the loss and
    each group's lr (`train/loss_step`, `train/lr_group<k>`, from the Recorder), the hyper-parameters and the
    final status as text. `log_dir` defaults to `learn.path/'runs'`."""

    def __init__(self, log_dir: str | Path | None = None):
        # At construction, so that a missing tensorboard fails before any training.
        self.writer_class = optional_import('torch.utils.tensorboard', 'TensorBoardCallback', 'tensorboard').SummaryWriter
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.writer = None

    def open(self) -> None:
        log_dir = self.log_dir if self.log_dir is not None else Path(self.run.path) / 'runs'
        self.writer = self.writer_class(log_dir=str(log_dir))

    def log_params(self, params: dict[str, Any]) -> None:
        table = '\n'.join(['| name | value |', '|---|---|'] + [f'| {k} | {v} |' for k, v in params.items()])
        self.writer.add_text('hparams', table, self.run.start_epoch)

    def log_steps(self, values: dict[str, list[float]], first_step: int) -> None:
        for name, series in values.items():
            for step, value in enumerate(series, start=first_step): self.writer.add_scalar(f'train/{name}', value, step)

    def log_epoch(self, row: dict[str, Any], step: int) -> None:
        for name, value in row.items():
            if name == 'epoch' or value is None or not math.isfinite(value): continue
            self.writer.add_scalar(f'epoch/{name}', value, step)
        self.writer.flush()

    def log_status(self, status: str, error: BaseException | None) -> None:
        self.writer.add_text('status', status if error is None else f'{status}: {type(error).__name__}: {error}')

    def close(self) -> None:
        if self.writer is not None: self.writer.close()
        self.writer = None
