"""Forward hooks (Hook, Hooks) and the ActivationStats telemetry callback (course-v3 nb 06)."""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import nn

from ..callback import Callback, Order

__all__ = ['Hook', 'Hooks', 'ActivationStats']

HookFunc = Callable[..., Any]  # func(hook, module, input, output)


class Hook:
    """Registers `func(hook, module, input, output)` as a forward hook (a full backward hook with
    `is_forward=False`) on `module`; `remove()` (or leaving a `with` block) detaches it."""

    def __init__(self, module: nn.Module, func: HookFunc, is_forward: bool = True):
        if not isinstance(module, nn.Module): raise TypeError(f"Hook needs an nn.Module, got {type(module).__name__}")
        register = module.register_forward_hook if is_forward else module.register_full_backward_hook
        self.module = module
        self.handle = register(functools.partial(func, self))

    def remove(self) -> None:
        """Detach the hook (idempotent)."""
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def __enter__(self) -> Hook:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def __del__(self) -> None:
        if getattr(self, 'handle', None) is not None: self.remove()


def _modules_of(modules: nn.Module | Iterable[nn.Module]) -> list[nn.Module]:
    if isinstance(modules, nn.Module):
        children = list(modules.children())
        return children or [modules]
    return list(modules)


class Hooks:
    """A `Hook` on each of `modules` (a model means its children); a context manager that removes them all."""

    def __init__(self, modules: nn.Module | Iterable[nn.Module], func: HookFunc, is_forward: bool = True):
        self.hooks = [Hook(m, func, is_forward) for m in _modules_of(modules)]

    def __getitem__(self, i: int) -> Hook:
        return self.hooks[i]

    def __len__(self) -> int:
        return len(self.hooks)

    def __iter__(self) -> Iterator[Hook]:
        return iter(self.hooks)

    def __delitem__(self, i: int) -> None:
        self.hooks[i].remove()
        del self.hooks[i]

    def remove(self) -> None:
        """Detach every hook."""
        for hook in self.hooks: hook.remove()

    def __enter__(self) -> Hooks:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.remove()

    def __del__(self) -> None:
        if hasattr(self, 'hooks'): self.remove()

    def __repr__(self) -> str:
        return f'Hooks ({len(self)} hooks on {", ".join(type(h.module).__name__ for h in self.hooks[:10])})'


