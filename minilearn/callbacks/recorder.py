"""Record hyper-parameters and training losses per batch, and plot them."""
from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Real
from typing import Any

import numpy as np
import torch

from ..callback import Callback
from .metrics import AvgStatsCallback

__all__ = ['Recorder', 'smooth_ema', 'suggest_lr']


def smooth_ema(values: Sequence[float], beta: float = 0.98) -> list[float]:
    """Exponential moving average of `values` with bias correction (fastai's smoothed loss)."""
    if not 0 <= beta < 1: raise ValueError(f"beta must be in [0, 1), got {beta!r}")
    average, smoothed = 0., []
    for i, value in enumerate(values, 1):
        average = beta * average + (1 - beta) * value
        smoothed.append(average / (1 - beta ** i))
    return smoothed


def _sweep_points(lrs: Sequence[float], losses: Sequence[float], skip_last: int) -> tuple[list[float], list[float]]:
    if isinstance(skip_last, bool) or not isinstance(skip_last, int) or skip_last < 0:
        raise ValueError(f"skip_last must be an int >= 0, got {skip_last!r}")
    n = min(len(lrs), len(losses)) - skip_last
    lrs, losses = list(lrs[:max(n, 0)]), list(losses[:max(n, 0)])
    finite = next((i for i, l in enumerate(losses) if not math.isfinite(l)), len(losses))
    return lrs[:finite], losses[:finite]


_SUGGESTIONS = ('valley', 'steep')


def suggest_lr(lrs: Sequence[float], losses: Sequence[float], skip_last: int = 0, beta: float = 0.98,
               method: str = 'valley') -> float:
    """A learning rate from an LR-finder sweep, read on the smoothed loss (EMA, `beta`).

    `'valley'` (the default, fastai's rule): the longest run over which the smoothed loss keeps falling, found
    as its longest decreasing subsequence, and the lr halfway along it; it does not land on the flat, noisy
    start of a sweep. `'steep'`: where the smoothed loss falls fastest. The first tenth of the points (the
    smoothed loss is mostly noise there), the points after the first non-finite loss and the last `skip_last`
    points are left out.
    """
    if method not in _SUGGESTIONS: raise ValueError(f"method must be one of {_SUGGESTIONS}, got {method!r}")
    lrs, losses = _sweep_points(lrs, losses, skip_last)
    if len(losses) < 3:
        raise ValueError(f"too few finite losses ({len(losses)}) to suggest a learning rate: run a longer sweep "
                         f"(max_iter), start it lower (min_lr) or lower skip_last")
    return float(lrs[_suggestion(smooth_ema(losses, beta), method)])


