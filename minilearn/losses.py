"""Loss helpers: mixing and reducing losses, per-item losses, label smoothing, soft targets, noise-robust losses.

Target validation policy: shapes, dtypes, `eps`, `beta` and the reduction are checked on every call
(pure Python on shapes, free). The class-index losses never read target values on the normal path
(no host read per batch): an out-of-range index makes the CPU gather fail, and that failure is turned
into a ValueError naming the index; on an accelerator it would be a device-side assert, so the
learner's once-per-fit pre-flight check (`minilearn.checks.check_batch`, which reads the
`class_index_targets` and `ignore_index` attributes of these losses) validates the first batch of a
fit. `smooth_one_hot`, a data-preparation helper, checks CPU targets up front.
"""
from __future__ import annotations

import functools
import math
from collections.abc import Callable
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['REDUCTIONS', 'lin_comb', 'reduce_loss', 'loss_reduction', 'NoneReduce', 'WrappedLoss', 'smooth_one_hot',
           'LabelSmoothingCrossEntropy', 'SoftTargetCrossEntropy', 'SoftBootstrappingLoss', 'HardBootstrappingLoss',
           'GeneralizedCrossEntropy', 'SymmetricCrossEntropy']

REDUCTIONS = ('mean', 'sum', 'none')


def lin_comb(a: Any, b: Any, t: Any) -> Any:
    """t·a + (1−t)·b (the course's `lin_comb(v1, v2, beta)`)."""
    if (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.is_floating_point() and a.dtype == b.dtype
            and (isinstance(t, float) or isinstance(t, torch.Tensor) and t.dtype == a.dtype)):
        return torch.lerp(b, a, t)  # one kernel instead of three, on the per-batch path of MixUp
    return t * a + (1 - t) * b


def _check_reduction(reduction: Any) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; valid reductions: {', '.join(map(repr, REDUCTIONS))}")


def reduce_loss(loss: torch.Tensor, reduction: str = 'mean') -> torch.Tensor:
    """The mean, the sum, or (for 'none') the unchanged per-item losses."""
    _check_reduction(reduction)
    if reduction == 'mean': return loss.mean()
    if reduction == 'sum': return loss.sum()
    return loss


def loss_reduction(loss_func: Any) -> str:
    """The reduction a loss applies: its `reduction` attribute, a partial's `reduction` keyword, else 'mean'."""
    if hasattr(loss_func, 'reduction'): return loss_func.reduction
    if isinstance(loss_func, functools.partial):
        return loss_func.keywords.get('reduction', loss_reduction(loss_func.func))
    return 'mean'



class WrappedLoss:
    """The loss a callback puts in place of the user's for a fit (MixUp's, ELR's): the user's is `base_loss_func`
    (what `core.unwrap_loss` finds), and `reduction` reads and writes the user's loss's reduction."""

    def __init__(self, base_loss_func: Callable):
        self.base_loss_func = base_loss_func
        self._reduction: str | None = None  # set only for a base loss that is a plain function

    @property
    def reduction(self) -> str:
        return self._reduction or loss_reduction(self.base_loss_func)

    @reduction.setter
    def reduction(self, value: str) -> None:
        if hasattr(self.base_loss_func, 'reduction'): self.base_loss_func.reduction = value
        else: self._reduction = value

    def base_loss(self, pred: Any, yb: Any) -> Any:
        """The user's loss of the batch, with the reduction set on this wrapper."""
        if self._reduction is None: return self.base_loss_func(pred, yb)
        return self.base_loss_func(pred, yb, reduction=self._reduction)

class NoneReduce:
    """`with NoneReduce(loss_func) as per_item:` a version of the loss giving per-item losses inside the block.

    An object with a `reduction` attribute gets it set to 'none' and restored on exit (also when the
    block raises); a plain function is wrapped as `partial(loss_func, reduction='none')`.
    """

    def __init__(self, loss_func: Callable):
        self.loss_func = loss_func
        self._saved: list = []  # a stack, so nested blocks on the same loss restore in order

    def __enter__(self) -> Callable:
        if hasattr(self.loss_func, 'reduction'):
            self._saved.append(self.loss_func.reduction)
            self.loss_func.reduction = 'none'
            return self.loss_func
        return functools.partial(self.loss_func, reduction='none')

    def __exit__(self, *exc: Any) -> None:
        if self._saved: self.loss_func.reduction = self._saved.pop()


