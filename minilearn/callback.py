"""The callback protocol: the events, the cancel exceptions, `Callback` with every hook and flag declared
once, `TrainEvalCallback`, and the `_order` table of the library's callbacks.

The learner fires each event as `cb(event_name)`; `Callback.__call__` looks up the method of that name, so a
callback may override dispatch (the course's DebugCallback does). This module knows nothing of the learner
but the attributes it reads through `self.run`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .core import camel2snake

if TYPE_CHECKING:
    from .learner import Learner

__all__ = ['EVENTS', 'Callback', 'TrainEvalCallback', 'CancelTrainException', 'CancelEpochException',
           'CancelBatchException', 'CANCELS', 'Order', 'Position', 'require_idx']

EVENTS = ('begin_fit', 'begin_epoch', 'begin_batch', 'after_pred', 'after_loss', 'after_backward',
          'after_step', 'after_cancel_batch', 'after_batch', 'after_cancel_epoch', 'begin_validate',
          'after_epoch', 'after_cancel_train', 'after_fit')


class CancelTrainException(Exception):
    """Raise in a callback to stop training: `after_cancel_train`, then `after_fit` run."""


class CancelEpochException(Exception):
    """Raise in a callback to end the current pass (training or validation) early."""


class CancelBatchException(Exception):
    """Raise in a callback to skip the rest of the current batch (`after_batch` still runs)."""


CANCELS = (CancelTrainException, CancelEpochException, CancelBatchException)


class Order:
    """`_order` of the library's callbacks, in one table: lower runs first at every event but `after_fit`,
    which runs in reverse so that what `begin_fit` swapped in unwinds like nested `with` blocks."""
    TERMINATE_ON_NAN = -10   # first at after_loss: a NaN batch is neither accumulated nor stepped
    DISTRIBUTED = -6         # wraps the model before the device move, Compile and MixedPrecision see it
    DEVICE = -5              # model and batches on the device before anything else looks at them
    CHANNELS_LAST = -4.8     # memory format after the device move, before the model is compiled
    COMPILE = -4.5           # after the device move and distributed wrapping, before MixedPrecision reads the model
    MIXED_PRECISION = -4     # first at after_pred, so later callbacks see float32 predictions
    GRADIENT_ACCUMULATION = -3
    PROGRESS = -1            # its bars open before the epoch's other callbacks report
    DEFAULT = 0              # TrainEval, AvgStats, Recorder, GradientClipping, users' callbacks
    SCHEDULE = 1             # ParamScheduler and LR_Find: the rates are set before the step
    BATCH_TRANSFORM = 2      # normalization, on the device
    AUGMENT = 3              # batch augmentation, after normalization (zero padding is the mean)
    HOOKS = 10
    LOGGER = 20              # after AvgStatsCallback has added the epoch's row to its history
    TRACKER = 50             # after AvgStatsCallback has written the epoch's row in after_epoch
    EARLY_STOPPING = 55
    SAVE_MODEL = 60          # after EarlyStopping, so the saved file holds its updated state
    CHECKPOINT = 70          # resume checkpoints: after every callback has updated its state for the batch/epoch
    MIX = 90                 # MixUp and CutMix mix the finished batch: after device, normalization, augmentation


@dataclass(frozen=True)
class Position:
    """Where a fit starts (`learn.position`): after `epoch` completed epochs and `batches_done` training batches of
    epoch `epoch` (non-zero only when the fit resumes inside that epoch, read from the loaded checkpoint)."""
    epoch: int = 0
    batches_done: int = 0

    @property
    def resuming(self) -> bool:
        """Whether the fit continues an earlier one (it starts after epoch 0's first batch)."""
        return self.epoch > 0 or self.batches_done > 0

    def done_in(self, epoch: int) -> int:
        """Training batches of `epoch` done before this fit began: `batches_done` in the epoch it resumes inside."""
        return self.batches_done if epoch == self.epoch else 0


def callback_name(cls: type) -> str:
    """snake_case of a callback class's name without its `Callback` suffix (`AvgStatsCallback` -> `avg_stats`)."""
    return camel2snake(re.sub(r'Callback$', '', cls.__name__) or 'callback')


class Callback:
    """Base class of callbacks: a method per event it handles; reads fall through to the learner.

    Events (each a method taking no argument; a `begin_*` handler returning True skips that step):
    `begin_fit`, `begin_epoch` (training pass), `begin_batch`, `after_pred`, `after_loss`, `after_backward`,
    `after_step`, `after_cancel_batch`, `after_batch` (training and validation), `after_cancel_epoch`,
    `begin_validate`, `after_epoch`, `after_cancel_train`, `after_fit` (always runs, in reverse `_order`).

    The learner's state that callbacks share (read as `self.<name>`, set as `self.run.<name> = ...` and put back
    in `after_fit`): `model`, `data`, `loss_func`, `opt`, `logger`, `grad_scaler`; the batch `xb`, `yb`, `pred`,
    `loss`, `idx` (each item's dataset index, on the batch's device; None when the loader cannot tell); the
    loop's counters `epoch`, `epochs`, `iter`, `iters`, `n_epochs`, `n_iter`, `in_train`, `dl`;
    `position`, a `Position`: where the fit starts (a callback restores its own state in `load_state_dict`,
    however the fit is resumed, and at `begin_fit` keeps what it holds only when `position.resuming`); and, for
    the processes of a distributed fit, `rank` and `world_size` (0 and 1 unless DistributedCallback sets them; on
    other ranks than 0 callbacks with `main_process_only` get no event), `fit_device` (where the fit puts the
    model and batches, None when no callback chose: DistributedCallback sets this process's device, else
    DeviceCallback its own) and the collectives `all_reduce(t)` (sum over the processes) and
    `all_gather_rows(t)` (rows of every process), `t` itself on one process. Callbacks cooperate through these
    and `find_cb`; none sets another's attributes.
    """
    _order: float = Order.DEFAULT  # position among the callbacks at every event (see `Order`)
    run: Learner | None = None  # the learner this callback is attached to (set by `set_runner`)
    for_inference: bool = False  # True for batch callbacks that prediction must apply too (device, normalization)
    run_during_lr_find: bool = True  # False for callbacks whose records or files an LR-finder sweep must not touch
    main_process_only: bool = False  # True for callbacks that write files or logs: they run on rank 0 alone

    def set_runner(self, run: Learner) -> None:
        """Attach this callback to a learner (`self.run`)."""
        self.run = run

    def state_dict(self) -> dict | None:
        """What a checkpoint must hold for an exact resume; None (the default) means nothing."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: read the learner's state (`self.xb`, `self.model`...).
        if name.startswith('__') or self.__dict__.get('run') is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.__dict__['run'], name)

    @property
    def name(self) -> str:
        """snake_case of the class name without its `Callback` suffix: the learner attribute it appears as."""
        return callback_name(type(self))

    def __call__(self, event_name: str) -> bool:
        """Run this callback's handler of `event_name`, if any; True means 'skip' for begin events."""
        handler = getattr(self, event_name, None)
        return bool(handler and handler())

    def __repr__(self) -> str:
        return f'{type(self).__name__}(_order={self._order})'


def flag(cb: Any, name: str) -> Any:
    """A class-level flag of `cb` (`for_inference`...), with the base's default for callbacks written against
    the course's own Callback class, which lacks them (and whose `__getattr__` would ask the learner)."""
    return getattr(type(cb), name, getattr(Callback, name))


def has_state(cb: Callback) -> bool:
    """Whether `cb` overrides `state_dict` (its state goes into checkpoints)."""
    return getattr(type(cb), 'state_dict', None) is not Callback.state_dict and callable(getattr(cb, 'state_dict', None))


def require_idx(cb: Callback) -> None:
    """Raise unless the training loader tells each batch's dataset indices (`learn.idx`): for callbacks that keep
    per-item state, at `begin_fit` (after DistributedCallback has sharded the loaders), before any step."""
    dl = cb.run.data.train_dl
    if not hasattr(dl, 'last_idx'):
        raise ValueError(f"{type(cb).__name__} keeps a state per training item and needs each batch's dataset "
                         f"indices (learn.idx), which a {type(dl).__name__} does not give: build the data with "
                         f"DataBunch.from_tensors or DataBunch.from_datasets (get_dls)")


class TrainEvalCallback(Callback):
    """Always present: switches train/eval mode and keeps the progress counters `n_epochs`, `n_iter`."""

    def begin_fit(self) -> None:
        n_batches, start = len(self.run.data.train_dl), self.run.position
        # The same expressions after_batch computes, so a resumed run's schedules see the same floats.
        self.run.n_epochs = start.epoch + start.batches_done / n_batches
        self.run.n_iter = start.epoch * n_batches + start.batches_done

    def begin_epoch(self) -> None:
        # batches done: 0 but in the epoch a fit resumes inside (then after_batch's expression, as at begin_fit)
        self.run.n_epochs = self.run.epoch + self.run.position.done_in(self.run.epoch) / len(self.run.dl)
        self.run.model.train()
        self.run.in_train = True

    def after_batch(self) -> None:
        if not self.run.in_train: return
        self.run.n_epochs = self.run.epoch + (self.run.iter + 1) / self.run.iters
        self.run.n_iter += 1

    def begin_validate(self) -> None:
        self.run.model.eval()
        self.run.in_train = False