class ActivationStats(Callback):
    """Per hooked layer and training batch: mean, std and a histogram of the layer's output.

    `modules` are the layers to watch (default: the model's children; a callable gets the model and returns
    them). Statistics stay on the device during training; the properties `means`, `stds` (layers x batches)
    and `hists` (layers x bins x batches) read them back. Histograms have `n_bins` bins over `hist_range`
    (values outside are not counted; the default suits ReLU outputs, as in course-v3 nb 06).
    """
    _order = Order.HOOKS
    run_during_lr_find = False

    def __init__(self, modules: Iterable[nn.Module] | Callable[[nn.Module], Iterable[nn.Module]] | None = None,
                 n_bins: int = 40, hist_range: tuple[float, float] = (0., 10.)):
        if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
            raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
        low, high = hist_range
        if not low < high: raise ValueError(f"hist_range must be (low, high) with low < high, got {hist_range!r}")
        self.modules, self.n_bins, self.hist_range = modules, n_bins, (float(low), float(high))
        self.hooks: Hooks | None = None
        self._rows: list[list[torch.Tensor]] = []  # per layer, per batch: [mean, std, *histogram] on the device

    def _watched(self) -> list[nn.Module]:
        model = self.run.model
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)): model = model.module
        if self.modules is None: return _modules_of(model)
        modules = list(self.modules(model) if callable(self.modules) else self.modules)
        inside = {id(m) for m in model.modules()}
        strangers = [type(m).__name__ for m in modules if id(m) not in inside]
        if strangers: raise ValueError(f"ActivationStats: modules {strangers} are not part of the learner's model")
        if not modules: raise ValueError("ActivationStats: no modules to watch")
        return modules

    def begin_fit(self) -> None:
        modules = self._watched()
        self._rows = [[] for _ in modules]
        self.hooks = Hooks(modules, self._record)
        for hook, rows in zip(self.hooks, self._rows): hook.rows = rows

    def _record(self, hook: Hook, module: nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, (tuple, list)) and output: output = output[0]  # e.g. an RNN's (output, state)
        if not self.run.in_train or not isinstance(output, torch.Tensor): return
        x = output.detach().float()
        std, mean = torch.std_mean(x)
        # one small tensor per layer and batch (not three): fewer allocations kept on the device
        hook.rows.append(torch.cat([torch.stack([mean, std]), torch.histc(x, self.n_bins, *self.hist_range)]))

    def after_fit(self) -> None:
        if self.hooks is not None: self.hooks.remove()
        self.hooks = None

    def _table(self) -> torch.Tensor:
        # (layers, 2 + bins, batches), read from the device now
        if not self._rows or not self._rows[0]:
            raise ValueError("no activations recorded yet: fit with this callback first")
        counts = {len(rows) for rows in self._rows}
        if len(counts) > 1:
            raise ValueError(f"the watched layers ran different numbers of times ({sorted(counts)}): a layer used "
                             f"twice per forward, or one that returns no tensor; watch other modules")
        return torch.stack([torch.stack(rows, -1) for rows in self._rows]).cpu()

    @property
    def means(self) -> torch.Tensor:
        """Mean activation, (layers, batches)."""
        return self._table()[:, 0]

    @property
    def stds(self) -> torch.Tensor:
        """Standard deviation of the activations, (layers, batches)."""
        return self._table()[:, 1]

    @property
    def hists(self) -> torch.Tensor:
        """Histogram counts, (layers, bins, batches)."""
        return self._table()[:, 2:]

    def near_zero(self, n_bins: int = 2) -> torch.Tensor:
        """Fraction of the counted activations in the lowest `n_bins` bins, (layers, batches)."""
        hists = self.hists
        return hists[:, :n_bins].sum(1) / hists.sum(1).clamp_min(1)

    def plot_stats(self, max_batches: int | None = None):
        """Means and standard deviations per layer against the batch; returns the figure."""
        import matplotlib.pyplot as plt  # local: pyplot is slow to import and only plotting needs it
        fig, (ax_mean, ax_std) = plt.subplots(1, 2, figsize=(10, 4))
        for i, (means, stds) in enumerate(zip(self.means, self.stds)):
            ax_mean.plot(means[:max_batches].numpy(), label=f'layer {i}')
            ax_std.plot(stds[:max_batches].numpy(), label=f'layer {i}')
        ax_mean.set_title('mean')
        ax_std.set_title('std')
        for ax in (ax_mean, ax_std): ax.set_xlabel('batch')
        ax_std.legend()
        return fig

    def plot_hist(self, max_layers: int = 4):
        """Histograms of the first `max_layers` layers over time (log counts, bins upward); returns the figure."""
        import matplotlib.pyplot as plt  # local: pyplot is slow to import and only plotting needs it
        hists = self.hists[:max_layers].log1p()
        fig, axes = plt.subplots(1, len(hists), figsize=(4 * len(hists), 3), squeeze=False)
        for i, (ax, hist) in enumerate(zip(axes[0], hists)):
            ax.imshow(hist.numpy(), origin='lower', aspect='auto')
            ax.set_title(f'layer {i}')
            ax.set_xlabel('batch')
        return fig

    def plot_near_zero(self, n_bins: int = 2, max_layers: int = 4):
        """Fraction of near-zero activations (lowest `n_bins` bins) per layer against the batch; returns the figure."""
        import matplotlib.pyplot as plt  # local: pyplot is slow to import and only plotting needs it
        fractions = self.near_zero(n_bins)[:max_layers]
        fig, axes = plt.subplots(1, len(fractions), figsize=(4 * len(fractions), 3), squeeze=False)
        for i, (ax, fraction) in enumerate(zip(axes[0], fractions)):
            ax.plot(fraction.numpy())
            ax.set_ylim(0, 1)
            ax.set_title(f'layer {i}')
            ax.set_xlabel('batch')
        return fig
