"""The Learner: the training loop and its ordered callback system (course-v3 dl2 protocol)."""
from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .callback import (CANCELS, EVENTS, CancelBatchException, CancelEpochException, CancelTrainException, Callback,
                       Position, TrainEvalCallback, callback_name, flag)
from .callbacks.checkpoint import auto_resume
from .callbacks.distributed import all_gather_rows, distrib_ctx
from .callbacks.schedule import constant_lr, fine_tune, fit_one_cycle, lr_find
from .callbacks.transforms import BatchTransformXCallback
from .checks import check_batch, check_dataset_targets
from .core import TablePrinter, listify, lr_range, param_groups
from .export import export_learner
from .freeze import freeze, freeze_to, unfreeze
from .inference import get_preds, predict, show_results, summary, tta
from .serialization import ReadCheckpoint, hyper_params, load_for_resume, load_learner_state, save_learner

__all__ = ['EVENTS', 'Callback', 'TrainEvalCallback', 'Learner', 'CancelTrainException',
           'CancelEpochException', 'CancelBatchException', 'param_getter']

def param_getter(model: nn.Module) -> Iterable[nn.Parameter]:
    """Default splitter: one parameter group with every parameter."""
    return model.parameters()


def _check_lr(lr: Any) -> None:
    if isinstance(lr, (list, tuple)):
        raise ValueError(f"lr must be one positive number or a slice, got {lr!r}; for one rate per parameter group "
                         f"use slice(lo, hi), fit_one_cycle(max_lr=[...]) or a ParamScheduler per group")
    lr_range(lr, 2)  # checks a number or a slice


class _FitSnapshot:
    """The learner's optimizer, the model's buffers (BatchNorm statistics...) and train/eval modes, and with
    `loaded` (a resume loads them) the weights, optimizer state and counters: to undo a fit that failed before
    any step."""

    def __init__(self, learn: Learner, loaded: bool):
        model, self.learn, self.opt = learn.model, learn, learn.opt
        tensors = [*model.parameters(), *model.buffers()] if loaded else list(model.buffers())
        self.tensors = [(t, t.detach().clone()) for t in tensors]
        self.modes = [(m, m.training) for m in model.modules()]
        self.opt_state = copy.deepcopy(self.opt.state_dict()) if loaded and self.opt is not None else None
        self.counters = learn.n_epochs, learn.n_iter

    def restore(self) -> None:
        with torch.no_grad():
            for tensor, saved in self.tensors: tensor.copy_(saved)
        for module, training in self.modes: module.training = training
        self.learn.opt = self.opt
        if self.opt_state is not None: self.opt.load_state_dict(self.opt_state)
        self.learn.n_epochs, self.learn.n_iter = self.counters


def _with_message(exc: BaseException, text: str) -> BaseException:
    """An exception of the same type whose message adds `text`; `exc` itself with a note when its class
    cannot be rebuilt from a message. The caller chains it (`raise new from exc`)."""
    ok = False
    if len(exc.args) == 1 and isinstance(exc.args[0], str) and not isinstance(exc, OSError):
        try:
            new = type(exc)(f"{exc} [{text}]")
            new.__dict__.update(exc.__dict__)  # keep any attributes the exception carries
            ok = type(new) is type(exc) and text in str(new)
        except Exception:
            ok = False
    if not ok:
        if hasattr(exc, 'add_note'): exc.add_note(text)
        new = exc
    new._minilearn_where = text
    return new


def _annotate(exc: BaseException, cb: Callback, event_name: str) -> BaseException:
    return _with_message(exc, f"raised in callback {cb.name!r} ({type(cb).__name__}) during '{event_name}'")