def _suggestion(smoothed: Sequence[float], method: str = 'valley') -> int:
    start = min(len(smoothed) // 10, len(smoothed) - 3)  # the first tenth is left out, as fastai does
    curve = np.array(smoothed[start:])
    if method == 'steep': return start + int(np.argmin(np.gradient(curve)))
    return start + _valley(curve)


def _valley(curve: np.ndarray) -> int:
    """Index halfway along the longest decreasing subsequence of `curve`, spread back from its last point."""
    longest = np.ones(len(curve), dtype=int)  # longest[i]: the longest decreasing subsequence ending at i
    for i in range(1, len(curve)):
        higher = curve[:i] > curve[i]
        if higher.any(): longest[i] = longest[:i][higher].max() + 1
    end = int(np.argmax(longest))
    # As fastai: the valley is the window of that length ending at its lowest point (a few isolated points in
    # the noisy start belong to the subsequence without stretching the window back to them).
    begin = max(end - int(longest[end]) + 1, 0)
    return (begin + end) // 2


def _is_number(value: object) -> bool:
    return type(value) in (float, int) or (isinstance(value, Real) and not isinstance(value, bool))


def _hyper_value(group: dict, name: str) -> float | None:
    """What `_scalar_hypers(group)` holds for `name` (None when missing or not a number), per batch and fast."""
    if name == 'beta1':
        betas = group.get('betas')
        if isinstance(betas, (tuple, list)) and _is_number(betas[0]): return betas[0]
    value = group.get(name)
    return value if _is_number(value) else None


def _scalar_hypers(group: dict) -> dict[str, float]:
    hypers = {k: v for k, v in group.items() if isinstance(v, Real) and not isinstance(v, bool)}
    betas = group.get('betas')
    if isinstance(betas, (tuple, list)) and isinstance(betas[0], Real): hypers['beta1'] = betas[0]
    return hypers


class Recorder(Callback):
    """Per training batch: every scalar hyper-parameter of each param group (`hypers`), and the loss; per
    epoch, the validation loss of AvgStatsCallback when there is one (`valid_losses`).

    Losses stay on the device (no host read per batch); `losses` converts them when read. After an
    LR-finder sweep, `plot()` draws loss against lr and `suggest_lr()` gives the suggested lr.
    """

    def __init__(self) -> None:
        self.hypers: dict[str, list[list[float]]] = {}
        self._losses: list[torch.Tensor] = []
        self._loaded_losses = torch.zeros(0)  # history restored from a checkpoint
        self._valid: list[tuple[int, object]] = []  # (training batches done, validation loss) per epoch
        self.epoch_ends: list[int] = []  # training batches done at the end of each epoch (the plots' epoch marks)

    def begin_fit(self) -> None:
        if self.run.position.resuming and len(self._loaded_losses): return  # resuming: keep the loaded record
        groups = self.run.opt.param_groups
        self.hypers = {name: [[] for _ in groups] for name in _scalar_hypers(groups[0])}
        self._losses, self._loaded_losses, self._valid, self.epoch_ends = [], torch.zeros(0), [], []

    def after_epoch(self) -> None:
        self.epoch_ends.append(len(self._losses) + len(self._loaded_losses))
        stats = self.run.find_cb(AvgStatsCallback)
        if stats is None or self.run.data.valid_dl is None or not stats.valid_stats.count: return
        self._valid.append((len(self._losses) + len(self._loaded_losses), stats.valid_stats.avg_loss))

    def after_batch(self) -> None:
        if not self.run.in_train: return
        for i, group in enumerate(self.run.opt.param_groups):
            for name, per_group in self.hypers.items():  # only the names found at begin_fit: a few lookups
                value = _hyper_value(group, name)
                if value is not None: per_group[i].append(value)
        self._losses.append(self.run.loss.detach())

    @property
    def valid_losses(self) -> tuple[list[int], list[float]]:
        """(training batches done at the end of each epoch, that epoch's validation loss), as read now."""
        values = [v.float().reshape(()) if isinstance(v, torch.Tensor) else torch.tensor(float(v))
                  for _, v in self._valid]
        return [n for n, _ in self._valid], torch.stack(values).cpu().tolist() if values else []

    @property
    def lrs(self) -> list[list[float]]:
        """Learning rate per param group, one entry per training batch."""
        return self.hypers.get('lr', [])

    @property
    def losses(self) -> list[float]:
        """Training loss per batch, as floats (read from the device now)."""
        return self._loss_tensor().tolist()

    @property
    def n_losses(self) -> int:
        """Training batches recorded (those a resume loaded included), without reading the device."""
        return len(self._loaded_losses) + len(self._losses)

    def losses_from(self, start: int) -> list[float]:
        """Training losses of batches `start`, `start + 1`... (indices as in `losses`), in one read of the
        device: a logger reads the new ones at the end of each epoch without converting the whole record."""
        n_loaded = len(self._loaded_losses)
        recent = self._losses[max(start - n_loaded, 0):]
        read = torch.stack([l.float().reshape(()) for l in recent]).cpu().tolist() if recent else []
        return self._loaded_losses[start:].tolist() + read

    def _loss_tensor(self) -> torch.Tensor:
        # The loaded history (CPU) and this fit's losses (on the training device), joined on the CPU.
        recent = torch.stack([l.float().reshape(()) for l in self._losses]).cpu() if self._losses else torch.zeros(0)
        return torch.cat([self._loaded_losses, recent])

    def plot_lr(self, pname: str = 'lr', pgid: int = -1):
        """Plot hyper-parameter `pname` of param group `pgid` against the iteration; returns the figure."""
        import matplotlib.pyplot as plt  # local: pyplot is slow to import and only plotting needs it
        if pname not in self.hypers:
            raise ValueError(f"no hyper-parameter {pname!r} recorded; recorded: {sorted(self.hypers)}")
        fig, ax = plt.subplots()
        ax.plot(self.hypers[pname][pgid])
        ax.set_xlabel('iteration')
        ax.set_ylabel(pname)
        ax.set_title('Learning rate per batch' if pname == 'lr' else f'{pname} per batch')
        self._mark_epochs(ax)
        return fig

    def _mark_epochs(self, ax: Any) -> None:
        """A dotted line where each epoch ends, numbered along the top."""
        if not self.epoch_ends: return
        ends = [n - 0.5 for n in self.epoch_ends]  # between an epoch's last batch and the next one's first
        ax.vlines(ends, 0, 1, transform=ax.get_xaxis_transform(), colors='grey', linestyles=':', linewidths=0.8,
                  gid='epoch_ends')
        top = ax.secondary_xaxis('top')
        top.set_xticks(ends, [str(i + 1) for i in range(len(ends))])
        top.set_xlabel('end of epoch')
        ax.figure.tight_layout()  # room for the epoch numbers above and the title over them

    def plot_loss(self, skip_last: int = 0, with_valid: bool = True):
        """Plot the training loss per batch (dropping the last `skip_last`) and, beside it, the validation loss
        at the end of each epoch (AvgStatsCallback's); returns the figure."""
        import matplotlib.pyplot as plt  # local: pyplot is slow to import and only plotting needs it
        if isinstance(skip_last, bool) or not isinstance(skip_last, int) or skip_last < 0:
            raise ValueError(f"skip_last must be an int >= 0, got {skip_last!r}")
        losses = self.losses
        fig, ax = plt.subplots()
        ax.plot(losses[:max(len(losses) - skip_last, 0)], label='train')
        steps, valid = self.valid_losses
        if with_valid and valid:
            # each epoch's validation loss at the last training batch of that epoch
            ax.plot([n - 1 for n in steps], valid, 'o-', label='valid')
            ax.legend()
        ax.set_xlabel('iteration')
        ax.set_ylabel('loss')
        ax.set_title('Training loss per batch' + (', validation loss per epoch' if with_valid and valid else ''))
        self._mark_epochs(ax)
        return fig

    def suggest_lr(self, skip_last: int = 0, pgid: int = -1, beta: float = 0.98, method: str = 'valley') -> float:
        """After an LR-finder sweep: the suggested lr of param group `pgid` (see `suggest_lr`)."""
        return suggest_lr(self._lrs_of(pgid), self.losses, skip_last=skip_last, beta=beta, method=method)

    def _lrs_of(self, pgid: int) -> list[float]:
        if not self._losses and not len(self._loaded_losses): raise ValueError("nothing recorded yet: run a fit (or learn.lr_find()) with this Recorder")
        if not self.lrs: raise ValueError("no scalar learning rate recorded (tensor learning rates are not recorded)")
        return self.lrs[pgid]

    def plot(self, skip_last: int = 0, pgid: int = -1):
        """Loss against learning rate on a log axis, the suggested lr marked (for the LR finder); returns the figure."""
        import matplotlib.pyplot as plt  # local: pyplot is slow to import and only plotting needs it
        lrs, losses = _sweep_points(self._lrs_of(pgid), self.losses, skip_last)
        fig, ax = plt.subplots()
        ax.plot(lrs, losses, alpha=0.4, label='loss')
        if len(losses) >= 3:
            smoothed = smooth_ema(losses)
            ax.plot(lrs, smoothed, label='smoothed loss')
            best = _suggestion(smoothed)
            ax.plot([lrs[best]], [smoothed[best]], 'ro', label=f'suggested lr {lrs[best]:.2e}')
            ax.legend()
        ax.set_xscale('log')
        ax.set_xlabel('learning rate')
        ax.set_ylabel('loss')
        ax.set_title('Learning rate finder')
        return fig

    def state_dict(self) -> dict:
        """Recorded hyper-parameters and losses (CPU tensors and lists), for checkpoints."""
        steps, valid = self.valid_losses
        return {'hypers': self.hypers, 'losses': self._loss_tensor(), 'valid_steps': steps,
                'valid_losses': torch.tensor(valid, dtype=torch.float64), 'epoch_ends': list(self.epoch_ends)}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned."""
        self.hypers = {k: [list(g) for g in v] for k, v in state['hypers'].items()}
        self._losses, self._loaded_losses = [], state['losses'].float().cpu().reshape(-1)
        valid = state.get('valid_losses', torch.zeros(0)).tolist()  # absent in checkpoints of earlier versions
        self._valid = list(zip([int(n) for n in state.get('valid_steps', [])], valid))
        self.epoch_ends = [int(n) for n in state.get('epoch_ends', [])]  # absent in earlier checkpoints
