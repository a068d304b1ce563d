"""Callbacks that keep a state per training item to train through, or find, noisy labels: `ELR` (early-learning
regularization, Liu et al., NeurIPS 2020) and `AreaUnderMargin` (AUM, Pleiss et al., NeurIPS 2020).

Both read the items of each batch from `learn.idx` (so the data must come from `DataBunch.from_tensors` or
`from_datasets`) and keep their per-item tensors on the model's device, updated with indexed writes
(`index_add_`), never read back per batch. ELR follows the authors' `elr_loss` (shengliu66/ELR,
`ELR/model/loss.py`) line by line; AUM gives the figures of the authors' `aum` package (`AUMCalculator`), whose
`update` reads every margin back to the host: the reason both are written here rather than wrapped.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..callback import Callback, require_idx
from ..core import check_positive
from ..losses import loss_reduction, reduce_loss
from .mixup import MixHandler

__all__ = ['ELR', 'ELRLoss', 'AreaUnderMargin']


def _refuse_mixers_and_ddp(cb: Callback) -> None:
    name = type(cb).__name__
    mixer = cb.run.find_cb(MixHandler)
    if mixer is not None:
        raise ValueError(f"{name} cannot train with {type(mixer).__name__}: a mixed batch has no single item per "
                         f"row for its per-item state; remove one of the two")
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(f"{name} keeps its per-item state on one process and does not run under "
                         f"DistributedCallback yet; train it in a single process")


def _n_items(cb: Callback) -> int:
    return len(cb.run.data.train_dl.dataset)


def _check_logits(name: str, pred: Any, yb: Any = None) -> None:
    """Shapes and dtypes only (no host read): (N, C) logits, and N class indices when `yb` is given."""
    if not isinstance(pred, torch.Tensor) or pred.ndim != 2 or not pred.is_floating_point():
        raise ValueError(f"{name} needs model outputs of shape (N, C), one logit per class; got "
                         f"{tuple(pred.shape) if isinstance(pred, torch.Tensor) else type(pred).__name__}")
    if yb is not None and (not isinstance(yb, torch.Tensor) or yb.is_floating_point() or tuple(yb.shape) != pred.shape[:1]):
        raise TypeError(f"{name} needs class-index targets of shape ({pred.shape[0]},); got "
                        f"{getattr(yb, 'dtype', type(yb).__name__)} of shape {tuple(getattr(yb, 'shape', ()))}")


def _check_state(name: str, state: Any, keys: tuple[str, ...], n_items: int | None) -> None:
    if not isinstance(state, dict) or any(k not in state for k in keys):
        raise KeyError(f"{name}.load_state_dict: the state needs the keys {list(keys)}; pass what state_dict() returned")
    for k in keys:
        t = state[k]
        if t is None: continue
        if not isinstance(t, torch.Tensor): raise TypeError(f"{name}.load_state_dict: {k!r} must be a tensor or None")
        if n_items is not None and len(t) != n_items:
            raise ValueError(f"{name}.load_state_dict: the state holds {len(t)} items, the training set has {n_items}; "
                             f"resume with the same training data")


class ELRLoss:
    """The loss while ELR trains: the user's loss, plus λ·(per-item log(1 − ⟨tᵢ, pᵢ⟩)) reduced like it.

    In training it first moves the batch's targets tᵢ towards the detached, clamped predictions (the authors'
    order); validation batches and prediction get the user's loss alone. `base_loss_func` is the user's loss.
    """

    def __init__(self, base_loss_func: Callable, elr: ELR):
        self.base_loss_func, self.elr = base_loss_func, elr
        self._reduction: str | None = None  # set only for a base loss that is a plain function

    @property
    def reduction(self) -> str:
        return self._reduction or loss_reduction(self.base_loss_func)

    @reduction.setter
    def reduction(self, value: str) -> None:
        if hasattr(self.base_loss_func, 'reduction'): self.base_loss_func.reduction = value
        else: self._reduction = value

    def __call__(self, pred: Any, yb: Any) -> Any:
        if self._reduction is None: loss = self.base_loss_func(pred, yb)
        else: loss = self.base_loss_func(pred, yb, reduction=self._reduction)
        if not self.elr.run.in_train: return loss
        return loss + self.elr.lam * reduce_loss(self.elr.regularizer(pred), self.reduction)

    def __repr__(self) -> str:
        return f'ELRLoss({self.base_loss_func!r})'


class ELR(Callback):
    """Early-learning regularization (Liu et al., NeurIPS 2020): the learner's loss plus λ·mean log(1 − ⟨tᵢ, pᵢ⟩).

    For every training item i it keeps a target tᵢ (N × C, zeros at the start of a fit, on the model's device):
    each training batch, with p = softmax(output) clamped to [1e-4, 1 − 1e-4] and p̂ = p detached,
    tᵢ ← β·tᵢ + (1 − β)·p̂ᵢ/Σp̂ᵢ, then the regularizer is computed, as the authors' `elr_loss`. The authors'
    settings: β 0.7, λ 3 for symmetric noise; β 0.9, λ 1 for asymmetric noise (CIFAR-10).

    The learner's `loss_func` is an `ELRLoss` during the fit and the user's again after it, however it ends;
    validation, `get_preds` and the LR finder (ELR stands aside) use the plain loss. The targets are in
    `state_dict()` (exact resume, inside an epoch too); a new fit (not a resume) starts them at zero. Needs the
    items of each batch (`learn.idx`: DataBunch.from_tensors or from_datasets); refuses MixUp/CutMix and DDP.
    """
    run_during_lr_find = False

    def __init__(self, beta: float = 0.7, lam: float = 3.0):
        if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta < 1:
            raise ValueError(f"ELR beta (the targets' momentum) must be a number in [0, 1), got {beta!r}")
        check_positive('ELR lam', lam)
        self.beta, self.lam = float(beta), float(lam)
        self.targets: torch.Tensor | None = None  # (N, C), made on the first training batch
        self.old_loss_func: Callable | None = None

    def begin_fit(self) -> None:
        require_idx(self)
        _refuse_mixers_and_ddp(self)
        if isinstance(self.run.loss_func, ELRLoss):
            raise ValueError("ELR: the learner's loss is already an ELRLoss; give it the plain loss")
        n = _n_items(self)
        if not self.run.position.resuming or (self.targets is not None and len(self.targets) != n): self.targets = None
        self.old_loss_func = self.run.loss_func
        self.run.loss_func = ELRLoss(self.old_loss_func, self)

    def regularizer(self, pred: torch.Tensor) -> torch.Tensor:
        """Update the batch's targets, then the per-item log(1 − ⟨tᵢ, pᵢ⟩) (shape (N,))."""
        _check_logits('ELR', pred)
        idx = self.run.idx
        if self.targets is None:
            self.targets = torch.zeros(_n_items(self), pred.shape[1], dtype=pred.dtype, device=pred.device)
        elif self.targets.shape[1] != pred.shape[1]:
            raise ValueError(f"ELR keeps targets of {self.targets.shape[1]} classes but the model gives "
                             f"{pred.shape[1]} logits")
        elif self.targets.device != pred.device:  # a loaded state
            self.targets = self.targets.to(pred.device)
        idx = idx.to(pred.device, non_blocking=True)
        y_pred = F.softmax(pred, dim=1).clamp(1e-4, 1.0 - 1e-4)
        y_pred_ = y_pred.detach()
        self.targets[idx] = self.beta * self.targets[idx] + (1 - self.beta) * (y_pred_ / y_pred_.sum(dim=1, keepdim=True))
        return (1 - (self.targets[idx] * y_pred).sum(dim=1)).log()

    def after_fit(self) -> None:
        if self.old_loss_func is None: return  # begin_fit did not swap the loss
        self.run.loss_func, self.old_loss_func = self.old_loss_func, None

    def state_dict(self) -> dict:
        return {'targets': None if self.targets is None else self.targets.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        _check_state('ELR', state, ('targets',), _n_items(self) if self.run is not None else None)
        targets = state['targets']
        self.targets = None if targets is None else targets.clone()


class AreaUnderMargin(Callback):
    """Area under the margin (Pleiss et al., NeurIPS 2020): per training item, the mean over the fit of the margin
    of its training forward passes, logit of the given label minus the largest other logit.

    `scores` is that mean per item (N,), in dataset order, float64 on the CPU, NaN for an item never trained on;
    the figures of the `aum` package's `AUMCalculator.update`/`finalize` on the same logits, summed on the device
    (float64, `index_add_`) without its per-batch host reads. Low AUM: a likely mislabelled item
    (`find_label_issues(aum=...)`). Recorded at `after_loss` of training batches (a batch TerminateOnNaN
    cancels is not); a new fit (not a resume) starts from nothing; the sums are in `state_dict()`. Needs
    `learn.idx` (DataBunch.from_tensors or from_datasets) and class-index targets; refuses MixUp/CutMix and DDP.
    """
    run_during_lr_find = False

    def __init__(self) -> None:
        self.sums: torch.Tensor | None = None  # (N,) float64 sums of margins, on the model's device
        self.counts: torch.Tensor | None = None  # (N,) int64 number of margins

    def begin_fit(self) -> None:
        require_idx(self)
        _refuse_mixers_and_ddp(self)
        if not self.run.position.resuming or (self.sums is not None and len(self.sums) != _n_items(self)):
            self.sums = self.counts = None

    def after_loss(self) -> None:
        if not self.run.in_train: return
        pred, yb = self.run.pred, self.run.yb
        _check_logits('AreaUnderMargin', pred, yb)
        with torch.no_grad():
            pred = pred.detach()
            if self.sums is None or self.sums.device != pred.device:
                self._allocate(pred.device)
            yb = yb.to(pred.device, non_blocking=True).view(-1, 1)
            target = pred.gather(1, yb).squeeze(1)
            other = pred.scatter(1, yb, float('-inf')).amax(1)
            idx = self.run.idx.to(pred.device, non_blocking=True)
            self.sums.index_add_(0, idx, (target - other).double())
            self.counts.index_add_(0, idx, torch.ones_like(idx))

    def _allocate(self, device: torch.device) -> None:
        if self.sums is None:
            n = _n_items(self)
            self.sums = torch.zeros(n, dtype=torch.float64, device=device)
            self.counts = torch.zeros(n, dtype=torch.long, device=device)
        else:  # a loaded state, on the device of the batches
            self.sums, self.counts = self.sums.to(device), self.counts.to(device)

    @property
    def scores(self) -> torch.Tensor:
        """The AUM of every training item, in dataset order (float64, CPU; NaN where never trained on)."""
        if self.sums is None:
            raise ValueError("AreaUnderMargin has recorded nothing yet: fit the learner with this callback attached")
        sums, counts = self.sums.cpu(), self.counts.cpu()
        return torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, float('nan')))

    def state_dict(self) -> dict:
        if self.sums is None: return {'sums': None, 'counts': None}
        return {'sums': self.sums.detach().clone(), 'counts': self.counts.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        _check_state('AreaUnderMargin', state, ('sums', 'counts'), _n_items(self) if self.run is not None else None)
        if (state['sums'] is None) != (state['counts'] is None):
            raise ValueError("AreaUnderMargin.load_state_dict: 'sums' and 'counts' must both be tensors or both None")
        self.sums = None if state['sums'] is None else state['sums'].to(torch.float64).clone()
        self.counts = None if state['counts'] is None else state['counts'].to(torch.long).clone()
