"""MixUp: train on convex combinations of pairs of inputs and of their losses (or soft targets)."""
from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from numbers import Real
from typing import Any

import torch
from torch.distributions import Beta

from ..callback import Callback, Order
from ..losses import NoneReduce, lin_comb, loss_reduction, reduce_loss

__all__ = ['MixUp', 'MixUpLoss']


def _per_item_view(lam: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """λ of shape (N,) viewed as (N, 1, ..., 1) to broadcast against `like`, in its dtype."""
    return lam.to(like.dtype).view((-1,) + (1,) * (like.ndim - 1))


def _is_soft(yb: Any) -> bool:
    return isinstance(yb, torch.Tensor) and yb.is_floating_point()


def _check_batch(xb: Any, yb: Any) -> None:
    if not isinstance(xb, torch.Tensor) or not xb.is_floating_point() or xb.ndim == 0:
        raise TypeError(f"MixUp mixes floating-point input batches of shape (N, ...), got "
                        f"{getattr(xb, 'dtype', type(xb).__name__)}; integer inputs (token ids) cannot be mixed")
    if not isinstance(yb, torch.Tensor) or yb.ndim == 0 or yb.shape[0] != xb.shape[0]:
        raise TypeError(f"MixUp needs targets as one tensor with one entry per item of the batch (shape "
                        f"({xb.shape[0]}, ...)), got {getattr(yb, 'shape', type(yb).__name__)}")


def _accepts_reduction(loss_func: Callable) -> bool:
    if hasattr(loss_func, 'reduction'): return True
    try:
        params = inspect.signature(loss_func).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: let the first call tell
        return True
    return any(p.name == 'reduction' or p.kind is p.VAR_KEYWORD for p in params)


class MixUpLoss:
    """The loss while MixUp trains: mixes the per-item losses of both targets with the batch's λ.

    The user's loss is `base_loss_func` (what `minilearn.core.unwrap_loss` returns); `reduction` reads
    and writes the user's loss's reduction. Validation batches and soft targets (mixed by MixUp itself)
    go straight to the user's loss.
    """

    def __init__(self, base_loss_func: Callable, mixup: MixUp):
        self.base_loss_func, self.mixup = base_loss_func, mixup
        self._reduction: str | None = None  # set only for a base loss that is a plain function

    @property
    def reduction(self) -> str:
        return self._reduction or loss_reduction(self.base_loss_func)

    @reduction.setter
    def reduction(self, value: str) -> None:
        if hasattr(self.base_loss_func, 'reduction'): self.base_loss_func.reduction = value
        else: self._reduction = value

    def _base(self, pred: Any, yb: Any) -> Any:
        if self._reduction is None: return self.base_loss_func(pred, yb)
        return self.base_loss_func(pred, yb, reduction=self._reduction)

    def __call__(self, pred: Any, yb: Any) -> Any:
        mixup = self.mixup
        if not mixup.run.in_train or mixup.lam is None or _is_soft(yb): return self._base(pred, yb)
        reduction = self.reduction
        with NoneReduce(self.base_loss_func) as per_item:
            loss1, loss2 = per_item(pred, yb), per_item(pred, mixup.yb1)
        n = mixup.lam.shape[0]
        if not isinstance(loss1, torch.Tensor) or loss1.ndim == 0 or loss1.shape[0] != n:
            raise ValueError(f"MixUp needs one loss per item: {self.base_loss_func!r} with reduction='none' returned "
                             f"shape {tuple(getattr(loss1, 'shape', ()))} for a batch of {n}")
        return reduce_loss(lin_comb(loss1, loss2, _per_item_view(mixup.lam, loss1)), reduction)

    def __repr__(self) -> str:
        return f'MixUpLoss({self.base_loss_func!r})'


class MixUp(Callback):
    """MixUp (Zhang et al. 2018) in training: x = λ·x + (1−λ)·x[perm], loss = λ·loss(y) + (1−λ)·loss(y[perm]).

    Per sample (default) λ ~ Beta(α, α) replaced by max(λ, 1−λ), so each mix is dominated by its own
    sample; `per_sample=False` draws one plain λ per batch (the paper's and the seed lab's `mixup_data`).
    λ and the permutation are drawn on the batch's device from torch's generator (seeded by
    `torch.manual_seed`), with no host synchronisation. Inputs of any rank ≥ 1 are mixed; float
    (soft) targets are mixed as targets instead of mixing two losses. The per-item losses come from
    the loss with reduction 'none' and are reduced with the loss's own reduction ('mean' is the plain
    mean over items). The learner's `loss_func` is swapped for a `MixUpLoss` during the fit and the
    original object is put back at `after_fit`. `lam` (shape (bs,)) and `yb1` (the shuffled targets)
    describe the last training batch. The course's `α` keyword is accepted too.
    """
    _order = Order.MIX

    def __init__(self, alpha: float = 0.4, per_sample: bool = True, *, α: float | None = None):
        if α is not None:
            if alpha != 0.4: raise TypeError("give MixUp's parameter as `alpha` or as `α`, not both")
            alpha = α
        if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"MixUp alpha must be a positive finite number (the Beta(alpha, alpha) parameter), got "
                             f"{alpha!r}; to train without mixing, leave the MixUp callback out")
        self.alpha, self.per_sample = float(alpha), bool(per_sample)
        self.lam = self.yb1 = self.perm = None
        self.old_loss_func: Callable | None = None
        self._betas: dict = {}  # the Beta distribution per device, built on the first batch there

    @property
    def λ(self) -> torch.Tensor | None:
        """The course's name of `lam`."""
        return self.lam

    def begin_fit(self) -> None:
        loss_func = self.run.loss_func
        if not _accepts_reduction(loss_func):
            raise TypeError(f"MixUp needs per-item losses, but the loss {loss_func!r} has no `reduction` attribute "
                            f"or keyword: give it one (reduction='none' returning one loss per item)")
        self.old_loss_func = loss_func
        self.run.loss_func = MixUpLoss(loss_func, self)

    def begin_batch(self) -> None:
        if not self.run.in_train: return
        xb, yb = self.run.xb, self.run.yb
        _check_batch(xb, yb)
        n = xb.shape[0]
        self.lam = self._sample_lam(n, xb.device)
        self.perm = torch.randperm(n, device=xb.device)
        self.yb1 = yb[self.perm if yb.device == xb.device else self.perm.to(yb.device)]
        self.run.xb = lin_comb(xb, xb[self.perm], _per_item_view(self.lam, xb))
        if _is_soft(yb): self.run.yb = lin_comb(yb, self.yb1, _per_item_view(self.lam.to(yb.device), yb))

    def _sample_lam(self, n: int, device: torch.device) -> torch.Tensor:
        key = (device, self.alpha)
        if key not in self._betas:
            concentration = torch.tensor(self.alpha, device=device)
            # validate_args=False: argument checks would read the device every batch
            self._betas = {key: Beta(concentration, concentration, validate_args=False)}
        beta = self._betas[key]
        if not self.per_sample: return beta.sample().expand(n)
        lam = beta.sample((n,))
        return torch.maximum(lam, 1 - lam)

    def after_fit(self) -> None:
        if self.old_loss_func is None: return  # begin_fit never ran
        self.run.loss_func, self.old_loss_func = self.old_loss_func, None
