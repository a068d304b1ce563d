"""Hyper-parameter schedules (annealers, combine_scheds), ParamScheduler, one-cycle and the LR finder."""
from __future__ import annotations

import bisect
import copy
import functools
import math
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Any

import torch

from ..core import check_positive, listify, lr_range, param_groups
from ..serialization import checkpoint_path, get_rng_states, has_position, read_checkpoint, set_rng_states
from ..callback import Callback, CancelTrainException, Order, flag
from .checkpoint import auto_resume
from .metrics import AvgStatsCallback
from .recorder import Recorder, suggest_lr

__all__ = ['annealer', 'sched_lin', 'sched_cos', 'sched_no', 'sched_exp', 'combine_scheds', 'cos_1cycle_anneal',
           'create_phases', 'ParamScheduler', 'LR_Find', 'fit_one_cycle', 'fine_tune', 'lr_find', 'constant_lr']

Schedule = Callable[[float], float]


# ---- annealers: f(start, end) -> g(pos), pos in [0, 1] ----------------------------------------------
def annealer(f: Callable[[float, float, float], float]) -> Callable[[float, float], Schedule]:
    """Decorator (course style): `f(start, end, pos)` becomes `f(start, end)` returning `g(pos)`."""
    def _inner(start: float, end: float) -> Schedule:
        return functools.partial(f, start, end)
    _inner.__name__, _inner.__doc__ = f.__name__, f.__doc__
    return _inner


# Written as weighted sums `start*(1-w) + end*w` (same values as the course's `start + w*(end-start)`) so
# that pos 0 and pos 1 give exactly `start` and `end`: phase boundaries of combine_scheds are exact.
def _lin(start: float, end: float, pos: float) -> float:
    return start * (1 - pos) + end * pos


def _cos(start: float, end: float, pos: float) -> float:
    weight = (1 + math.cos(math.pi * (1 - pos))) / 2
    return start * (1 - weight) + end * weight


def _no(start: float, end: float, pos: float) -> float:
    return start


def _exp(start: float, end: float, pos: float) -> float:
    return end if pos == 1 else start * (end / start) ** pos


def sched_lin(start: float, end: float) -> Schedule:
    """Linear from `start` (pos 0) to `end` (pos 1)."""
    return functools.partial(_lin, start, end)


def sched_cos(start: float, end: float) -> Schedule:
    """Half a cosine from `start` (pos 0) to `end` (pos 1)."""
    return functools.partial(_cos, start, end)


def sched_no(start: float, end: float) -> Schedule:
    """Constant `start` (`end` is ignored)."""
    return functools.partial(_no, start, end)


def sched_exp(start: float, end: float) -> Schedule:
    """Exponential (linear in log space) from `start` to `end`; both must be non-zero and of the same sign."""
    if start == 0 or end == 0 or (start > 0) != (end > 0):
        raise ValueError(f"sched_exp needs start and end non-zero and of the same sign, got {start!r} and {end!r}")
    return functools.partial(_exp, start, end)


def cos_1cycle_anneal(start: float, high: float, end: float) -> list[Schedule]:
    """The two halves of a cosine one-cycle: `start` up to `high`, then `high` down to `end`."""
    return [sched_cos(start, high), sched_cos(high, end)]


def create_phases(phases: float | Sequence[float]) -> list[float]:
    """Phase fractions completed with the remainder up to 1 (`0.3` -> `[0.3, 0.7]`)."""
    phases = [float(p) for p in listify(phases)]
    return phases + [1 - sum(phases)]


def _combined(bounds: list[float], scheds: list[Schedule], pos: float) -> float:
    pos = min(max(pos, 0.), 1.)
    idx = min(bisect.bisect_right(bounds, pos) - 1, len(scheds) - 1)
    while bounds[idx + 1] == bounds[idx]: idx -= 1  # trailing phases of zero length
    return scheds[idx]((pos - bounds[idx]) / (bounds[idx + 1] - bounds[idx]))


