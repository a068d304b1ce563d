"""Loss and metrics per epoch, for training and validation: averaged over the batches (functions such as
`accuracy`), or computed once over the whole pass (`AccumMetric`, and any object with torchmetrics'
`update(preds, target)`, `compute()`, `reset()`).

The metric functions themselves live in `minilearn.metrics` (re-exported here); `f1_score()`,
`balanced_accuracy()`... build the `AccumMetric` that computes them over the pass. Any torchmetrics metric can
be passed instead (duck typing, no import).
"""
from __future__ import annotations

import copy
import functools
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from ..core import batch_size, callable_name, listify
from ..callback import Callback
from ..metrics import _balanced_accuracy, _score, _top_k_accuracy, accuracy  # accuracy: re-exported

__all__ = ['accuracy', 'AccumMetric', 'top_k_accuracy', 'balanced_accuracy', 'f1_score', 'precision_score',
           'recall_score', 'is_epoch_metric', 'AvgStats', 'AvgStatsCallback', 'metric_name', 'format_time']


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


# ---- metrics of the whole pass ----------------------------------------------------------------------------
_EPOCH_METRIC_METHODS = ('update', 'compute', 'reset')


def is_epoch_metric(metric: Any) -> bool:
    """True for objects with torchmetrics' protocol (`update(preds, target)`, `compute()`, `reset()`), which
    keep their own state over a pass instead of being averaged over batches."""
    return not isinstance(metric, type) and all(callable(getattr(metric, m, None)) for m in _EPOCH_METRIC_METHODS)


def _argmax_activation(preds: torch.Tensor) -> torch.Tensor:
    return preds.argmax(dim=1)


_ACTIVATIONS = {'softmax': functools.partial(torch.softmax, dim=1), 'sigmoid': torch.sigmoid,
                'argmax': _argmax_activation}


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    # A CUDA tensor copied to pinned memory without waiting (compute() waits once); other devices copy now.
    if t.device.type == 'cpu': return t
    if t.device.type != 'cuda': return t.to('cpu')
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    return host.copy_(t, non_blocking=True)


