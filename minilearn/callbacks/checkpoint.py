"""Checkpoint callbacks: keep the best (or every) model, keep a checkpoint to resume from (and stop cleanly
on SIGTERM), stop early, stop on a non-finite loss."""
from __future__ import annotations

import math
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from ..callback import Callback, CancelTrainException, Order
from ..core import is_interactive, model_device
from ..serialization import checkpoint_path, has_position, rank_states, save_learner, training_position
from .metrics import AvgStatsCallback
from .precision import GradientAccumulation

__all__ = ['TrackerCallback', 'SaveModelCallback', 'CheckpointCallback', 'TrainingInterrupted',
           'EarlyStoppingCallback', 'TerminateOnNaNCallback']


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
        if not self.run.position.resuming: self.best = math.inf if self.mode == 'min' else -math.inf

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
        if not self.run.position.resuming: self.wait, self.best_epoch = 0, None

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


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped by a signal: `signum`, and `checkpoint`, the file it continues from (None if none was written).

    A KeyboardInterrupt, so code that handles Ctrl-C handles it; `exit_code` is the shell's 128 + signal number
    (143 for SIGTERM, 130 for SIGINT).
    """

    def __init__(self, message: str, signum: int, checkpoint: Path | None):
        super().__init__(message)
        self.signum, self.checkpoint = signum, checkpoint

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


def _default_signals() -> list[int]:
    # Someone who can press Ctrl-C wants it to stop at once; a scheduler's SIGINT is a request to stop cleanly.
    return [signal.SIGTERM] + ([] if is_interactive(sys.stdin) else [signal.SIGINT])


def _signal_list(signals: Any) -> list[int] | str:
    """`signals` as CheckpointCallback keeps it: 'default', or a list of signals (from one, a list or None)."""
    if isinstance(signals, str):
        if signals == 'default': return signals
        raise ValueError(f"signals must be 'default', None, a signal or a list of signals, got {signals!r}")
    if signals is None: return []
    signals = list(signals) if isinstance(signals, (list, tuple, set, frozenset)) else [signals]
    bad = [s for s in signals if isinstance(s, bool) or not isinstance(s, int) or s not in signal.valid_signals()]
    if bad:
        raise ValueError(f"signals must be 'default', None, a signal or a list of signals (signal.SIGTERM...), "
                         f"got {bad[0]!r}")
    return [signal.Signals(s) for s in signals]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class CheckpointCallback(Callback):
    """Keep one checkpoint to resume a run from exactly: every `every_n_batches` training batches (inside the
    epoch) and at the end of every epoch, written atomically to `fname` (a bare name means
    `<learn.path>/<learn.model_dir>/<fname>.pth`). Continue with `learn.fit(epochs, resume=path)`.

    While fitting, on one of `signals` (a signal or a list; default: SIGTERM, and SIGINT when no one is at a
    terminal or notebook) it finishes the current training batch, writes the checkpoint, lets `after_fit`
    restore the learner and raises `TrainingInterrupted`; during validation, the last batch of a training
    pass, or with a training loader that cannot resume inside an epoch (a plain DataLoader) it stops at the
    end of the epoch instead (in the last epoch, the fit just ends). A second signal raises at once (an
    unfinished write leaves the previous checkpoint intact). Handlers are only installed from the
    main thread and are restored after the fit. With GradientAccumulation, checkpoints wait for the next
    optimizer step. Under DDP every rank keeps its place (rank 0 writes) and the ranks agree on stopping at
    the next checkpoint batch or epoch end.
    """
    _order = Order.CHECKPOINT
    run_during_lr_find = False

    def __init__(self, fname: str | Path = 'checkpoint', every_n_batches: int | None = None, every_epoch: bool = True,
                 signals: int | Sequence[int] | None | str = 'default'):
        if every_n_batches is not None and (isinstance(every_n_batches, bool) or not isinstance(every_n_batches, int)
                                            or every_n_batches < 1):
            raise ValueError(f"every_n_batches must be a positive int (training batches between checkpoints) or None, "
                             f"got {every_n_batches!r}")
        self.fname, self.every_n_batches, self.every_epoch = fname, every_n_batches, every_epoch
        self.signals = _signal_list(signals)
        self.path: Path | None = None
        self.written: Path | None = None  # the last checkpoint this callback completed
        self._signal: int | None = None
        self._previous: dict[int, Any] = {}
        self._mark, self._accumulation, self._mid_epoch = 0, None, False

    # ---- fit ----------------------------------------------------------------------------------------
    def begin_fit(self) -> None:
        self.path = checkpoint_path(self.run, self.fname)
        if self.every_n_batches and not has_position(self.run.data.train_dl):
            raise ValueError(f"CheckpointCallback(every_n_batches={self.every_n_batches}) needs a training loader that "
                             f"can resume inside an epoch (state_dict/load_state_dict), got "
                             f"{type(self.run.data.train_dl).__name__}: build the data with DataBunch.from_datasets, "
                             f"get_dls or DataBunch.from_tensors, or checkpoint per epoch only (every_n_batches=None)")
        if self.written is None and self.path.is_file(): self.written = self.path  # a resumed run's own file
        self._signal, self._mark = None, self._batch_mark()
        self._mid_epoch = has_position(self.run.data.train_dl)  # else a signal waits for the epoch's end
        self._accumulation = self.run.find_cb(GradientAccumulation)
        self._install_handlers()

    def _batch_mark(self) -> int:
        return self.run.n_iter // self.every_n_batches if self.every_n_batches else 0

    def after_batch(self) -> None:
        if not self._resumable_after_batch(): return
        due = self._batch_due()
        stop = self._stop_requested(collective=due)
        if due or stop:
            self._mark = self._batch_mark()
            self._save()
        if stop: self._stop(stop)

    def after_epoch(self) -> None:
        stop = self._stop_requested(collective=True)
        last = self.run.epoch + 1 >= self.run.epochs
        if self.every_epoch or (stop and not last): self._save()
        if stop and not last: self._stop(stop)  # after the last epoch the fit is over anyway

    def after_fit(self) -> None:
        self._restore_handlers()

    # ---- the decisions after a batch ----------------------------------------------------------------
    def _resumable_after_batch(self) -> bool:
        """Whether a checkpoint written now continues exactly: a training batch before the epoch's last (whose end
        after_epoch checkpoints), a training loader that can start inside an epoch, no half-accumulated gradients."""
        run, acc = self.run, self._accumulation
        if not run.in_train or run.iter + 1 >= run.iters or not self._mid_epoch: return False
        return acc is None or not acc.n_batches

    def _batch_due(self) -> bool:
        """Whether `every_n_batches` training batches have passed since the last batch checkpoint."""
        return self.every_n_batches is not None and self._batch_mark() > self._mark

    def _stop_requested(self, collective: bool) -> int | None:
        """The signal to stop on now, if any. Under DDP the ranks agree on it (a collective), only where every rank
        calls this with `collective` (checkpoint batches, epoch ends): elsewhere none is acted on."""
        if not _distributed(): return self._signal
        return self._agreed_signal() if collective else None

    # ---- checkpoint and stop ------------------------------------------------------------------------
    def _save(self) -> None:
        self.written = save_learner(self.run, self.path, ranks=rank_states(self.run))

    def _stop(self, signum: int) -> None:
        epoch, it = training_position(self.run)
        where = f"inside epoch {epoch} after {it} batch(es)" if it else f"after {epoch} epoch(s)"
        raise TrainingInterrupted(f"training stopped by {signal.Signals(signum).name} {where}; checkpoint written to "
                                  f"{self.written}; continue with learn.fit({self.run.epochs}, "
                                  f"resume={str(self.written)!r}) (fit_one_cycle accepts resume= too)",
                                  signum, self.written)

    def _agreed_signal(self) -> int | None:
        # Every rank stops at the same batch, or the others would wait forever in the next all-reduce.
        device = model_device(self.run.model, torch.device('cpu'))
        if dist.get_backend() == 'nccl' and device.type != 'cuda':
            device = torch.device('cuda', torch.cuda.current_device())
        flag = torch.tensor(self._signal or 0, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item()) or None  # once per checkpoint, not per batch

    # ---- signal handlers ----------------------------------------------------------------------------
    def _install_handlers(self) -> None:
        signals = _default_signals() if self.signals == 'default' else self.signals
        if not signals or threading.current_thread() is not threading.main_thread(): return
        for signum in signals: self._previous[signum] = signal.signal(signum, self._on_signal)

    def _restore_handlers(self) -> None:
        previous, self._previous = self._previous, {}
        for signum, handler in previous.items(): signal.signal(signum, signal.SIG_DFL if handler is None else handler)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._signal is None:
            self._signal = signum  # acted on after the current batch
            return
        self._restore_handlers()
        raise TrainingInterrupted(f"training aborted at once by a second signal ({signal.Signals(signum).name}); the "
                                  f"last complete checkpoint is {self.written}" if self.written else
                                  f"training aborted at once by a second signal ({signal.Signals(signum).name}); no "
                                  f"checkpoint was written in this fit", signum, self.written)
