"""MixUp and CutMix: train on mixed pairs of inputs, with the losses (or soft targets) mixed in the same proportion.

`MixHandler` holds what the mixing callbacks share: the shuffle, the swap of the learner's loss for a
`MixUpLoss` (and its restore), soft targets, and stopping the mix for the last part of training; `MixUp`,
`CutMix` and `MixUpCutMix` only draw their random parameters and mix one batch. They are written here
rather than taken from timm because timm's `Mixup` needs an even batch size, builds one-hot targets
itself and reads its draws on the host (numpy) every batch.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch.distributions import Beta

from ..callback import Callback, Order
from ..core import check_positive
from ..losses import NoneReduce, WrappedLoss, _check_fraction, lin_comb, reduce_loss

__all__ = ['MixHandler', 'MixUp', 'CutMix', 'MixUpCutMix', 'MixUpLoss']


def _per_item_view(lam: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """λ of shape (N,) viewed as (N, 1, ..., 1) to broadcast against `like`, in its dtype."""
    return lam.to(like.dtype).view((-1,) + (1,) * (like.ndim - 1))


def _is_soft(yb: Any) -> bool:
    return isinstance(yb, torch.Tensor) and yb.is_floating_point()


def _accepts_reduction(loss_func: Callable) -> bool:
    if hasattr(loss_func, 'reduction'): return True
    try:
        params = inspect.signature(loss_func).parameters.values()
    except (TypeError, ValueError):  # builtins without a signature: let the first call tell
        return True
    return any(p.name == 'reduction' or p.kind is p.VAR_KEYWORD for p in params)


def _check_alpha(owner: str, name: str, alpha: Any) -> float:
    try:
        check_positive(f'{owner} {name}', alpha)
    except ValueError as e:
        raise ValueError(f"{e} (the Beta({name}, {name}) parameter); to train without mixing, leave the {owner} "
                         f"callback out") from None
    return float(alpha)


def _check_flag(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool): raise TypeError(f"{owner} {name} must be True or False, got {value!r}")
    return value


class MixUpLoss(WrappedLoss):
    """The loss while a mixing callback trains: mixes the per-item losses of both targets with the batch's λ.

    The user's loss is `base_loss_func` (what `minilearn.core.unwrap_loss` returns); `reduction` reads
    and writes the user's loss's reduction. `mixup` is the mixing callback (any `MixHandler`).
    Validation batches, unmixed batches and soft targets (mixed by the callback itself) go straight to
    the user's loss.
    """

    def __init__(self, base_loss_func: Callable, mixup: MixHandler):
        super().__init__(base_loss_func)
        self.mixup = mixup

    def __call__(self, pred: Any, yb: Any) -> Any:
        mixup = self.mixup
        if not mixup.run.in_train or mixup.lam is None or _is_soft(yb): return self.base_loss(pred, yb)
        reduction = self.reduction
        with NoneReduce(self.base_loss_func) as per_item:
            loss1, loss2 = per_item(pred, yb), per_item(pred, mixup.yb1)
        n = mixup.lam.shape[0]
        if not isinstance(loss1, torch.Tensor) or loss1.ndim == 0 or loss1.shape[0] != n:
            raise ValueError(f"{type(mixup).__name__} needs one loss per item: {self.base_loss_func!r} with "
                             f"reduction='none' returned shape {tuple(getattr(loss1, 'shape', ()))} for a batch of {n}")
        return reduce_loss(lin_comb(loss1, loss2, _per_item_view(mixup.lam, loss1)), reduction)

    def __repr__(self) -> str:
        return f'MixUpLoss({self.base_loss_func!r})'


class MixHandler(Callback):
    """Base of the mixing callbacks: shuffles each training batch, swaps in `MixUpLoss`, mixes soft targets.

    A subclass implements `draw(xb)` (the batch's random parameters, drawn before the shuffle) and
    `mix(xb, xb1, drawn)` (the mixed batch and λ, the weight of the original items, shape (N,)).
    Float targets (soft labels, multi-label 0/1 targets) are mixed as targets, y = λ·y + (1−λ)·y[perm];
    class-index targets by mixing the two per-item losses. `stop_pct`: no mixing once the part of the
    fit still to run (1 − `n_epochs`/`epochs`, from the learner) is at most `stop_pct`. `lam`, `perm`
    and `yb1` (the shuffled targets) describe the last training batch; all None when it was not mixed.
    The learner's `loss_func` is swapped for a `MixUpLoss` during the fit and put back at `after_fit`.
    """
    _order = Order.MIX
    needs_images = False  # True: inputs must be image batches (N, C, H, W)

    def __init__(self, stop_pct: float | None = None):
        self.stop_pct = None if stop_pct is None else _check_fraction(f'{type(self).__name__} stop_pct', stop_pct)
        self.lam = self.yb1 = self.perm = None
        self.old_loss_func: Callable | None = None
        self._consts: dict = {}  # Beta distributions and box grids per device, built on the first batch there

    @property
    def λ(self) -> torch.Tensor | None:
        """The course's name of `lam`."""
        return self.lam

    def draw(self, xb: torch.Tensor) -> Any:
        """The random parameters of this batch, drawn on `xb`'s device before the shuffle."""
        raise NotImplementedError(f"{type(self).__name__} must implement draw(xb)")

    def mix(self, xb: torch.Tensor, xb1: torch.Tensor, drawn: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The mixed batch from `xb` and its shuffle `xb1`, and λ of shape (N,) (the weight of `xb`'s targets)."""
        raise NotImplementedError(f"{type(self).__name__} must implement mix(xb, xb1, drawn)")

    def begin_fit(self) -> None:
        loss_func, name = self.run.loss_func, type(self).__name__
        if isinstance(loss_func, MixUpLoss):
            raise ValueError(f"{name}: the loss is already mixed by {type(loss_func.mixup).__name__}; attach one "
                             f"mixing callback (MixUpCutMix picks MixUp or CutMix per batch)")
        if not _accepts_reduction(loss_func):
            raise TypeError(f"{name} needs per-item losses, but the loss {loss_func!r} has no `reduction` attribute "
                            f"or keyword: give it one (reduction='none' returning one loss per item)")
        self.old_loss_func = loss_func
        self.run.loss_func = MixUpLoss(loss_func, self)

    def mixing(self) -> bool:
        """Whether this training batch is mixed: always, or until the last `stop_pct` of the fit."""
        if self.stop_pct is None: return True
        remaining = 1 - self.run.n_epochs / self.run.epochs
        return remaining > self.stop_pct + 1e-9  # the margin absorbs the rounding of n_epochs = epoch + iter/iters

    def begin_batch(self) -> None:
        if not self.run.in_train: return
        if not self.mixing():
            self.lam = self.yb1 = self.perm = None
            return
        xb, yb = self.run.xb, self.run.yb
        self._check_batch(xb, yb)
        drawn = self.draw(xb)
        self.perm = torch.randperm(xb.shape[0], device=xb.device)
        self.yb1 = yb[self.perm if yb.device == xb.device else self.perm.to(yb.device)]
        self.run.xb, self.lam = self.mix(xb, xb[self.perm], drawn)
        if _is_soft(yb): self.run.yb = lin_comb(yb, self.yb1, _per_item_view(self.lam.to(yb.device), yb))

    def _check_batch(self, xb: Any, yb: Any) -> None:
        name = type(self).__name__
        if not isinstance(xb, torch.Tensor) or not xb.is_floating_point() or xb.ndim == 0:
            raise TypeError(f"{name} mixes floating-point input batches of shape (N, ...), got "
                            f"{getattr(xb, 'dtype', type(xb).__name__)}; integer inputs (token ids) cannot be mixed")
        if self.needs_images and xb.ndim != 4:
            raise ValueError(f"{name} pastes boxes into image batches of shape (N, C, H, W), got inputs of shape "
                             f"{tuple(xb.shape)}; reshape them to images, or use MixUp (any rank)")
        if not isinstance(yb, torch.Tensor) or yb.ndim == 0 or yb.shape[0] != xb.shape[0]:
            raise TypeError(f"{name} needs targets as one tensor with one entry per item of the batch (shape "
                            f"({xb.shape[0]}, ...)), got {getattr(yb, 'shape', type(yb).__name__)}")

    def _beta(self, alpha: float, device: torch.device) -> Beta:
        key = ('beta', alpha, device)
        if key not in self._consts:
            concentration = torch.tensor(alpha, device=device)
            # validate_args=False: argument checks would read the device every batch
            self._consts[key] = Beta(concentration, concentration, validate_args=False)
        return self._consts[key]

    def _grid(self, xb: torch.Tensor) -> _Grid:
        h, w = xb.shape[-2:]
        key = ('grid', h, w, xb.device)
        if key not in self._consts:
            size = torch.tensor([h, w], device=xb.device)
            self._consts[key] = _Grid(h, w, size, size.to(torch.get_default_dtype()),
                                      torch.arange(max(h, w), device=xb.device), torch.tensor(1., device=xb.device),
                                      torch.tensor(float(h * w), device=xb.device))
        return self._consts[key]

    def after_fit(self) -> None:
        if self.old_loss_func is None: return  # begin_fit never ran
        self.run.loss_func, self.old_loss_func = self.old_loss_func, None


def _mixup_lam(beta: Beta, n: int, per_sample: bool) -> torch.Tensor:
    if not per_sample: return beta.sample().expand(n)
    lam = beta.sample((n,))
    return torch.maximum(lam, 1 - lam)


class _Grid(NamedTuple):
    """An image size as ints and as tensors on the device, the pixel indices along either side, constants."""
    h: int
    w: int
    size: torch.Tensor  # [H, W]
    float_size: torch.Tensor
    index: torch.Tensor  # arange(max(H, W))
    one: torch.Tensor  # 1 and H·W as tensors: a Python number costs a conversion per batch
    area: torch.Tensor


def _cutmix_draw(beta: Beta, grid: _Grid) -> tuple[torch.Tensor, torch.Tensor]:
    """λ ~ Beta(α, α) and the box centre [row, column], uniform over the pixels, on the grid's device."""
    lam = beta.sample()
    device = grid.index.device
    return lam, torch.stack([torch.randint(grid.h, (), device=device), torch.randint(grid.w, (), device=device)])


def _cutmix_box(drawn: tuple[torch.Tensor, torch.Tensor], grid: _Grid, exact_area: bool,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The (H, W) weight of the original pixels (0 in the box, 1 outside) in `dtype`, and the λ of the box.

    The box is round(H·√(1−λ)) rows by round(W·√(1−λ)) columns, its top-left corner half its size before
    the centre, clipped to the image. Its edges stay tensors: the mask compares them with the pixel
    indices, so no coordinate is read back to the host. The weight feeds `torch.lerp`, exact at 0 and 1
    (so the box holds the partner's pixels exactly), and faster than `torch.where` with a broadcast mask.
    """
    lam, centre = drawn
    cut = (grid.float_size * torch.sqrt(grid.one - lam)).round().long()
    start = centre - cut // 2
    end = torch.minimum(start + cut, grid.size)  # never below start: the centre lies in the image
    start = start.clamp(min=0)
    inside = (grid.index >= start[:, None]) & (grid.index < end[:, None])  # rows, then columns
    keep = (~(inside[0, :grid.h, None] & inside[1, None, :grid.w])).to(dtype)
    if exact_area: lam = (grid.one - (end - start).prod() / grid.area).to(lam.dtype)
    return keep, lam


class MixUp(MixHandler):
    """MixUp (Zhang et al. 2018) in training: x = λ·x + (1−λ)·x[perm], loss = λ·loss(y) + (1−λ)·loss(y[perm]).

    Per sample (default) λ ~ Beta(α, α) replaced by max(λ, 1−λ), so each mix is dominated by its own
    sample; `per_sample=False` draws one plain λ per batch (the paper's and the seed lab's `mixup_data`).
    λ and the permutation are drawn on the batch's device from torch's generator (seeded by
    `torch.manual_seed`), with no host synchronisation. Inputs of any rank ≥ 1 are mixed; float
    (soft) targets are mixed as targets instead of mixing two losses. The per-item losses come from
    the loss with reduction 'none' and are reduced with the loss's own reduction ('mean' is the plain
    mean over items). `stop_pct`: no mixing in the last fraction of the fit (see `MixHandler`). The
    course's `α` keyword is accepted too.
    """

    def __init__(self, alpha: float = 0.4, per_sample: bool = True, stop_pct: float | None = None, *,
                 α: float | None = None):
        if α is not None:
            if alpha != 0.4: raise TypeError("give MixUp's parameter as `alpha` or as `α`, not both")
            alpha = α
        super().__init__(stop_pct)
        self.alpha, self.per_sample = _check_alpha('MixUp', 'alpha', alpha), bool(per_sample)

    def draw(self, xb: torch.Tensor) -> torch.Tensor:
        return _mixup_lam(self._beta(self.alpha, xb.device), xb.shape[0], self.per_sample)

    def mix(self, xb: torch.Tensor, xb1: torch.Tensor, drawn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return lin_comb(xb, xb1, _per_item_view(drawn, xb)), drawn


class CutMix(MixHandler):
    """CutMix (Yun et al. 2019) in training: a box of x[perm] pasted into x, the two losses mixed by pixel share.

    Per batch λ ~ Beta(α, α) and a box of about (1−λ)·H·W pixels (sides H·√(1−λ) and W·√(1−λ)) at a
    centre uniform over the pixels, clipped to the image; with `exact_area` (default) λ is then
    recomputed as 1 − (box area)/(H·W), so the loss weights are the pixel fractions; `exact_area=False`
    keeps the drawn λ (timm's `correct_lam=False`). Inputs are (N, C, H, W); any batch size.
    No host sync: λ, the centre and the permutation are drawn on the batch's device from torch's
    generator, and the box is pasted through a 0/1 weight that is built on the device by comparing its
    edges with the pixel indices (the edges are never read as Python ints). Loss swap, soft targets and
    `stop_pct` as in `MixUp` (see `MixHandler`).
    """
    needs_images = True

    def __init__(self, alpha: float = 1.0, exact_area: bool = True, stop_pct: float | None = None):
        super().__init__(stop_pct)
        self.alpha = _check_alpha('CutMix', 'alpha', alpha)
        self.exact_area = _check_flag('CutMix', 'exact_area', exact_area)

    def draw(self, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return _cutmix_draw(self._beta(self.alpha, xb.device), self._grid(xb))

    def mix(self, xb: torch.Tensor, xb1: torch.Tensor, drawn: Any) -> tuple[torch.Tensor, torch.Tensor]:
        keep, lam = _cutmix_box(drawn, self._grid(xb), self.exact_area, xb.dtype)
        return lin_comb(xb, xb1, keep), lam.expand(xb.shape[0])


class MixUpCutMix(MixHandler):
    """Per batch, CutMix with probability `switch_prob`, else MixUp (timm's `Mixup(switch_prob=...)`).

    The MixUp part is `MixUp(mixup_alpha, per_sample)`, the CutMix part `CutMix(cutmix_alpha, exact_area)`.
    The choice is a draw of torch's generator on the batch's device, and both parts are one weighted
    blend x·w + x[perm]·(1−w) with a per-pixel weight w (λ, or 0 inside the box and 1 outside), so the
    batch is mixed without reading the choice back to the host. `use_cutmix` (a 0-d bool tensor) says
    which the last training batch used. Inputs are (N, C, H, W); `stop_pct` as in `MixHandler`.
    """
    needs_images = True

    def __init__(self, mixup_alpha: float = 0.4, cutmix_alpha: float = 1.0, switch_prob: float = 0.5,
                 per_sample: bool = True, exact_area: bool = True, stop_pct: float | None = None):
        super().__init__(stop_pct)
        self.mixup_alpha = _check_alpha('MixUpCutMix', 'mixup_alpha', mixup_alpha)
        self.cutmix_alpha = _check_alpha('MixUpCutMix', 'cutmix_alpha', cutmix_alpha)
        self.switch_prob = _check_fraction('MixUpCutMix switch_prob', switch_prob, upper_inclusive=True)
        self.per_sample = _check_flag('MixUpCutMix', 'per_sample', per_sample)
        self.exact_area = _check_flag('MixUpCutMix', 'exact_area', exact_area)
        self.use_cutmix: torch.Tensor | None = None

    def draw(self, xb: torch.Tensor) -> tuple:
        use_cutmix = torch.rand((), device=xb.device) < self.switch_prob
        return (use_cutmix, _mixup_lam(self._beta(self.mixup_alpha, xb.device), xb.shape[0], self.per_sample),
                _cutmix_draw(self._beta(self.cutmix_alpha, xb.device), self._grid(xb)))

    def mix(self, xb: torch.Tensor, xb1: torch.Tensor, drawn: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        self.use_cutmix, mixup_lam, cutmix_drawn = drawn
        keep, cutmix_lam = _cutmix_box(cutmix_drawn, self._grid(xb), self.exact_area, xb.dtype)
        weight = torch.where(self.use_cutmix, keep, _per_item_view(mixup_lam, xb))  # (N, 1, H, W)
        lam = torch.where(self.use_cutmix, cutmix_lam.expand(xb.shape[0]), mixup_lam)
        return lin_comb(xb, xb1, weight), lam

    def begin_batch(self) -> None:
        if self.run.in_train: self.use_cutmix = None  # stays None for a batch that is not mixed
        super().begin_batch()