class Learner:
    """Holds model, data, loss and optimizer, and runs the training loop, firing callback events.

    The state callbacks read and share (`xb`, `yb`, `idx`, `pred`, `loss`, the counters, `position`, `rank`...) is
    listed once, in the `Callback` docstring.
    """

    def __init__(self, model: nn.Module, data: Any, loss_func: Callable, opt_func: Callable = torch.optim.SGD,
                 lr: float = 1e-2, cbs: Any = None, cb_funcs: Any = None, splitter: Callable | None = None,
                 path: str | Path = '.', model_dir: str = 'models'):
        _check_lr(lr)
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not callable(loss_func):
            raise TypeError(f"loss_func must be callable (e.g. torch.nn.functional.cross_entropy), got {loss_func!r}")
        for name in ('train_dl', 'valid_dl'):
            if not hasattr(data, name):
                raise TypeError(f"data must have `train_dl` and `valid_dl` (a DataBunch); {type(data).__name__} "
                                f"has no {name!r}. Build one with DataBunch(train_dl, valid_dl).")
        cb_funcs = listify(cb_funcs)
        for f in cb_funcs:
            if not callable(f) or isinstance(f, Callback):
                raise TypeError(f"cb_funcs entries must be callables that build a callback (a class or a partial), "
                                f"got {f!r}; pass callback instances through `cbs` instead")
        if isinstance(opt_func, torch.optim.Optimizer) or not callable(opt_func):
            raise TypeError(f"opt_func must build the optimizer (a class such as torch.optim.SGD, or "
                            f"partial(torch.optim.Adam, betas=...)), got {opt_func!r}; the learner creates it as "
                            f"opt_func(params, lr=lr) on the first fit")
        self.model, self.data, self.loss_func, self.opt_func = model, data, loss_func, opt_func
        self.lr, self.splitter = lr, splitter or param_getter
        self.path, self.model_dir = Path(path), model_dir
        self.opt, self.logger, self.grad_scaler = None, TablePrinter(), None
        self.frozen_idx = 0  # parameter groups before this index do not train (see `freeze_to`)
        self.in_train, self.dl, self.fit_device, self.rank, self.world_size = False, None, None, 0, 1
        self.xb = self.yb = self.idx = self.pred = self.loss = None
        self.epoch = self.epochs = self.iter = self.iters = self.n_iter = 0
        self.n_epochs, self.position = 0., Position()  # where the current (or last) fit started
        self.start_hypers: list[dict] | None = None  # the optimizer's hyper-parameters when that fit started
        self.cbs: list[Callback] = []
        self._handlers: dict[str, list[Callback]] | None = None
        self._preflight_pending = self._stepped = False
        self.add_cb(TrainEvalCallback())
        self.add_cbs(cbs)
        self.add_cbs(f() for f in cb_funcs)

    # ---- callbacks ------------------------------------------------------------------------------
    def add_cbs(self, cbs: Any) -> None:
        """Attach several callbacks (instances)."""
        for cb in listify(cbs): self.add_cb(cb)

    def add_cb(self, cb: Callback) -> None:
        """Attach one callback; it becomes reachable as `learn.<cb.name>`."""
        if isinstance(cb, type):
            raise TypeError(f"{cb.__name__} is a class, not a callback instance: pass {cb.__name__}() through `cbs`, "
                            f"or the class itself through `cb_funcs`")
        if not callable(cb) or not hasattr(cb, 'set_runner'):
            raise TypeError(f"{cb!r} is not a callback; callbacks subclass minilearn.Callback "
                            f"(pass a class or partial through `cb_funcs` instead)")
        other = cb.__dict__.get('run')
        if other is not None and other is not self and cb in getattr(other, 'cbs', ()):
            raise ValueError(f"{type(cb).__name__} is already attached to another Learner: build a new instance "
                             f"(or pass its class through `cb_funcs`), or remove it there first (remove_cbs)")
        name = cb.name
        if any(c.name == name for c in self.cbs):
            raise ValueError(f"a callback named {name!r} is already attached ({getattr(self, name)!r}); "
                             f"remove it first (learn.remove_cbs) or give the new one another class name")
        if name in vars(self) or hasattr(type(self), name):
            raise ValueError(f"callback name {name!r} clashes with the learner attribute of that name; rename the class")
        unknown = [m for m in dir(type(cb)) if m.startswith(('begin_', 'after_')) and m not in EVENTS]
        if unknown:
            warnings.warn(f"{type(cb).__name__} has method(s) {unknown} named like events that do not exist; "
                          f"valid events: {', '.join(EVENTS)}", stacklevel=3)
        cb.set_runner(self)
        setattr(self, name, cb)
        self.cbs.append(cb)
        self._handlers = None

    def find_cb(self, cls: type) -> Any:
        """The attached callback that is a `cls` (first in `_order`), else None: how callbacks find each other.

        Else the callback attached under the attribute name of `cls`: the course's own classes are found by
        that name (a course-style `Recorder` is `learn.recorder`, which our lr_find reads too)."""
        found = next((cb for cb in sorted(self.cbs, key=lambda cb: cb._order) if isinstance(cb, cls)), None)
        if found is not None: return found
        by_name = self.__dict__.get(callback_name(cls))
        return by_name if any(cb is by_name for cb in self.cbs) else None

    def remove_cbs(self, cbs: Any) -> None:
        """Detach callbacks (instances) from the learner."""
        for cb in listify(cbs):
            if cb in self.cbs:
                self.cbs.remove(cb)
                if self.__dict__.get(cb.name) is cb: delattr(self, cb.name)
        self._handlers = None

    def _handler_table(self) -> dict[str, list[Callback]]:
        # Which callbacks handle which event, in `_order` (stable for ties), from their classes alone; callbacks
        # that override `__call__` (like the course's DebugCallback) receive every event. `after_fit` runs in
        # reverse order, so the swaps callbacks made at begin_fit unwind like nested `with` blocks.
        if self._handlers is None:
            ordered = sorted(self.cbs, key=lambda cb: cb._order)
            self._handlers = {e: [cb for cb in ordered if type(cb).__call__ is not Callback.__call__
                                  or callable(getattr(type(cb), e, None))] for e in EVENTS}
            self._handlers['after_fit'].reverse()
        return self._handlers

    def _skips(self, cb: Callback) -> bool:
        # Rank 0 alone logs and writes files; read at each call, as DistributedCallback sets the rank in begin_fit.
        return self.rank != 0 and flag(cb, 'main_process_only')

    def __call__(self, event_name: str) -> bool:
        """Fire `event_name` on every callback in `_order`; True when any handler asked to skip."""
        handlers = self._handler_table().get(event_name)
        if handlers is None:
            raise ValueError(f"unknown event {event_name!r}; valid events: {', '.join(EVENTS)}")
        skip = False
        for cb in handlers:
            if self._skips(cb): continue
            try:
                skip = cb(event_name) or skip
            except CANCELS:
                raise
            except Exception as e:
                if hasattr(e, '_minilearn_where'): raise
                new = _annotate(e, cb, event_name)
                if new is e: raise
                raise new from e
        return skip

    def _after_fit(self, failure: BaseException | None = None) -> None:
        # Every callback's after_fit runs (each restores what it changed), even when one of them fails.
        # When fit is already failing (`failure`), that exception propagates unchanged and these are warned.
        first_error = None
        for cb in self._handler_table()['after_fit']:
            if self._skips(cb): continue
            try:
                cb('after_fit')
            except Exception as e:
                if first_error is None: first_error = e if hasattr(e, '_minilearn_where') else _annotate(e, cb, 'after_fit')
        if first_error is None: return
        if failure is None: raise first_error
        warnings.warn(f"after_fit also failed while handling {type(failure).__name__}: {first_error!r}", stacklevel=3)

    def show_callbacks(self) -> None:
        """Print, per event, the callbacks that handle it in the order they run."""
        for event, cbs in self._handler_table().items():
            names = ', '.join(f'{type(cb).__name__}({cb._order})' for cb in cbs)
            print(f'{event:<20} {names or "-"}')

    # ---- the loop -----------------------------------------------------------------------------
    def create_opt(self) -> None:
        """Build the optimizer as `opt_func(param_groups, lr=lr)` from the splitter's groups (an lr slice gives
        each group its rate, see `lr_range`)."""
        groups = param_groups(self.splitter, self.model)
        if isinstance(self.lr, slice) and groups and isinstance(groups[0], dict):
            for group, lr in zip(groups, lr_range(self.lr, len(groups))): group.setdefault('lr', lr)
        self.opt = self.opt_func(groups, lr=self.lr.stop if isinstance(self.lr, slice) else self.lr)

    def fit(self, epochs: int, cbs: Any = None, reset_opt: bool = False, start_epoch: int = 0,
            resume: str | Path | ReadCheckpoint | None = None, lr: float | slice | None = None) -> None:
        """Train for `epochs` epochs (continuing after `start_epoch` completed ones when resuming).

        `lr`: this fit's learning rate per parameter group (a number, a slice, or one per group, see `lr_range`),
        instead of the optimizer's.

        `resume`: a checkpoint (CheckpointCallback's, or `learn.save`'s; its path, or `read_checkpoint(path)`) to
        load first and continue from where it was written, inside an epoch included; the run then ends as the
        uninterrupted one would. `resume='auto'`: the attached CheckpointCallback's newest intact checkpoint
        (falling back to an earlier one it kept, with a warning, when the newest is corrupt; one written at the
        end of the run loads and leaves nothing to train), else a fresh start: what a script restarted by
        `torchrun --max-restarts` or a cluster's requeue passes.
        A fit that fails before its first optimizer step leaves the model, optimizer and step counters as they
        were (what a resume loaded included; the callback states, random generators and loader position it
        loaded stay).
        """
        self._check_fit_args(epochs, start_epoch)
        cbs = listify(cbs) + ([constant_lr(self, lr)] if lr is not None else [])
        added, position = [], Position(start_epoch)
        before = _FitSnapshot(self, loaded=resume is not None)
        try:
            for cb in cbs:
                self.add_cb(cb)
                added.append(cb)
            auto = isinstance(resume, str) and resume == 'auto'
            if auto: resume = auto_resume(self)
            if resume is not None:
                position = load_for_resume(self, resume, epochs, start_epoch, reset_opt, finished_ok=auto)
        except Exception:
            self.remove_cbs(added)
            raise
        failure, self._stepped = None, False
        try:
            if reset_opt or self.opt is None: self.create_opt()
            # What schedules put back at after_fit; a resume loaded those of the fit it continues.
            self.start_hypers = hyper_params(self.opt)
            self.epochs, self.position, self.loss = epochs, position, torch.tensor(0.)
            self._preflight_pending = True
            self('begin_fit')
            for epoch in range(position.epoch, epochs):
                self.epoch = epoch
                self._do_epoch()
        except CancelTrainException:
            self('after_cancel_train')
        except BaseException as e:
            failure = e
            if not self._stepped: before.restore()  # failed before any step: leave the learner as it was
            raise
        finally:
            try:
                self._after_fit(failure)
            finally:
                self.remove_cbs(cbs)
                self._release_batch()

    @property
    def start_epoch(self) -> int:
        """Completed epochs the current (or last) fit started after: `position.epoch` (read-only)."""
        return self.position.epoch

    @property
    def start_iter(self) -> int:
        """Training batches of its first epoch done before the fit started: `position.batches_done` (read-only)."""
        return self.position.batches_done

    def _release_batch(self) -> None:
        # Keep the last batch's values for inspection, but not its autograd graph.
        if isinstance(self.pred, torch.Tensor): self.pred = self.pred.detach()
        if isinstance(self.loss, torch.Tensor): self.loss = self.loss.detach()

    def _check_fit_args(self, epochs: Any, start_epoch: Any) -> None:
        if isinstance(epochs, bool) or not isinstance(epochs, int):
            raise TypeError(f"epochs must be a positive int, got {epochs!r}")
        if epochs < 1: raise ValueError(f"epochs must be a positive int, got {epochs}")
        if isinstance(start_epoch, bool) or not isinstance(start_epoch, int) or not 0 <= start_epoch < epochs:
            raise ValueError(f"start_epoch must be an int in [0, epochs={epochs}), got {start_epoch!r}")
        _check_lr(self.lr)
        try:
            n = len(self.data.train_dl)
        except TypeError:
            raise TypeError("data.train_dl must have a length (a DataLoader over a map-style dataset)") from None
        if n == 0:
            raise ValueError("the training DataLoader is empty: check the dataset is not empty and that "
                             "drop_last=True does not drop every batch (batch size larger than the dataset?)")
        if self.data.valid_dl is not None:
            try:
                len(self.data.valid_dl)
            except TypeError:
                raise TypeError("data.valid_dl must have a length (a DataLoader over a map-style dataset), "
                                "or be None to train without validation") from None

    def _do_epoch(self) -> None:
        self._one_pass(self.data.train_dl, 'begin_epoch')
        if self.data.valid_dl is not None:
            with torch.no_grad(): self._one_pass(self.data.valid_dl, 'begin_validate')
        self('after_epoch')

    def _one_pass(self, dl: Any, begin_event: str) -> None:
        self.dl = dl
        try:
            if not self(begin_event): self.all_batches()
        except CancelEpochException:
            self('after_cancel_epoch')

    def all_batches(self) -> None:
        """Run every batch of `self.dl` (those not done yet, in the epoch a resumed fit starts inside).

        `idx` is the loader's `last_idx` (TensorLoader, ResumableLoader, their DDP shards: indices into the full
        dataset), a tensor already made, so reading it costs no host sync; None for loaders without it."""
        self.iters = len(self.dl)
        for i, batch in enumerate(self.dl, self.position.done_in(self.epoch) if self.dl is self.data.train_dl else 0):
            self.idx = getattr(self.dl, 'last_idx', None)
            self.one_batch(i, *self._split_batch(batch))

    @staticmethod
    def _split_batch(batch: Any) -> tuple[Any, Any]:
        if isinstance(batch, (list, tuple)) and len(batch) == 2: return batch[0], batch[1]
        raise ValueError(f"each batch must be an (xb, yb) pair; the DataLoader gave a {type(batch).__name__}"
                         f"{f' of length {len(batch)}' if hasattr(batch, '__len__') else ''}")

    def one_batch(self, i: int, xb: Any, yb: Any) -> None:
        """Forward and loss, then (in training) backward and step, for one batch, firing its events."""
        try:
            self.iter, self.xb, self.yb = i, xb, yb
            self('begin_batch')
            self.pred = self._forward()
            self('after_pred')
            if self._preflight_pending: self._preflight()
            self.loss = self.loss_func(self.pred, self.yb)
            self('after_loss')
            if self.in_train: self._train_step()
        except CancelBatchException:
            self('after_cancel_batch')
        self('after_batch')

    def _train_step(self) -> None:
        self.backward()
        self('after_backward')
        self.step()
        self('after_step')
        self.opt.zero_grad()

    def _forward(self) -> Any:
        if not self._preflight_pending: return self.model(self.xb)
        try:
            return self.model(self.xb)
        except Exception as e:  # name the input once, on the first batch of a fit
            shape = tuple(self.xb.shape) if isinstance(self.xb, torch.Tensor) else type(self.xb).__name__
            new = _with_message(e, f"the model's forward failed on the first batch, input shape {shape}")
            if new is e: raise
            raise new from e

    def _preflight(self) -> None:
        # Once per fit, on the loop's own first batch: catch data/model mismatches before any step.
        self._preflight_pending = False
        check_batch(self.pred, self.yb, self.loss_func)
        check_dataset_targets(self.data, self.pred, self.yb, self.loss_func)

    def backward(self) -> None:
        """Backpropagate the loss (through the mixed-precision scaler when one is set)."""
        loss = self.loss if self.grad_scaler is None else self.grad_scaler.scale(self.loss)
        loss.backward()

    def step(self) -> None:
        """One optimizer step (through the mixed-precision scaler when one is set)."""
        self._stepped = True
        if self.grad_scaler is None:
            self.opt.step()
        else:
            self.grad_scaler.step(self.opt)
            self.grad_scaler.update()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the processes of a distributed fit (a collective: every rank calls it); `t` on one."""
        if self.world_size == 1: return t
        t = t.to(self.fit_device)  # NCCL reduces tensors on this process's GPU only
        dist.all_reduce(t)
        return t

    def all_gather_rows(self, t: torch.Tensor | None) -> torch.Tensor | None:
        """Every process's rows of `t` joined along dim 0 (they may hold different numbers, or None; a collective);
        `t` on one process."""
        if self.world_size == 1: return t
        return all_gather_rows(t, self.fit_device)

    def norm_stats(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (mean, std) the learner's BatchTransformXCallback normalizes with; None when it normalizes nothing."""
        cb = self.find_cb(BatchTransformXCallback)
        return None if cb is None else cb.norm_stats()

    # ---- conveniences implemented in their own modules ------------------------------------------
    def fit_one_cycle(self, epochs: int, max_lr: float | None = None, pct_start: float = 0.3, div: float = 25.,
                      div_final: float = 1e5, moms: tuple[float, float] | None = (0.95, 0.85), cbs: Any = None,
                      **kwargs: Any) -> None:
        """Fit with a one-cycle schedule: cosine warm-up of lr to `max_lr`, then annealing; momentum inverted."""
        fit_one_cycle(self, epochs, max_lr=max_lr, pct_start=pct_start, div=div, div_final=div_final, moms=moms,
                      cbs=cbs, **kwargs)

    def fine_tune(self, epochs: int, base_lr: float = 2e-3, freeze_epochs: int = 1, lr_mult: float = 100,
                  pct_start: float = 0.3, div: float = 5.0, **kwargs: Any) -> None:
        """fastai's fine-tuning: the head alone (`freeze`) for `freeze_epochs`, then everything with
        discriminative learning rates for `epochs` (one-cycle both times); `resume=` continues either phase."""
        fine_tune(self, epochs, base_lr=base_lr, freeze_epochs=freeze_epochs, lr_mult=lr_mult, pct_start=pct_start,
                  div=div, **kwargs)

    def freeze_to(self, n: int) -> None:
        """Stop the parameter groups before index `n` from training (normalization layers excepted)."""
        freeze_to(self, n)

    def freeze(self) -> None:
        """Train only the last parameter group (the head) and the normalization layers."""
        freeze(self)

    def unfreeze(self) -> None:
        """Train every parameter group."""
        unfreeze(self)

    def lr_find(self, max_iter: int = 100, min_lr: float = 1e-6, max_lr: float = 10., **kwargs: Any) -> float:
        """Sweep the learning rate exponentially, restore the learner, return the suggested lr."""
        return lr_find(self, max_iter=max_iter, min_lr=min_lr, max_lr=max_lr, **kwargs)

    def save(self, path: str | Path, with_opt: bool = True) -> Path:
        """Write a checkpoint (atomically) for exact resume; returns its path."""
        return save_learner(self, path, with_opt=with_opt)

    def load(self, path: str | Path, with_opt: bool = True, strict: bool = True) -> Learner:
        """Load a checkpoint written by `save` (safely: weights_only); the learner is unchanged on error."""
        load_learner_state(self, path, with_opt=with_opt, strict=strict)
        return self

    def get_preds(self, dl: Any = None, with_input: bool = False, with_loss: bool = False, act: Any = None,
                  reorder: bool = True) -> tuple:
        """Predictions and targets over a loader (validation by default), in dataset order."""
        return get_preds(self, dl=dl, with_input=with_input, with_loss=with_loss, act=act, reorder=reorder)

    def predict(self, item: Any) -> tuple:
        """(label, class_index, probabilities) for one raw item."""
        return predict(self, item)

    def tta(self, dl: Any = None, n: int = 4, beta: float = 0.25, tfm: Any = None) -> tuple:
        """Test-time augmentation: blend plain predictions with the mean of `n` augmented passes."""
        return tta(self, dl=dl, n=n, beta=beta, tfm=tfm)

    def show_results(self, n: int = 9, figsize: tuple | None = None):
        """A grid of validation images with predicted vs actual labels; returns the figure."""
        return show_results(self, n=n, figsize=figsize)

    def show_batch(self, n: int = 9, valid: bool = False, **kwargs: Any):
        """A grid of `n` images of one training (or validation) batch, with their class names; returns the figure."""
        return self.data.show_batch(n=n, valid=valid, **kwargs)

    def summary(self) -> str:
        """Per-layer output shapes and parameter counts, optimizer, loss and callbacks."""
        return summary(self)

    def export(self, path: str | Path = 'export.pt2', arch: str | None = None, arch_kwargs: dict | None = None) -> Path:
        """Write a pickle-free inference artefact (`.pt2` program plus a JSON of settings); see `export_learner`."""
        return export_learner(self, path, arch=arch, arch_kwargs=arch_kwargs)

    def distrib_ctx(self, **kwargs: Any):
        """Context manager: train with DistributedCallback (torchrun) for the duration of the block."""
        return distrib_ctx(self, **kwargs)

    def __repr__(self) -> str:
        cbs = ', '.join(type(cb).__name__ for cb in self.cbs)
        return f'Learner(model={type(self.model).__name__}, loss_func={getattr(self.loss_func, "__name__", self.loss_func)}, lr={self.lr}, cbs=[{cbs}])'
