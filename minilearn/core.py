"""Tiny shared helpers used across the package."""
from __future__ import annotations

import functools
import importlib
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from numbers import Real
from typing import Any

import torch
from fastprogress.fastprogress import IN_NOTEBOOK

__all__ = ['listify', 'camel2snake', 'to_device', 'unwrap_loss', 'is_main_process', 'check_positive', 'batch_size',
           'model_device', 'unwrap_partial', 'callable_name', 'do_nothing', 'is_interactive',
           'optional_import', 'lr_range', 'param_groups', 'TablePrinter']

_camel_re1 = re.compile('(.)([A-Z][a-z]+)')
_camel_re2 = re.compile('([a-z0-9])([A-Z])')


def listify(o: Any) -> list:
    """Turn `o` into a list: None -> [], a list stays, a string or single object is wrapped."""
    if o is None: return []
    if isinstance(o, list): return o
    if isinstance(o, (str, bytes, torch.Tensor, Mapping)): return [o]
    if isinstance(o, Iterable): return list(o)
    return [o]


def camel2snake(name: str) -> str:
    """`AvgStatsCallback` -> `avg_stats_callback`."""
    return _camel_re2.sub(r'\1_\2', _camel_re1.sub(r'\1_\2', name)).lower()


def to_device(o: Any, device: torch.device | str) -> Any:
    """Move tensors (possibly nested in tuples, lists and dicts) to `device`; non-blocking from pinned memory."""
    if isinstance(o, torch.Tensor):
        return o.to(device, non_blocking=o.is_pinned()) if o.device != torch.device(device) else o
    if isinstance(o, (list, tuple)):
        moved = [to_device(x, device) for x in o]
        return type(o)(*moved) if hasattr(o, '_fields') else type(o)(moved)
    if isinstance(o, dict): return {k: to_device(v, device) for k, v in o.items()}
    return o


def unwrap_loss(loss_func: Any) -> Any:
    """The user's own loss behind wrappers (such as MixUp's) that expose it as `base_loss_func`."""
    while getattr(loss_func, 'base_loss_func', None) is not None: loss_func = loss_func.base_loss_func
    return loss_func


def is_main_process() -> bool:
    """False on the ranks other than 0 of an initialised torch.distributed run (they write no files)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def check_positive(name: str, value: Any) -> None:
    """Raise ValueError unless `value` is a positive finite real number (bools are not numbers here)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def batch_size(xb: Any, yb: Any) -> int:
    """Number of items in a batch: the first dimension of its targets (else inputs), or `len(yb)`."""
    for b in (yb, xb):
        if isinstance(b, torch.Tensor) and b.ndim: return b.shape[0]
        if isinstance(b, (list, tuple)) and b and isinstance(b[0], torch.Tensor) and b[0].ndim: return b[0].shape[0]
    return len(yb)


def model_device(model: torch.nn.Module, default: torch.device | None = None) -> torch.device | None:
    """The device of the model's first parameter (else buffer); `default` for a model without either."""
    for p in model.parameters(): return p.device
    for b in model.buffers(): return b.device
    return default


def unwrap_partial(f: Any) -> Any:
    """The function behind (nested) `functools.partial`s."""
    while isinstance(f, functools.partial): f = f.func
    return f


def callable_name(f: Any) -> str:
    """A callable's name through partials: its `__name__`, else its class name."""
    f = unwrap_partial(f)
    return getattr(f, '__name__', None) or type(f).__name__


def do_nothing(*args: Any, **kwargs: Any) -> None:
    """A logger (or handler) that does nothing: `--quiet`, and ranks other than 0."""


class TablePrinter:
    """A learner's default logger: prints a logged list as a row of an aligned table, anything else as it is.

    The first list (the column names) sets each column's width; a list of another length starts a new table.
    """

    def __init__(self) -> None:
        self.widths: list[int] | None = None

    def __call__(self, line: Any) -> None:
        if not isinstance(line, (list, tuple)):
            print(line, flush=True)
            return
        if self.widths is None or len(self.widths) != len(line):
            self.widths = [max(len(str(cell)), 8) for cell in line]
        print('  '.join(str(cell).ljust(w) for cell, w in zip(line, self.widths)).rstrip(), flush=True)


def is_interactive(stream: Any = None) -> bool:
    """True in a notebook or when `stream` (default: the current sys.stdout) is a terminal."""
    stream = sys.stdout if stream is None else stream
    return bool(IN_NOTEBOOK) or bool(getattr(stream, 'isatty', lambda: False)())


def optional_import(module: str, needed_by: str, extra: str, package: str | None = None) -> Any:
    """Import `module` of an optional dependency, or raise an ImportError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{needed_by} needs the {package or extra} package: pip install 'minilearn[{extra}]' "
                          f"(or pip install {package or extra})") from e


def lr_range(lr: float | slice | Sequence[float], n_groups: int, name: str = 'lr') -> list[float]:
    """One learning rate per parameter group, by fastai's rule (`Learner.lr_range`, `Optimizer.set_hyper`).

    A number is every group's; `slice(lo, hi)` spaces the groups geometrically from `lo` (first) to `hi` (last);
    `slice(hi)` gives the last group `hi` and every other `hi / 10`; a list or tuple has one rate per group.
    """
    if isinstance(lr, slice):
        if lr.step is not None: raise ValueError(f"{name}=slice(lo, hi) takes no step, got {lr!r}")
        check_positive(f'{name} (the slice\'s stop)', lr.stop)
        if lr.start is None or n_groups == 1:
            return [lr.stop / 10] * (n_groups - 1) + [lr.stop]
        check_positive(f'{name} (the slice\'s start)', lr.start)
        step = (lr.stop / lr.start) ** (1 / (n_groups - 1))
        return [lr.start * step ** i for i in range(n_groups)]
    if isinstance(lr, (list, tuple)):
        for value in lr: check_positive(name, value)
        if len(lr) != n_groups:
            raise ValueError(f"{name} has {len(lr)} values for {n_groups} param groups; pass one learning rate, "
                             f"a slice, or exactly one per group")
        return [float(v) for v in lr]
    check_positive(name, lr)
    return [lr] * n_groups


def param_groups(splitter: Callable, model: Any) -> list:
    """The optimizer's parameter groups of `model` as `splitter` gives them: parameters, dicts, or lists of them."""
    groups = list(splitter(model))
    if groups and not isinstance(groups[0], (torch.nn.Parameter, torch.Tensor, dict)):
        groups = [{'params': list(g)} for g in groups]  # a splitter returning several groups
    return groups