class AccumMetric:
    """A metric of the whole pass: keeps every batch's predictions and targets and returns
    `func(activation(preds), targets)` on all of them at once, when the pass is over.

    For F1, precision/recall, balanced accuracy, AUROC...: the mean of per-batch values is not the value on the
    epoch. Predictions stay on their device (no host read per batch); `to_cpu=True` keeps them in host memory
    instead (copied from CUDA without waiting). `activation` is None, 'softmax', 'sigmoid', 'argmax' (over
    dim 1) or a function, applied once to the joined predictions. In a distributed fit the predictions of
    every rank are gathered before `func` runs (`all_gather`, called by `AvgStats.sync`).
    Has torchmetrics' protocol (`update`, `compute`, `reset`); `AvgStats` works on its own copy.
    """

    def __init__(self, func: Callable, name: str | None = None, activation: str | Callable | None = None,
                 to_cpu: bool = False):
        if not callable(func): raise TypeError(f"func must be callable as func(preds, targets), got {func!r}")
        if activation is not None and not callable(activation) and activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be None, one of {sorted(_ACTIVATIONS)} or a function, "
                             f"got {activation!r}")
        if name is not None and (not isinstance(name, str) or not name):
            raise ValueError(f"name must be a non-empty str (the column name), got {name!r}")
        self.func, self.activation, self.to_cpu = func, activation, bool(to_cpu)
        self.__name__ = name or metric_name(func)  # metric_name() reads it: the column is train_<name>/valid_<name>
        self.reset()

    def reset(self) -> None:
        """Forget the pass's predictions and targets."""
        self.preds: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self._copying = None  # the CUDA event after the latest copy to pinned memory, when to_cpu
        self._loaded = False  # restored from a checkpoint on the CPU: moved to the next batch's device

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """Keep one batch's predictions and targets (detached, no host read)."""
        if not isinstance(preds, torch.Tensor) or not isinstance(target, torch.Tensor):
            raise TypeError(f"{self.__name__} keeps tensors: the model output and the targets must be tensors, got "
                            f"{type(preds).__name__} and {type(target).__name__}")
        preds, target = preds.detach(), target.detach()
        if self._loaded:
            self._loaded = False
            if not self.to_cpu:
                self.preds = [p.to(preds.device) for p in self.preds]
                self.targets = [t.to(target.device) for t in self.targets]
        if self.to_cpu:
            preds, target = _host_copy(preds), _host_copy(target)
            if torch.cuda.is_available() and preds.is_pinned():
                self._copying = torch.cuda.Event()
                self._copying.record()
        self.preds.append(preds)
        self.targets.append(target)

    def _joined(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self._copying is not None:
            self._copying.synchronize()
            self._copying = None
        if not self.preds: return None, None
        if len(self.preds) > 1: self.preds, self.targets = [torch.cat(self.preds)], [torch.cat(self.targets)]
        return self.preds[0], self.targets[0]

    def compute(self) -> Any:
        """`func(activation(preds), targets)` over every kept batch; nan when nothing was kept."""
        preds, targets = self._joined()
        if preds is None: return math.nan
        activation = _ACTIVATIONS[self.activation] if isinstance(self.activation, str) else self.activation
        return self.func(preds if activation is None else activation(preds), targets)

    def all_gather(self, gather: Callable[[torch.Tensor | None], torch.Tensor | None]) -> None:
        """Replace the kept predictions and targets by those of every process, joined by `gather`
        (`learn.all_gather_rows`, a collective)."""
        preds, targets = self._joined()
        preds, targets = gather(preds), gather(targets)
        if self.to_cpu and preds is not None: preds, targets = preds.cpu(), targets.cpu()
        self.preds, self.targets = ([], []) if preds is None else ([preds], [targets])

    def state_dict(self) -> dict:
        """The predictions and targets kept so far, on the CPU (for a checkpoint taken inside a pass)."""
        preds, targets = self._joined()
        return {'preds': None if preds is None else preds.cpu(), 'targets': None if targets is None else targets.cpu()}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (moved to the device of the next batch)."""
        self.reset()
        if state['preds'] is not None:
            self.preds, self.targets, self._loaded = [state['preds']], [state['targets']], True

    def __repr__(self) -> str:
        return f'AccumMetric({metric_name(self.func)}, name={self.__name__!r})'


def _metric_factory(func: Callable) -> Callable:
    func._builds_epoch_metric = True  # AvgStats names the mistake of passing the factory itself
    return func


_AVERAGES = ('macro', 'weighted', 'micro')


def _check_average(average: Any, who: str) -> None:
    if average not in _AVERAGES: raise ValueError(f"{who}: average must be one of {_AVERAGES}, got {average!r}")


def _named(kind: str, average: str) -> str:
    return f'{kind}_score' if average == 'macro' else f'{kind}_score_{average}'


@_metric_factory
def f1_score(average: str = 'macro') -> AccumMetric:
    """F1 over the whole pass (argmax of (N, C, ...) scores vs class indices); 'macro' (classes weigh the same),
    'weighted' (by support) or 'micro'. Column `f1_score` (`f1_score_<average>` for the others)."""
    _check_average(average, 'f1_score')
    return AccumMetric(functools.partial(_score, kind='f1', average=average), name=_named('f1', average))


@_metric_factory
def precision_score(average: str = 'macro') -> AccumMetric:
    """Precision over the whole pass (0 for a class never predicted); averaged as in `f1_score`."""
    _check_average(average, 'precision_score')
    return AccumMetric(functools.partial(_score, kind='precision', average=average), name=_named('precision', average))


@_metric_factory
def recall_score(average: str = 'macro') -> AccumMetric:
    """Recall over the whole pass; averaged as in `f1_score` (macro recall over the targets' classes is
    `balanced_accuracy`)."""
    _check_average(average, 'recall_score')
    return AccumMetric(functools.partial(_score, kind='recall', average=average), name=_named('recall', average))


@_metric_factory
def balanced_accuracy() -> AccumMetric:
    """The mean over the targets' classes of each class's recall, over the whole pass (column `balanced_accuracy`)."""
    return AccumMetric(_balanced_accuracy, name='balanced_accuracy')


@_metric_factory
def top_k_accuracy(k: int = 5) -> AccumMetric:
    """Fraction of items whose target is among the `k` highest scores (column `top_<k>_accuracy`)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1: raise ValueError(f"k must be a positive int, got {k!r}")
    return AccumMetric(functools.partial(_top_k_accuracy, k=k), name=f'top_{k}_accuracy')


# ---- per-epoch statistics -----------------------------------------------------------------------------------
def _prepared(metric: Any) -> Any:
    name = callable_name(metric)
    if getattr(metric, '_builds_epoch_metric', False):
        raise TypeError(f"{name} builds a metric: pass {name}() (for example AvgStatsCallback([accuracy, {name}()]))")
    if isinstance(metric, type):
        raise TypeError(f"metric {name} is a class: pass an instance ({name}(...))")
    if is_epoch_metric(metric): return copy.deepcopy(metric)  # each pass (training, validation) keeps its own state
    if not callable(metric):
        raise TypeError(f"a metric is a function metric(pred, yb) averaged over batches, or an object with "
                        f"update(preds, target), compute() and reset() (AccumMetric, torchmetrics); got {metric!r}")
    return metric


def _to_host(value: Any) -> Any:
    return value.detach().cpu() if isinstance(value, torch.Tensor) else value


def _to_number(value: Any, name: str) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {name!r} returned a tensor of shape {tuple(value.shape)}; a column holds one "
                             f"number (average the per-class values, e.g. average='macro')")
        return value.item()
    return float(value)