# ---- validation shared by the losses --------------------------------------------------------------
def _check_fraction(name: str, value: Any, upper_inclusive: bool = False) -> float:
    upper_ok = (lambda v: v <= 1) if upper_inclusive else (lambda v: v < 1)
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0 \
            or not upper_ok(value):
        interval = '[0, 1]' if upper_inclusive else '[0, 1)'
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def _check_range_on_cpu(name: str, target: torch.Tensor, n_classes: int, ignore_index: int | None) -> None:
    # Only on the CPU: reading the targets of a CUDA batch would synchronise the device (see module doc).
    if target.device.type != 'cpu' or target.numel() == 0: return
    low, high = torch.aminmax(target)
    if int(low) >= 0 and int(high) < n_classes: return  # the common case, in one pass
    bad = (target < 0) | (target >= n_classes)
    if ignore_index is not None: bad &= target != ignore_index
    if bad.any():
        value = int(target[bad][0])
        allowed = '' if ignore_index is None else f" (or equal ignore_index={ignore_index})"
        raise ValueError(f"{name}: target class index {value} is out of range for {n_classes} classes: class "
                         f"indices must lie in [0, {n_classes}){allowed}. Check the labels, or give the model's "
                         f"last layer more outputs")


def _check_class_targets(name: str, input: Any, target: Any, ignore_index: int | None) -> None:
    """Shapes and dtypes of (N, C, d1, ...) scores with (N, d1, ...) class indices (or (C,) with a scalar)."""
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        raise TypeError(f"{name} takes tensors (input, target), got {type(input).__name__} and {type(target).__name__}")
    if input.ndim == 0:
        raise ValueError(f"{name} needs scores of shape (N, C, ...) or (C,), got a scalar")
    if target.dtype == torch.bool or target.is_floating_point() or target.is_complex():
        raise TypeError(f"{name} takes integer class indices as targets, got dtype {target.dtype} "
                        f"(use .long(); for per-class probabilities use SoftTargetCrossEntropy)")
    expected = () if input.ndim == 1 else (input.shape[0],) + tuple(input.shape[2:])
    if tuple(target.shape) != expected:
        raise ValueError(f"{name}: target shape {tuple(target.shape)} does not match the input shape "
                         f"{tuple(input.shape)}; class indices must have shape {expected} (the input's shape "
                         f"without the class dimension 1)")


class _ClassIndexLoss(nn.Module):
    """Common part of the losses taking (N, C, ...) scores and (N, ...) class indices."""
    class_index_targets = True  # read by minilearn.checks for the once-per-fit target check

    def __init__(self, reduction: str, ignore_index: int):
        super().__init__()
        _check_reduction(reduction)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
        self.reduction, self.ignore_index = reduction, ignore_index

    def _log_probs(self, input: torch.Tensor, target: torch.Tensor) -> tuple:
        """(log-probabilities, targets safe to gather, mask of ignored targets) in batched form."""
        _check_reduction(self.reduction)
        _check_class_targets(type(self).__name__, input, target, self.ignore_index)
        if input.ndim == 1: input, target = input.unsqueeze(0), target.unsqueeze(0)
        ignored = target == self.ignore_index
        return F.log_softmax(input, dim=1), target.masked_fill(ignored, 0).long(), ignored

    def _reduce(self, loss: torch.Tensor, ignored: torch.Tensor, unbatched: bool,
                denominator: torch.Tensor | None = None) -> torch.Tensor:
        """Reduce per-item losses with ignored items set to 0; 'mean' divides by `denominator` (default: kept items)."""
        loss = loss.masked_fill(ignored, 0.)
        if self.reduction == 'none': return loss.squeeze(0) if unbatched else loss
        if self.reduction == 'sum': return loss.sum()
        return loss.sum() / ((~ignored).sum() if denominator is None else denominator)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}, ignore_index={self.ignore_index}"


def _nll(log_probs: torch.Tensor, target: torch.Tensor, name: str) -> torch.Tensor:
    """−log p of each target class; `target` has its ignored entries already replaced by 0."""
    try:
        return -log_probs.gather(1, target.unsqueeze(1)).squeeze(1)
    except (RuntimeError, IndexError) as error:  # only reached with an out-of-range index (CPU)
        _check_range_on_cpu(name, target.cpu(), log_probs.shape[1], None)
        raise error


