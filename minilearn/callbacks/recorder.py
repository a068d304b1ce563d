"""Record hyper-parameters and training losses per batch, and plot them."""
from __future__ import annotations

from numbers import Real

import torch

from ..learner import Callback

__all__ = ['Recorder']


def _scalar_hypers(group: dict) -> dict[str, float]:
    hypers = {k: v for k, v in group.items() if isinstance(v, Real) and not isinstance(v, bool)}
    if isinstance(group.get('betas'), (tuple, list)): hypers['beta1'] = group['betas'][0]
    return hypers


class Recorder(Callback):
    """Per training batch: every scalar hyper-parameter of each param group (`hypers`), and the loss.

    Losses stay on the device (no host read per batch); `losses` converts them when read.
    """

    def __init__(self) -> None:
        self.hypers: dict[str, list[list[float]]] = {}
        self._losses: list[torch.Tensor] = []

    def begin_fit(self) -> None:
        if self.run.start_epoch > 0 and self._losses: return  # resuming: keep the loaded record
        groups = self.run.opt.param_groups
        self.hypers = {name: [[] for _ in groups] for name in _scalar_hypers(groups[0])}
        self._losses = []

    def after_batch(self) -> None:
        if not self.run.in_train: return
        for i, group in enumerate(self.run.opt.param_groups):
            for name, value in _scalar_hypers(group).items():
                if name in self.hypers: self.hypers[name][i].append(value)
        self._losses.append(self.run.loss.detach())

    @property
    def lrs(self) -> list[list[float]]:
        """Learning rate per param group, one entry per training batch."""
        return self.hypers.get('lr', [])

    @property
    def losses(self) -> list[float]:
        """Training loss per batch, as floats (read from the device now)."""
        if not self._losses: return []
        return torch.stack([l.float().reshape(()) for l in self._losses]).tolist()

    def plot_lr(self, pname: str = 'lr', pgid: int = -1):
        """Plot hyper-parameter `pname` of param group `pgid` against the iteration; returns the figure."""
        import matplotlib.pyplot as plt
        if pname not in self.hypers:
            raise ValueError(f"no hyper-parameter {pname!r} recorded; recorded: {sorted(self.hypers)}")
        fig, ax = plt.subplots()
        ax.plot(self.hypers[pname][pgid])
        ax.set_xlabel('iteration')
        ax.set_ylabel(pname)
        return fig

    def plot_loss(self, skip_last: int = 0):
        """Plot the training loss per batch (dropping the last `skip_last`); returns the figure."""
        import matplotlib.pyplot as plt
        losses = self.losses
        fig, ax = plt.subplots()
        ax.plot(losses[:len(losses) - skip_last])
        ax.set_xlabel('iteration')
        ax.set_ylabel('loss')
        return fig

    def plot(self, skip_last: int = 0, pgid: int = -1):
        """Loss against learning rate on a log axis (for the LR finder); returns the figure."""
        import matplotlib.pyplot as plt
        losses, lrs = self.losses, self.lrs[pgid] if self.lrs else []
        n = len(losses) - skip_last
        fig, ax = plt.subplots()
        ax.plot(lrs[:n], losses[:n])
        ax.set_xscale('log')
        ax.set_xlabel('learning rate')
        ax.set_ylabel('loss')
        return fig

    def state_dict(self) -> dict:
        return {'hypers': self.hypers, 'losses': torch.stack(self._losses).float().cpu() if self._losses
                else torch.zeros(0)}

    def load_state_dict(self, state: dict) -> None:
        self.hypers = {k: [list(g) for g in v] for k, v in state['hypers'].items()}
        self._losses = list(state['losses'].unbind(0)) if len(state['losses']) else []