def combine_scheds(pcts: Sequence[float], scheds: Sequence[Schedule]) -> Schedule:
    """One schedule made of phases: `scheds[i]` runs over fraction `pcts[i]` of the training (pcts sum to 1)."""
    pcts, scheds = list(pcts), list(scheds)
    if len(pcts) != len(scheds) or not pcts:
        raise ValueError(f"combine_scheds needs one fraction per schedule, got {len(pcts)} fractions and "
                         f"{len(scheds)} schedules")
    if any(isinstance(p, bool) or not isinstance(p, Real) or not p >= 0 for p in pcts):
        raise ValueError(f"combine_scheds fractions must be numbers >= 0, got {pcts}")
    if not math.isclose(sum(pcts), 1., abs_tol=1e-6):
        raise ValueError(f"combine_scheds fractions must sum to 1, got {pcts} (sum {sum(pcts)}); "
                         f"e.g. create_phases(0.3) gives [0.3, 0.7]")
    if not any(pcts): raise ValueError("combine_scheds needs at least one fraction > 0")
    not_callable = [s for s in scheds if not callable(s)]
    if not_callable: raise TypeError(f"combine_scheds schedules must be callables pos -> value, got {not_callable}")
    bounds = [0.]
    for p in pcts: bounds.append(bounds[-1] + float(p))
    bounds[-1] = 1.  # exactly: the last phase ends at pos 1 whatever the rounding of the sum
    return functools.partial(_combined, bounds, scheds)


# ---- optimizer hyper-parameters ---------------------------------------------------------------------
# Course and fastai names: 'mom' is SGD's momentum or Adam's first beta; 'beta1' is how Recorder names betas[0].
_ALIASES = {'mom': ('momentum', 'betas'), 'beta1': ('betas',)}


def _hyper_key(group: dict, pname: str) -> str | None:
    if pname in group: return pname
    return next((key for key in _ALIASES.get(pname, ()) if key in group), None)


def _set_hyper(group: dict, key: str, value: Any) -> None:
    current = group[key]
    if key == 'betas' and not isinstance(value, (tuple, list)):
        group[key] = (value, *current[1:])
    elif isinstance(current, torch.Tensor):
        current.fill_(value)  # a tensor hyper-parameter (capturable/fused optimizers): written on its device
    else:
        group[key] = value