class LabelSmoothingCrossEntropy(_ClassIndexLoss):
    """Label-smoothed cross entropy (1−ε)·nll + ε·mean_c(−log p_c), equal to `F.cross_entropy(label_smoothing=ε)`.

    Inputs (N, C, d1, ...) or (C,) with class-index targets (N, d1, ...) or a scalar, or with float
    per-class probabilities of the input's shape (smoothed like F.cross_entropy does). `ignore_index`
    targets count in neither term nor in the 'mean' denominator; with `weight` (one per class) the
    smoothing term is ε/C·Σ_c w_c·(−log p_c) and 'mean' divides by the summed weights of the kept
    targets, exactly as PyTorch does. `reduction` is read at call time. The course's `ε` keyword is
    accepted (`LabelSmoothingCrossEntropy(ε=0.1)`) and `.ε` reads `.eps`.

    After its checks it is computed by `F.cross_entropy(..., label_smoothing=ε)` itself, so it is exact
    by construction and as fast. Bad input raises ValueError: a shape mismatch or an `eps` outside
    [0, 1) before any math; a class index outside [0, C) (other than `ignore_index`) is named when the
    CPU kernel refuses it. On an accelerator that check is done once per fit by the learner's
    pre-flight check on the first batch (`minilearn.checks`).
    """

    def __init__(self, eps: float = 0.1, reduction: str = 'mean', ignore_index: int = -100,
                 weight: torch.Tensor | None = None, *, ε: float | None = None):
        super().__init__(reduction, ignore_index)
        if ε is not None:
            if eps != 0.1: raise TypeError("give the smoothing as `eps` or as `ε`, not both")
            eps = ε
        self.eps = eps
        self.register_buffer('weight', _check_weight(weight))

    @property
    def eps(self) -> float:
        """The smoothing amount ε, in [0, 1)."""
        return self._eps

    @eps.setter
    def eps(self, value: float) -> None:
        self._eps = _check_fraction('eps (label smoothing)', value)

    @property
    def ε(self) -> float:
        """The course's name of `eps` (read-only)."""
        return self._eps

    def _class_weight(self, input: torch.Tensor, n_classes: int) -> torch.Tensor | None:
        if self.weight is None: return None
        if self.weight.shape[0] != n_classes:
            raise ValueError(f"LabelSmoothingCrossEntropy: weight has {self.weight.shape[0]} entries but the input "
                             f"has {n_classes} classes; give one weight per class")
        return self.weight.to(device=input.device, dtype=input.dtype)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if isinstance(target, torch.Tensor) and target.is_floating_point():
            return self._probability_targets(input, target)
        name = type(self).__name__
        _check_reduction(self.reduction)
        _check_class_targets(name, input, target, self.ignore_index)
        n_classes = input.shape[0 if input.ndim == 1 else 1]
        weight = self._class_weight(input, n_classes)
        if target.dtype != torch.int64: target = target.long()
        try:  # PyTorch's fused kernel: one log_softmax, no one-hot, its own ε/C convention
            return F.cross_entropy(input, target, weight=weight, ignore_index=self.ignore_index,
                                   reduction=self.reduction, label_smoothing=self.eps)
        except (RuntimeError, IndexError):  # an out-of-range class index (CPU): name it
            _check_range_on_cpu(name, target.cpu(), n_classes, self.ignore_index)
            raise

    def _probability_targets(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_reduction(self.reduction)
        if not isinstance(input, torch.Tensor) or input.shape != target.shape:
            raise ValueError(f"LabelSmoothingCrossEntropy: float targets are per-class probabilities and must have "
                             f"the input's shape {tuple(getattr(input, 'shape', ()))}, got {tuple(target.shape)}; "
                             f"class indices must be integers (use .long())")
        class_dim = 0 if input.ndim == 1 else 1
        n_classes = input.shape[class_dim]
        if self.eps: target = lin_comb(target, torch.full_like(target, 1 / n_classes), 1 - self.eps)
        products = F.log_softmax(input, dim=class_dim) * target
        weight = self._class_weight(input, n_classes)
        if weight is not None: products = products * weight.view((-1,) + (1,) * (input.ndim - 1 - class_dim))
        return reduce_loss(-products.sum(class_dim), self.reduction)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, {super().extra_repr()}, weight={'None' if self.weight is None else 'tensor'}"


def _check_weight(weight: Any) -> torch.Tensor | None:
    if weight is None: return None
    weight = torch.as_tensor(weight, dtype=None if isinstance(weight, torch.Tensor) else torch.float32)
    if weight.ndim != 1 or not weight.is_floating_point():
        raise ValueError(f"weight must be a 1-D float tensor with one weight per class, got shape "
                         f"{tuple(weight.shape)} and dtype {weight.dtype}")
    return weight


def smooth_one_hot(targets: torch.Tensor, n_classes: int, eps: float, exclude_true: bool = False,
                   dtype: torch.dtype | None = None) -> torch.Tensor:
    """Smoothed one-hot distributions of shape `targets.shape + (n_classes,)`; each row sums to 1.

    Default: ε/K on every class, so the true class gets 1−ε+ε/K (the `F.cross_entropy(label_smoothing)`
    convention). `exclude_true=True`: ε/(K−1) on the other classes and 1−ε on the true one.
    """
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
    if exclude_true and n_classes < 2:
        raise ValueError("exclude_true=True spreads eps over the other classes, so it needs n_classes >= 2")
    eps = _check_fraction('eps (label smoothing)', eps)
    if not isinstance(targets, torch.Tensor) or targets.is_floating_point() or targets.dtype == torch.bool:
        raise TypeError(f"targets must be a tensor of integer class indices, got "
                        f"{getattr(targets, 'dtype', type(targets).__name__)}")
    _check_range_on_cpu('smooth_one_hot', targets, n_classes, None)
    off = eps / (n_classes - 1) if exclude_true else eps / n_classes
    on = 1 - eps if exclude_true else 1 - eps + eps / n_classes
    dtype = dtype or torch.get_default_dtype()
    out = torch.full(tuple(targets.shape) + (n_classes,), off, dtype=dtype, device=targets.device)
    return out.scatter_(-1, targets.long().unsqueeze(-1), on)


class SoftTargetCrossEntropy(nn.Module):
    """Cross entropy against per-class probabilities of the input's shape: −Σ_c target_c · log softmax(input)_c."""

    def __init__(self, reduction: str = 'mean'):
        super().__init__()
        _check_reduction(reduction)
        self.reduction = reduction

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        _check_reduction(self.reduction)
        if not isinstance(target, torch.Tensor) or not target.is_floating_point():
            raise TypeError(f"SoftTargetCrossEntropy takes float per-class probabilities as targets, got "
                            f"{getattr(target, 'dtype', type(target).__name__)}; for class indices use "
                            f"LabelSmoothingCrossEntropy or smooth_one_hot(targets, n_classes, eps)")
        if not isinstance(input, torch.Tensor) or input.shape != target.shape or input.ndim == 0:
            raise ValueError(f"SoftTargetCrossEntropy: targets must have the input's shape "
                             f"{tuple(getattr(input, 'shape', ()))} (one probability per class), "
                             f"got {tuple(target.shape)}")
        class_dim = 0 if input.ndim == 1 else 1
        return reduce_loss(-(target * F.log_softmax(input, dim=class_dim)).sum(class_dim), self.reduction)

    def extra_repr(self) -> str:
        return f"reduction={self.reduction!r}"


class _BootstrappingLoss(_ClassIndexLoss):
    def __init__(self, beta: float, reduction: str, ignore_index: int):
        super().__init__(reduction, ignore_index)
        self.beta = beta

    @property
    def beta(self) -> float:
        """Weight of the cross entropy with the given labels, in [0, 1]."""
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta = _check_fraction('beta', value, upper_inclusive=True)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        unbatched = isinstance(input, torch.Tensor) and input.ndim == 1
        log_probs, target, ignored = self._log_probs(input, target)
        loss = lin_comb(_nll(log_probs, target, type(self).__name__), self._self_term(log_probs), self.beta)
        return self._reduce(loss, ignored, unbatched)

    def extra_repr(self) -> str:
        return f"beta={self.beta}, {super().extra_repr()}"


class SoftBootstrappingLoss(_BootstrappingLoss):
    """Reed et al.'s soft bootstrapping: β·CE(p, y) + (1−β)·H(softmax(p), p), the target softmax detached."""

    def __init__(self, beta: float = 0.95, reduction: str = 'mean', ignore_index: int = -100):
        super().__init__(beta, reduction, ignore_index)

    @staticmethod
    def _self_term(log_probs: torch.Tensor) -> torch.Tensor:
        return -(log_probs.detach().exp() * log_probs).sum(1)


class HardBootstrappingLoss(_BootstrappingLoss):
    """Reed et al.'s hard bootstrapping: β·CE(p, y) + (1−β)·CE(p, argmax p)."""

    def __init__(self, beta: float = 0.8, reduction: str = 'mean', ignore_index: int = -100):
        super().__init__(beta, reduction, ignore_index)

    @staticmethod
    def _self_term(log_probs: torch.Tensor) -> torch.Tensor:
        # log_softmax is monotonic, so its max is the log-probability of the predicted class
        return -log_probs.max(1).values


# ---- noise-robust losses ----------------------------------------------------------------------------
class _WeightedClassIndexLoss(_ClassIndexLoss):
    """A per-item loss of (log-probabilities, targets), weighted per class as `F.cross_entropy` does."""

    def __init__(self, reduction: str, ignore_index: int, weight: Any):
        super().__init__(reduction, ignore_index)
        self.register_buffer('weight', _check_weight(weight))

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        unbatched = isinstance(input, torch.Tensor) and input.ndim == 1
        log_probs, target, ignored = self._log_probs(input, target)
        name = type(self).__name__
        loss = self._per_item(log_probs, -_nll(log_probs, target, name))
        if self.weight is None: return self._reduce(loss, ignored, unbatched)
        if self.weight.shape[0] != log_probs.shape[1]:
            raise ValueError(f"{name}: weight has {self.weight.shape[0]} entries but the input has "
                             f"{log_probs.shape[1]} classes; give one weight per class")
        w = self.weight.to(device=input.device, dtype=log_probs.dtype)[target].masked_fill(ignored, 0.)
        return self._reduce(loss * w, ignored, unbatched, denominator=w.sum())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight={'None' if self.weight is None else 'tensor'}"


class GeneralizedCrossEntropy(_WeightedClassIndexLoss):
    """Zhang & Sabuncu's generalized cross entropy (1 − p_y^q)/q: cross entropy as q → 0, MAE (·½) at q = 1.

    Class-index targets (N, d1, ...) for (N, C, d1, ...) scores; `ignore_index` items count neither in
    the loss nor in the 'mean' denominator; `weight` (one per class) scales each item's loss by its
    target's weight and 'mean' divides by the kept items' summed weights, as `F.cross_entropy` does.
    """

    def __init__(self, q: float = 0.7, reduction: str = 'mean', ignore_index: int = -100, weight: Any = None):
        super().__init__(reduction, ignore_index, weight)
        self.q = q

    @property
    def q(self) -> float:
        """The exponent q, in (0, 1]."""
        return self._q

    @q.setter
    def q(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or not 0 < value <= 1:
            raise ValueError(f"q must be a number in (0, 1] (q -> 0 is cross entropy), got {value!r}")
        self._q = float(value)

    def _per_item(self, log_probs: torch.Tensor, log_p_target: torch.Tensor) -> torch.Tensor:
        # -expm1(q·log p)/q == (1 − p^q)/q, accurate for p near 1 where 1 − p^q cancels
        return -torch.expm1(self.q * log_p_target) / self.q

    def extra_repr(self) -> str:
        return f"q={self.q}, {super().extra_repr()}"


class SymmetricCrossEntropy(_WeightedClassIndexLoss):
    """Wang et al.'s symmetric cross entropy α·CE(p, y) + β·RCE(p, y), the reverse term with log 0 clipped to `A`.

    RCE = −Σ_c p_c·log q_c for the one-hot target q, with log 0 taken as `A` (−4, the paper's value), so
    RCE = −A·(1 − p_y). Defaults are the paper's CIFAR-10 values (α 0.1, β 1).
    Targets, `ignore_index`, `weight` and reductions as in `GeneralizedCrossEntropy`.
    """

    def __init__(self, alpha: float = 0.1, beta: float = 1.0, reduction: str = 'mean', ignore_index: int = -100,
                 weight: Any = None, A: float = -4.0):
        super().__init__(reduction, ignore_index, weight)
        for name, value in (('alpha', alpha), ('beta', beta)):
            if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a non-negative number, got {value!r}")
        if isinstance(A, bool) or not isinstance(A, Real) or not math.isfinite(A) or A >= 0:
            raise ValueError(f"A (the clipped log 0 of the reverse term) must be a negative number, got {A!r}")
        self.alpha, self.beta, self.A = float(alpha), float(beta), float(A)

    def _per_item(self, log_probs: torch.Tensor, log_p_target: torch.Tensor) -> torch.Tensor:
        rce = -self.A * (1 - log_p_target.exp())
        return self.alpha * -log_p_target + self.beta * rce

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, A={self.A}, {super().extra_repr()}"