class AvgStats:
    """Loss and metrics of one pass (training or validation) of an epoch.

    The loss and function metrics (`accuracy`...) are averaged over the items: sums weighted by batch size,
    kept on the batch's device until read (a batch only keeps its detached values; they are summed every
    `fold_every` batches and when read). Metrics with torchmetrics' protocol (`AccumMetric`, torchmetrics
    objects; see `is_epoch_metric`) get `update(pred, yb)` per batch, are moved to the batch's device
    (`.to(device)`, when they have it) and give `compute()` at the end; each AvgStats works on its own copy.
    """
    fold_every = 256

    def __init__(self, metrics: Any, in_train: bool):
        self.metrics, self.in_train = [_prepared(m) for m in listify(metrics)], in_train
        self._epoch = [is_epoch_metric(m) for m in self.metrics]
        names = [metric_name(m) for m in self.metrics]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"two metrics are named {twice[0]!r} (one column each): give one another name, "
                             f"e.g. AccumMetric(func, name=...)")
        self._devices: list = [None] * len(self.metrics)
        self.reset()

    def reset(self) -> None:
        """Start a new pass."""
        self.count, self.n_batches, self._tot_loss = 0, 0, 0.
        self._tot_avg = [0.] * self._epoch.count(False)  # sums of the averaged metrics
        self._pending: list[tuple[int, Any, list]] = []  # (batch size, loss, averaged metric values) not summed yet
        self._loaded = False  # sums restored on the CPU by load_state_dict: moved to the next batch's device
        for m, is_epoch in zip(self.metrics, self._epoch):
            if is_epoch: m.reset()

    def accumulate(self, run: Any) -> None:
        """Add the current batch (`run.loss`, `run.pred`, `run.yb`); no host synchronisation."""
        if self._loaded: self._to_device(run.loss)
        bn = batch_size(run.xb, run.yb)
        self.count += bn
        self.n_batches += 1
        values = []
        for i, (m, is_epoch) in enumerate(zip(self.metrics, self._epoch)):
            if is_epoch: self._update(i, m, run.pred, run.yb)
            else: values.append(_kept(m(run.pred, run.yb)))
        self._pending.append((bn, _kept(run.loss), values))
        if len(self._pending) >= self.fold_every: self._fold()

    def _update(self, i: int, metric: Any, pred: Any, yb: Any) -> None:
        device = getattr(pred, 'device', None)
        if device is not None and device != self._devices[i]:
            self._devices[i] = device
            if callable(getattr(metric, 'to', None)):  # torchmetrics' states follow the module
                moved = metric.to(device)
                if moved is not None and moved is not metric and is_epoch_metric(moved):
                    self.metrics[i] = metric = moved
        metric.update(pred, yb)

    def _to_device(self, loss: Any) -> None:
        # First batch after load_state_dict: the loaded sums follow the batches' device.
        self._loaded = False
        device = getattr(loss, 'device', None)
        if device is None: return
        move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v
        self._tot_loss, self._tot_avg = move(self._tot_loss), [move(v) for v in self._tot_avg]
        self._pending = [(bn, move(loss), [move(v) for v in values]) for bn, loss, values in self._pending]

    def _fold(self) -> None:
        if not self._pending: return
        pending, self._pending = self._pending, []
        sizes = [bn for bn, _, _ in pending]
        self._tot_loss = _weighted_sum(self._tot_loss, [loss for _, loss, _ in pending], sizes)
        self._tot_avg = [_weighted_sum(total, [values[i] for _, _, values in pending], sizes)
                         for i, total in enumerate(self._tot_avg)]

    @property
    def tot_loss(self) -> Any:
        """The loss summed over items so far (a tensor on the batches' device once a batch was added)."""
        self._fold()
        return self._tot_loss

    @property
    def tot_mets(self) -> list:
        """Each metric summed over items so far; None for the metrics of the whole pass (see `avg_stats`)."""
        self._fold()
        sums = iter(self._tot_avg)
        return [None if is_epoch else next(sums) for is_epoch in self._epoch]

    @property
    def all_stats(self) -> list:
        """Summed loss then summed metrics (None for the metrics of the whole pass), as Python floats."""
        sums = [self.tot_loss] + self.tot_mets
        tensors = [s for s in sums if isinstance(s, torch.Tensor)]
        values = iter(torch.stack([t.reshape(()) for t in tensors]).tolist() if tensors else [])  # one device read
        return [None if s is None else next(values) if isinstance(s, torch.Tensor) else float(s) for s in sums]

    @property
    def avg_loss(self) -> Any:
        """The average loss so far, without reading it from the device (nan before any batch)."""
        return self.tot_loss / self.count if self.count else math.nan

    @property
    def avg_stats(self) -> list[float]:
        """Average loss then each metric over the pass (averaged, or the whole pass's `compute()`); nan before
        any batch."""
        if not self.count: return [math.nan] * (1 + len(self.metrics))
        sums = self.all_stats
        computed = [_to_number(m.compute(), metric_name(m)) if is_epoch else None
                    for m, is_epoch in zip(self.metrics, self._epoch)]
        return [sums[0] / self.count] + [c if is_epoch else s / self.count
                                         for s, c, is_epoch in zip(sums[1:], computed, self._epoch)]

    @property
    def names(self) -> list[str]:
        prefix = 'train' if self.in_train else 'valid'
        return [f'{prefix}_loss'] + [f'{prefix}_{metric_name(m)}' for m in self.metrics]

    def sync(self, run: Any) -> None:
        """Make this pass that of every process of `run`'s fit: counts and sums summed (`run.all_reduce`),
        AccumMetric predictions gathered (`run.all_gather_rows`); collectives, once per epoch (AvgStatsCallback
        calls them). Other whole-pass metrics synchronise themselves in `compute()`, as torchmetrics' do."""
        values = [self.count, self.tot_loss, *self._tot_avg]
        flat = torch.stack([torch.as_tensor(v, dtype=torch.float64).to(run.fit_device).reshape(()) for v in values])
        totals = run.all_reduce(flat).tolist()  # once per epoch
        self.count, self._tot_loss, self._tot_avg = int(totals[0]), totals[1], totals[2:]
        for m in self.metrics:
            if isinstance(m, AccumMetric): m.all_gather(run.all_gather_rows)

    def state_dict(self) -> dict:
        """The pass so far (counts, sums, the values not summed yet, whole-pass metrics' states), on the CPU.

        The values not summed yet are kept as they are, so a resumed pass sums them in the same order as an
        uninterrupted one (bit-identical figures). A whole-pass metric other than AccumMetric is saved through its
        own `state_dict()` when it has one (torchmetrics: only states made persistent, `metric.persistent(True)`).
        """
        return {'count': self.count, 'n_batches': self.n_batches,
                'tot_loss': _to_host(self._tot_loss), 'tot_avg': [_to_host(v) for v in self._tot_avg],
                'pending': [[bn, _to_host(loss), [_to_host(v) for v in values]] for bn, loss, values in self._pending],
                'metrics': [m.state_dict() if is_epoch and callable(getattr(m, 'state_dict', None)) else None
                            for m, is_epoch in zip(self.metrics, self._epoch)]}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned: the next batch continues that pass."""
        if len(state['metrics']) != len(self.metrics) or len(state['tot_avg']) != len(self._tot_avg):
            raise ValueError(f"the saved statistics have {len(state['metrics'])} metrics, this AvgStats has "
                             f"{len(self.metrics)} ({', '.join(self.names[1:])}): build it with the same metrics")
        self.reset()
        self.count, self.n_batches, self._tot_loss = int(state['count']), int(state['n_batches']), state['tot_loss']
        self._tot_avg = list(state['tot_avg'])
        self._pending = [(int(bn), loss, list(values)) for bn, loss, values in state['pending']]
        for m, saved in zip(self.metrics, state['metrics']):
            if saved is not None and callable(getattr(m, 'load_state_dict', None)): m.load_state_dict(saved)
        self._loaded = True

    def __repr__(self) -> str:
        if not self.count: return ''
        return f"{'train' if self.in_train else 'valid'}: {self.avg_stats}"


class AvgStatsCallback(Callback):
    """Loss and metrics per epoch; logs one row per epoch and keeps them in `history`.

    `metrics` are functions `metric(pred, yb)` averaged over the items (`accuracy`), or objects with
    torchmetrics' `update`/`compute`/`reset` computed over the whole pass (`AccumMetric`, `f1_score()`,
    `balanced_accuracy()`, `top_k_accuracy(k)`, torchmetrics metrics). A checkpoint taken inside an epoch
    (`state_dict()` between `begin_epoch` and `after_epoch`) holds the epoch's passes so far, which a fit resumed
    inside that epoch (`learn.position`) continues exactly; at an epoch boundary only `history` is saved.
    """
    run_during_lr_find = False

    def __init__(self, metrics: Any = None):
        self.train_stats, self.valid_stats = AvgStats(metrics, True), AvgStats(metrics, False)
        self.history: list[dict] = []
        self._in_epoch = False  # between begin_epoch and after_epoch: a checkpoint holds the passes so far

    @property
    def metric_names(self) -> list[str]:
        """The columns: `epoch`, train and valid loss and metrics, `time`."""
        return ['epoch'] + self.train_stats.names + self.valid_stats.names + ['time']

    def begin_fit(self) -> None:
        if not self.run.position.resuming: self.history = []  # resuming keeps the loaded history
        self.run.logger(self.metric_names)

    def begin_epoch(self) -> None:
        if not self.run.position.done_in(self.run.epoch):  # else the fit resumes inside it: the loaded passes go on
            self.train_stats.reset()
            self.valid_stats.reset()
        self._in_epoch = True
        self.start_time = time.time()

    def after_loss(self) -> None:
        stats = self.train_stats if self.run.in_train else self.valid_stats
        with torch.no_grad(): stats.accumulate(self.run)

    def after_epoch(self) -> None:
        elapsed = time.time() - self.start_time
        if self.run.world_size > 1:  # every process reports the figures of the whole dataset
            for stats in (self.train_stats, self.valid_stats): stats.sync(self.run)
        has_valid = self.run.data.valid_dl is not None
        values = self.train_stats.avg_stats + (self.valid_stats.avg_stats if has_valid
                                               else [None] * len(self.valid_stats.names))
        row = {'epoch': self.run.epoch, **dict(zip(self.metric_names[1:-1], values)), 'time': elapsed}
        self.history.append(row)
        self._in_epoch = False
        self.run.logger([str(self.run.epoch)] + ['-' if v is None else f'{v:.6f}' for v in values]
                        + [format_time(elapsed)])

    def after_fit(self) -> None:
        self._in_epoch = False

    def state_dict(self) -> dict:
        """`history`, and inside an epoch the passes so far (sums, AccumMetric predictions) for an exact resume."""
        state: dict = {'history': [dict(r) for r in self.history]}
        if self._in_epoch:
            state['partial'] = {'epoch': self.run.epoch, 'train': self.train_stats.state_dict(),
                                'valid': self.valid_stats.state_dict()}
        return state

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned: `history`, and the passes (empty at an epoch boundary)."""
        partial = state.get('partial')
        if partial is not None:
            self.train_stats.load_state_dict(partial['train'])
            self.valid_stats.load_state_dict(partial['valid'])
        else:
            self.train_stats.reset()
            self.valid_stats.reset()
        self.history = [dict(r) for r in state['history']]