def _copy_hyper(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _restore_hyper(group: dict, key: str, saved: Any) -> None:
    if isinstance(group[key], torch.Tensor) and isinstance(saved, torch.Tensor): group[key].copy_(saved)
    else: group[key] = saved


class ParamScheduler(Callback):
    """Set hyper-parameter `pname` of each param group from `sched_funcs(n_epochs/epochs)` before each training batch.

    `sched_funcs` is one schedule for every group or a list with one per group. `pname` is any key of the
    optimizer's param groups (`lr`, `momentum`, `weight_decay`, `betas` — a number sets betas[0]) or the
    alias `mom` (momentum, or betas[0] for Adam-like optimizers). The values the fit started with are put
    back at `after_fit`. With `skip_missing`, an optimizer without `pname` is left alone instead of an error.
    """
    _order = Order.SCHEDULE

    def __init__(self, pname: str, sched_funcs: Schedule | Sequence[Schedule], skip_missing: bool = False):
        if not isinstance(pname, str) or not pname:
            raise TypeError(f"pname must be the name of a hyper-parameter such as 'lr', got {pname!r}")
        funcs = list(sched_funcs) if isinstance(sched_funcs, (list, tuple)) else [sched_funcs]
        if not funcs or not all(callable(f) for f in funcs):
            raise TypeError(f"sched_funcs must be a schedule (a callable pos -> value, e.g. sched_cos(0.1, 1e-3)) "
                            f"or a list of them, one per param group; got {sched_funcs!r}")
        self.pname, self.sched_funcs, self.skip_missing = pname, sched_funcs, skip_missing
        self._targets: list | None = None
        self._saved: list | None = None

    @property
    def name(self) -> str:
        """`<pname>_scheduler`, so that schedulers of several hyper-parameters can be attached together."""
        return f'{self.pname}_scheduler'

    def begin_fit(self) -> None:
        groups, funcs = self.run.opt.param_groups, self.sched_funcs
        funcs = list(funcs) if isinstance(funcs, (list, tuple)) else [funcs] * len(groups)
        if len(funcs) != len(groups):
            raise ValueError(f"ParamScheduler({self.pname!r}) has {len(funcs)} schedules for {len(groups)} param "
                             f"groups; pass one schedule for all groups or exactly one per group")
        keys = [_hyper_key(g, self.pname) for g in groups]
        if None in keys:
            if self.skip_missing:
                self._targets = []
                return
            available = sorted(k for k in groups[keys.index(None)] if k != 'params')
            raise ValueError(f"ParamScheduler: the optimizer ({type(self.run.opt).__name__}) has no hyper-parameter "
                             f"{self.pname!r} in its param groups; available: {available}")
        self._targets = list(zip(groups, keys, funcs))
        self._saved = [_copy_hyper(g[k]) for g, k, _ in self._targets]

    def begin_batch(self) -> None:
        if not self.run.in_train or not self._targets: return
        pos = self.run.n_epochs / self.run.epochs
        for group, key, func in self._targets: _set_hyper(group, key, func(pos))

    def after_fit(self) -> None:
        if self._saved is not None:
            for (group, key, _), saved in zip(self._targets, self._saved): _restore_hyper(group, key, saved)
        self._targets = self._saved = None


# ---- one cycle -----------------------------------------------------------------------------------
def _n_param_groups(learn: Any) -> int:
    if learn.opt is not None: return len(learn.opt.param_groups)
    groups = param_groups(learn.splitter, learn.model)  # as Learner.create_opt reads them
    return len(groups) if groups and isinstance(groups[0], dict) else 1


def _one_cycle_args(learn: Any, max_lr: Any, pct_start: Any, div: Any, div_final: Any, moms: Any) -> list[float]:
    max_lrs = lr_range(max_lr, _n_param_groups(learn), name='max_lr')
    if isinstance(pct_start, bool) or not isinstance(pct_start, Real) or not 0 <= pct_start <= 1:
        raise ValueError(f"pct_start must be a fraction in [0, 1], got {pct_start!r}")
    check_positive('div', div)
    check_positive('div_final', div_final)
    if moms is not None:
        if (not isinstance(moms, (list, tuple)) or len(moms) != 2
                or not all(isinstance(m, Real) and not isinstance(m, bool) and 0 <= m < 1 for m in moms)):
            raise ValueError(f"moms must be None or a pair of momentums in [0, 1) such as (0.95, 0.85), got {moms!r}")
    return max_lrs


def fit_one_cycle(learn: Any, epochs: int, max_lr: float | Sequence[float] | None = None, pct_start: float = 0.3,
                  div: float = 25., div_final: float = 1e5, moms: tuple[float, float] | None = (0.95, 0.85),
                  cbs: Any = None, **kwargs: Any) -> None:
    """Fit with a one-cycle schedule: lr from max_lr/div up to max_lr (cosine, first `pct_start`), then down
    to max_lr/div_final; momentum (or Adam's beta1) the other way, moms[0] -> moms[1] -> moms[0].

    `max_lr` defaults to `learn.lr`; a list gives one per param group, `slice(lo, hi)` spreads the groups
    geometrically from lo (first) to hi (last), `slice(hi)` gives the last group hi and the others hi/10 (fastai).
    With an SGD optimizer this turns
    momentum on (as fastai and torch's OneCycleLR do); `moms=None` leaves momentum alone. `kwargs` go to
    `learn.fit` (`start_epoch` to resume: the schedule continues from start_epoch/epochs).
    """
    max_lrs = _one_cycle_args(learn, learn.lr if max_lr is None else max_lr, pct_start, div, div_final, moms)
    phases = [pct_start, 1 - pct_start]
    lr_scheds = [combine_scheds(phases, cos_1cycle_anneal(lr / div, lr, lr / div_final)) for lr in max_lrs]
    schedulers = [ParamScheduler('lr', lr_scheds if len(set(max_lrs)) > 1 else lr_scheds[0])]
    if moms is not None:
        mom_sched = combine_scheds(phases, cos_1cycle_anneal(moms[0], moms[1], moms[0]))
        schedulers.append(ParamScheduler('mom', mom_sched, skip_missing=True))
    learn.fit(epochs, cbs=listify(cbs) + schedulers, **kwargs)


def fine_tune(learn: Any, epochs: int, base_lr: float = 2e-3, freeze_epochs: int = 1, lr_mult: float = 100,
              pct_start: float = 0.3, div: float = 5.0, **kwargs: Any) -> None:
    """fastai's recipe: train the last group alone (`freeze`) for `freeze_epochs` with a one-cycle to `base_lr`,
    then everything (`unfreeze`) for `epochs` with half of it, the groups spread from base_lr/2/lr_mult up.

    `kwargs` go to both `fit_one_cycle` calls. The per-epoch history (`learn.avg_stats.history`) keeps both
    phases' rows: the frozen epochs first. `resume` (a checkpoint, or 'auto': the attached CheckpointCallback's
    newest) continues the phase that wrote it: the frozen one (then the unfrozen one from its start), or the
    unfrozen one, whose history then holds its own rows only.
    """
    resume = kwargs.pop('resume', None)
    auto = isinstance(resume, str) and resume == 'auto'
    found = auto_resume(learn) if auto else None if resume is None else read_checkpoint(checkpoint_path(learn, resume))
    unfrozen_phase = found is not None and not found.state.get('frozen_idx', 0)  # the second phase wrote it
    for arg, value in (('epochs', epochs), ('freeze_epochs', freeze_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"fine_tune: {arg} must be an int >= 0, got {value!r}")
    check_positive('base_lr', base_lr)
    check_positive('lr_mult', lr_mult)
    learn.freeze()
    stats = learn.find_cb(AvgStatsCallback)
    frozen_rows: list = []
    if freeze_epochs and not unfrozen_phase:
        learn.fit_one_cycle(freeze_epochs, slice(base_lr), pct_start=0.99,
                            resume=None if found is None else resume, **kwargs)
        frozen_rows = list(stats.history) if stats is not None else []
    base_lr /= 2
    learn.unfreeze()
    if not epochs: return
    try:
        learn.fit_one_cycle(epochs, slice(base_lr / lr_mult, base_lr), pct_start=pct_start, div=div,
                            resume=resume if unfrozen_phase else None, **kwargs)
    finally:
        if stats is not None: stats.prepend_history(frozen_rows)


def constant_lr(learn: Any, lr: float | slice | Sequence[float]) -> ParamScheduler:
    """A scheduler holding each parameter group at its rate from `lr` (a number, a slice, or one per group) for
    one fit: what `learn.fit(epochs, lr=...)` attaches; the groups' rates are put back after the fit."""
    lrs = lr_range(lr, _n_param_groups(learn))
    return ParamScheduler('lr', [sched_no(v, v) for v in lrs])


# ---- LR finder -------------------------------------------------------------------------------------
def _snapshot(learn: Any) -> dict:
    model, opt = learn.model, learn.opt
    rng = get_rng_states()
    return {'model': copy.deepcopy(model.state_dict()),
            'grads': [None if p.grad is None else p.grad.detach().clone() for p in model.parameters()],
            'training': [(m, m.training) for m in model.modules()],
            'opt': copy.deepcopy(opt.state_dict()), 'rng': rng, 'loader': _loader_position(learn)}


def _loader_position(learn: Any) -> dict | None:
    dl = learn.data.train_dl
    return dl.state_dict() if has_position(dl) else None


def _restore(learn: Any, saved: dict) -> None:
    learn.model.load_state_dict(saved['model'])
    for p, grad in zip(learn.model.parameters(), saved['grads']): p.grad = grad
    for module, training in saved['training']: module.training = training
    learn.opt.load_state_dict(saved['opt'])
    set_rng_states(saved['rng'])
    # The sweep's batches do not move the next fit's epochs on: same order as without the sweep.
    if saved['loader'] is not None: learn.data.train_dl.load_state_dict(saved['loader'])


class LR_Find(Callback):
    """Learning-rate range test: lr grows exponentially from `min_lr` to `max_lr` over `max_iter` training
    batches (position n_iter/max_iter) with no validation; training stops at `max_iter` batches or when the
    loss exceeds 10x the best loss so far (or is not finite). At `after_fit` the model weights, gradients,
    optimizer state, the random-number generators (torch, numpy, python) and the training loader's position
    are put back as they were.

    The divergence test is computed on the loss's device; on CUDA its flag is copied to pinned host memory
    without waiting and read once the copy has completed, so the sweep may run a batch or two past the
    divergence instead of synchronising every batch (the extra batches are recorded: use `skip_last`).
    """
    _order = Order.SCHEDULE

    def __init__(self, max_iter: int = 100, min_lr: float = 1e-6, max_lr: float = 10.):
        if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1:
            raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
        check_positive('min_lr', min_lr)
        check_positive('max_lr', max_lr)
        if not min_lr < max_lr: raise ValueError(f"min_lr ({min_lr}) must be smaller than max_lr ({max_lr})")
        self.max_iter, self.min_lr, self.max_lr = max_iter, min_lr, max_lr
        self._saved: dict | None = None

    @property
    def name(self) -> str:
        """`lr_finder`, the learner attribute the finder appears as during a sweep."""
        return 'lr_finder'

    def begin_fit(self) -> None:
        self._saved = _snapshot(self.run)
        self.best_loss: torch.Tensor | None = None
        self._pending: list[tuple[torch.Tensor, Any]] = []  # divergence flags not read yet (CUDA)

    def begin_batch(self) -> None:
        if not self.run.in_train: return
        lr = self.min_lr * (self.max_lr / self.min_lr) ** (self.run.n_iter / self.max_iter)
        for group in self.run.opt.param_groups: _set_hyper(group, 'lr', lr)

    def after_batch(self) -> None:
        if not self.run.in_train: return
        self._watch(self.run.loss.detach().float().reshape(()))
        if self.run.n_iter >= self.max_iter or self._diverged(): raise CancelTrainException()

    def _watch(self, loss: torch.Tensor) -> None:
        best = torch.full_like(loss, math.inf) if self.best_loss is None else self.best_loss
        diverged = ~(loss <= 10 * best)  # NaN compares False: counted as diverged
        self.best_loss = torch.fmin(best, loss)
        if diverged.device.type == 'cuda':
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(diverged, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((host, event))
        else:
            self._pending.append((diverged, None))

    def _diverged(self) -> bool:
        while self._pending:
            flag, event = self._pending[0]
            if event is not None and not event.query(): return False
            self._pending.pop(0)
            if bool(flag): return True  # a host tensor (CPU loss, or a completed copy): no device read
        return False

    def begin_validate(self) -> bool:
        return True

    def after_fit(self) -> None:
        if self._saved is None: return
        saved, self._saved, self._pending = self._saved, None, []
        _restore(self.run, saved)


def _sweep(recorder: Any, skip_last: int) -> float:
    if isinstance(recorder, Recorder): return recorder.suggest_lr(skip_last=skip_last)
    # a course-style Recorder: `lrs` per group and `losses` as tensors
    return suggest_lr(recorder.lrs[-1], [float(l) for l in recorder.losses], skip_last=skip_last)


def lr_find(learn: Any, max_iter: int = 100, min_lr: float = 1e-6, max_lr: float = 10., cbs: Any = None,
            skip_last: int = 0) -> float:
    """Run the LR range test, restore the learner, and return the suggested lr (`suggest_lr`: halfway along
    the valley of the smoothed loss). A Recorder is attached if missing; it keeps the sweep for `learn.recorder.plot()`.

    Weights, optimizer state and random-number generators are as before the sweep; a learner that had no
    optimizer yet gets none (the next fit builds it from `learn.lr`).
    """
    finder = LR_Find(max_iter=max_iter, min_lr=min_lr, max_lr=max_lr)
    if isinstance(skip_last, bool) or not isinstance(skip_last, int) or skip_last < 0:
        raise ValueError(f"skip_last must be an int >= 0, got {skip_last!r}")
    recorder = learn.find_cb(Recorder)
    if recorder is None:
        recorder = Recorder()
        learn.add_cb(recorder)
    try:
        n_batches = len(learn.data.train_dl)
    except TypeError:
        n_batches = 1  # fit explains the problem
    had_opt = learn.opt is not None
    # Stats, loggers, checkpoints and telemetry stand aside: the sweep must not touch their records or files.
    aside = [cb for cb in learn.cbs if not flag(cb, 'run_during_lr_find')]
    learn.remove_cbs(aside)
    try:
        learn.fit(max(1, math.ceil(max_iter / max(n_batches, 1))), cbs=[finder] + listify(cbs))
    finally:
        if not had_opt: learn.opt = None
        learn.add_cbs(aside)
    return _sweep(recorder, skip_last)
