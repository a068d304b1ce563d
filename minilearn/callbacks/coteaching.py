"""Co-teaching and JoCoR: two networks trained on the small-loss items of each batch (learning with noisy labels).

Matched to the authors' code:
- Co-teaching (Han et al., "Co-teaching: robust training of deep neural networks with extremely noisy labels",
  NeurIPS 2018): bhanML/Co-teaching `loss.py` (`loss_coteaching`) and `main.py` (the forget-rate schedule
  `rate_schedule`, and the train loop: both forward passes, then network 1's zero_grad/backward/step, then
  network 2's).
- JoCoR (Wei et al., "Combating noisy labels by agreement: a joint training method with co-regularization",
  CVPR 2020): hongxin001/JoCoR `algorithm/loss.py` (`loss_jocor`, `kl_loss_compute`) and `algorithm/jocor.py`
  (one optimizer over both networks' parameters, one backward of the joint loss).

Where this differs from the authors, on purpose:
- Co-teaching's loss is the mean cross entropy over the kept items; the authors' `loss_coteaching` divides that
  mean by the number of kept items once more (their issue #9), which only rescales the learning rate by the
  batch's kept count.
- The forget rate of an epoch is indexed by the learner's 0-based epoch; the authors' `main.py` trains from
  epoch 1 (its epoch 0 evaluates the untrained networks), so their first training epoch already forgets
  `rate_schedule[1]`.
- The "pure ratio" (`clean=`) is pooled over the epoch (clean kept items / kept items); the authors print the
  mean of the per-batch ratios, which differs only through the short last batch.
- JoCoR's "one optimizer over both networks" is the learner's optimizer for network 1 plus a peer optimizer for
  network 2, built by the same `opt_func` and given the learner's hyper-parameters before every step: the same
  update for optimizers that treat each parameter on its own (SGD, Adam, AdamW, RMSprop...), not for ones that
  couple parameters (LAMB's or LARS's trust ratios are per tensor, so they are fine too; a global-norm rule is not).

They are written here because no maintained library offers them as callbacks of a training loop (the papers'
code is a standalone script).
"""
from __future__ import annotations

import copy
import math
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..callback import Callback, require_idx
from ..core import model_device, param_groups
from .distributed import DistributedCallback
from .mixup import MixHandler
from .precision import GradientAccumulation, GradientClipping, MixedPrecision

__all__ = ['CoTeaching', 'JoCoR', 'forget_rate_schedule']


def forget_rate_schedule(forget_rate: float, epoch: int, num_gradual: int = 10, exponent: float = 1.) -> float:
    """Forget rate at `epoch`: `linspace(0, forget_rate**exponent, num_gradual)[epoch]`, then `forget_rate`."""
    if epoch >= num_gradual: return forget_rate
    stop = forget_rate ** exponent
    if num_gradual == 1: return 0.  # linspace(0, stop, 1) is [0.]
    if epoch == num_gradual - 1: return stop  # numpy's linspace sets its endpoint exactly
    return epoch * (stop / (num_gradual - 1))  # numpy's linspace: arange(num) * (stop - 0) / (num - 1)


def kl_per_item(pred: torch.Tensor, soft_targets: torch.Tensor) -> torch.Tensor:
    """JoCoR's `kl_loss_compute(pred, soft_targets, False)`: KL(softmax(soft_targets)‖softmax(pred)) per item."""
    # The authors pass softmax(soft_targets) as the target: once a memorising network's softmax underflows to 0,
    # the gradient of p·log p through it is 0·(-inf) = NaN and both networks are lost (3 of 5 seeds of the MNIST
    # study at 40 % asymmetric noise). The same KL from log-probabilities has finite gradients everywhere.
    return F.kl_div(F.log_softmax(pred, dim=1), F.log_softmax(soft_targets, dim=1), reduction='none',
                    log_target=True).sum(1)


def _check_fraction(owner: str, name: str, value: Any, upper_inclusive: bool) -> float:
    ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not (0 <= value <= 1 if upper_inclusive else 0 <= value < 1):
        interval = '[0, 1]' if upper_inclusive else '[0, 1)'
        raise ValueError(f"{owner} {name} must be a number in {interval}, got {value!r}")
    return float(value)


class _PeerTraining(Callback):
    """What Co-teaching and JoCoR share: the peer network, its optimizer, the forget rate, the checks, the purity.

    A subclass implements `training_loss(pred, peer_pred, yb, n_keep)` (the loss the learner backpropagates;
    it sets `self._kept`, the batch positions of the kept items per selection) and `update_peer()`.
    """
    selections: tuple[str, ...] = ()  # names of the per-epoch pure ratios (one per selection of kept items)
    run_during_lr_find = False  # the finder restores the learner's model, not the peer: the peer stands aside

    def __init__(self, peer: nn.Module, forget_rate: float, num_gradual: int = 10, exponent: float = 1.,
                 clean: Any = None):
        owner = type(self).__name__
        if not isinstance(peer, nn.Module):
            raise TypeError(f"{owner} peer must be the second network (a torch.nn.Module built and initialised "
                            f"like the learner's model, with another seed), got {type(peer).__name__}")
        self.forget_rate = _check_fraction(owner, 'forget_rate', forget_rate, upper_inclusive=False)
        if isinstance(num_gradual, bool) or not isinstance(num_gradual, int) or num_gradual < 1:
            raise ValueError(f"{owner} num_gradual must be a positive int (epochs over which the forget rate "
                             f"rises to forget_rate), got {num_gradual!r}")
        if (isinstance(exponent, bool) or not isinstance(exponent, Real) or not math.isfinite(exponent)
                or exponent <= 0):
            raise ValueError(f"{owner} exponent must be a positive finite number, got {exponent!r}")
        self.peer, self.num_gradual, self.exponent = peer, num_gradual, float(exponent)
        self.clean = None if clean is None else self._check_clean(clean)
        self.peer_opt: torch.optim.Optimizer | None = None
        self.rate = 0.  # the forget rate of the current epoch
        self.history: list[dict] = []  # per training epoch with `clean`: the pure ratio of each selection
        self.peer_pred = self._kept = None
        self._for_opt = None  # the learner's optimizer the peer's was built next to
        self._pending_opt_state: dict | None = None
        self._modes: list | None = None
        self._checked = False
        self._clean_kept: torch.Tensor | None = None  # per selection, on the device: clean items kept this epoch
        self._n_kept = 0  # items kept per selection this epoch (a host int: the counts come from shapes)

    def _check_clean(self, clean: Any) -> torch.Tensor:
        owner = type(self).__name__
        mask = torch.as_tensor(clean)
        if mask.dtype != torch.bool or mask.ndim != 1:
            raise TypeError(f"{owner} clean must be a 1-D bool mask over the training set (True where the label "
                            f"is the true one, e.g. NoisyLabels' clean mask), got {mask.dtype} of shape "
                            f"{tuple(mask.shape)}")
        return mask

    # ---- checks and setup, before any step ------------------------------------------------------------
    def begin_fit(self) -> None:
        self._check_learner()
        if self.peer_opt is None or self._for_opt is not self.run.opt: self._build_peer_opt()
        device = model_device(self.run.model, torch.device('cpu'))
        self.peer.to(device)  # in place: the optimizer keeps the same parameters
        self._move_opt_state(device)
        self._modes = [(m, m.training) for m in self.peer.modules()]
        if self._pending_opt_state is not None:
            self.peer_opt.load_state_dict(self._pending_opt_state)
            self._pending_opt_state = None
        if self.clean is not None:
            self.clean = self.clean.to(device)
            counts = torch.zeros(len(self.selections), dtype=torch.int64, device=device)
            if self.run.position.batches_done > 0 and self._clean_kept is not None:  # inside an epoch: its counts so far
                counts.copy_(self._clean_kept)
            else:
                self._n_kept = 0
            self._clean_kept = counts
        self._checked = False

    def _check_learner(self) -> None:
        owner, learn = type(self).__name__, self.run
        if self.peer is learn.model:
            raise ValueError(f"{owner} peer is the learner's model: build a second network of the same architecture "
                             f"and initialise it with another seed")
        own = {id(p) for p in learn.model.parameters()}
        if any(id(p) in own for p in self.peer.parameters()):
            raise ValueError(f"{owner} peer shares parameters with the learner's model: the two networks must be "
                             f"separate (build the peer anew rather than reusing the model's layers)")
        for cls, why in ((MixedPrecision, 'its gradient scaler and autocast cover the learner\'s model only'),
                         (GradientAccumulation, 'it delays the learner\'s steps, not the peer\'s'),
                         (GradientClipping, 'it clips the learner\'s model\'s gradients only'),
                         (DistributedCallback, 'the peer is not wrapped in DistributedDataParallel'),
                         (MixHandler, 'the papers select items by their loss on the labels of unmixed batches')):
            found = learn.find_cb(cls)
            if found is not None:
                raise ValueError(f"{owner} cannot train with {type(found).__name__}: {why}; remove one of the two")
        if self.clean is not None:
            require_idx(self)  # the purity counts look the batch's items up in the mask
            dataset = getattr(learn.data.train_dl, 'dataset', None)
            n = len(dataset) if dataset is not None and hasattr(dataset, '__len__') else None
            if n is not None and len(self.clean) != n:
                raise ValueError(f"{owner} clean has {len(self.clean)} entries for a training set of {n} items: "
                                 f"give one flag per training item, in dataset order")
        self._check_smallest_batch()

    def _check_smallest_batch(self) -> None:
        # A batch keeps int((1 - rate)·bs) items: none at all would make a mean over no items (NaN).
        dl = self.run.data.train_dl
        bs, dataset = getattr(dl, 'batch_size', None), getattr(dl, 'dataset', None)
        if not isinstance(bs, int) or dataset is None or not hasattr(dataset, '__len__'): return
        n = len(dataset)
        last = n % bs
        smallest = bs if last == 0 or getattr(dl, 'drop_last', False) else last
        rate = max(forget_rate_schedule(self.forget_rate, e, self.num_gradual, self.exponent)
                   for e in range(self.run.position.epoch, self.run.epochs))
        if int((1 - rate) * smallest) == 0:
            raise ValueError(f"{type(self).__name__} would keep no item of a batch of {smallest} at forget rate "
                             f"{rate:g} (it keeps int((1 - rate)·batch size) items): use a larger batch size, "
                             f"drop_last=True, or a lower forget_rate")

    def _build_peer_opt(self) -> None:
        groups = param_groups(self.run.splitter, self.peer)
        opt = self.run.opt_func(groups, lr=self.run.lr)
        if len(opt.param_groups) != len(self.run.opt.param_groups):
            raise ValueError(f"{type(self).__name__}: the splitter gives the peer {len(opt.param_groups)} parameter "
                             f"groups and the learner's model {len(self.run.opt.param_groups)}; the peer follows "
                             f"the learner's hyper-parameters group by group, so it needs as many")
        self.peer_opt, self._for_opt = opt, self.run.opt

    def _move_opt_state(self, device: torch.device) -> None:
        for state in self.peer_opt.state.values():
            for k, v in state.items():
                if isinstance(v, torch.Tensor) and k != 'step' and v.device != device: state[k] = v.to(device)

    # ---- the batch -------------------------------------------------------------------------------------------
    def begin_epoch(self) -> None:
        self.rate = forget_rate_schedule(self.forget_rate, self.run.epoch, self.num_gradual, self.exponent)
        self.peer.train()

    def n_keep(self, n: int) -> int:
        """How many items of a batch of `n` are kept at the current forget rate (the authors' `num_remember`)."""
        return int((1 - self.rate) * n)

    def after_pred(self) -> None:
        # Both networks' forward passes come before either network's update, as in the authors' loops.
        if not self.run.in_train: return
        self.peer_pred = self.peer(self.run.xb)
        if not self._checked: self._check_batch(self.run.pred, self.peer_pred, self.run.yb)

    def _check_batch(self, pred: Any, peer_pred: Any, yb: Any) -> None:
        owner = type(self).__name__
        self._checked = True
        if not isinstance(pred, torch.Tensor) or pred.ndim != 2:
            raise TypeError(f"{owner} needs the model's outputs as class scores of shape (N, C), got "
                            f"{getattr(pred, 'shape', type(pred).__name__)}")
        if not isinstance(peer_pred, torch.Tensor) or peer_pred.shape != pred.shape:
            raise ValueError(f"{owner}: the peer's outputs have shape {tuple(getattr(peer_pred, 'shape', ()))}, the "
                             f"learner's model's {tuple(pred.shape)}: the peer must be a network of the same task "
                             f"(same number of classes)")
        if (not isinstance(yb, torch.Tensor) or yb.ndim != 1 or yb.shape[0] != pred.shape[0]
                or yb.dtype not in (torch.int64, torch.int32, torch.uint8, torch.int16, torch.int8)):
            raise TypeError(f"{owner} ranks items by their cross entropy on class-index targets of shape (N,), got "
                            f"{getattr(yb, 'dtype', type(yb).__name__)} of shape "
                            f"{tuple(getattr(yb, 'shape', ()))}")

    def after_loss(self) -> None:
        if not self.run.in_train: return
        pred, yb = self.run.pred, self.run.yb
        yb = yb if yb.dtype == torch.int64 else yb.long()
        n_keep = self.n_keep(pred.shape[0])
        if n_keep == 0:
            raise ValueError(f"{type(self).__name__} keeps no item of this batch of {pred.shape[0]} at forget rate "
                             f"{self.rate:g}: use a larger batch size, drop_last=True, or a lower forget_rate")
        self.run.loss = self.training_loss(pred, self.peer_pred, yb, n_keep)
        if self.clean is not None: self._count_clean(n_keep)

    def _count_clean(self, n_keep: int) -> None:
        clean = self.clean[self.run.idx.to(self.clean.device)]  # a no-op where the batch is on the model's device
        self._clean_kept += torch.stack([clean[kept].sum() for kept in self._kept])
        self._n_kept += n_keep

    def training_loss(self, pred: torch.Tensor, peer_pred: torch.Tensor, yb: torch.Tensor,
                      n_keep: int) -> torch.Tensor:
        """The loss the learner backpropagates; sets `self._kept` (batch positions kept, per selection)."""
        raise NotImplementedError(f"{type(self).__name__} must implement training_loss")

    def update_peer(self) -> None:
        """The peer's update, after the learner's step."""
        raise NotImplementedError(f"{type(self).__name__} must implement update_peer")

    def after_step(self) -> None:
        if not self.run.in_train: return
        self._follow_learner_hypers()
        self.update_peer()
        self.peer_opt.zero_grad()

    def _follow_learner_hypers(self) -> None:
        # The learner's step just used these (schedulers set them at begin_batch): the peer's step uses the same.
        for mine, theirs in zip(self.peer_opt.param_groups, self.run.opt.param_groups):
            for key, value in theirs.items():
                if key == 'params': continue
                if isinstance(value, torch.Tensor) and isinstance(mine.get(key), torch.Tensor): mine[key].copy_(value)
                else: mine[key] = value

    def after_batch(self) -> None:
        self.peer_pred = self._kept = None  # free the peer's graph

    def after_epoch(self) -> None:
        if self.clean is None or self._n_kept == 0: return
        ratios = (self._clean_kept.double() / self._n_kept).tolist()  # one host read per epoch
        self.history.append({'epoch': self.run.epoch, **dict(zip(self.selections, ratios))})
        self._clean_kept.zero_()
        self._n_kept = 0

    def after_fit(self) -> None:
        self.peer_pred = self._kept = None
        if self._modes is None: return  # begin_fit never ran
        for module, training in self._modes: module.training = training
        self._modes = None

    # ---- checkpoints -------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The peer's weights and optimizer state, and this epoch's purity counts, for an exact resume."""
        opt_state = self.peer_opt.state_dict() if self.peer_opt is not None else self._pending_opt_state
        return {'peer': {k: v.detach().clone() for k, v in self.peer.state_dict().items()},
                'peer_opt': copy.deepcopy(opt_state),
                'clean_kept': None if self._clean_kept is None else self._clean_kept.detach().cpu().clone(),
                'n_kept': self._n_kept, 'history': copy.deepcopy(self.history)}

    def load_state_dict(self, state: dict) -> None:
        owner, peer_state = type(self).__name__, state['peer']
        mine = self.peer.state_dict()
        if peer_state.keys() != mine.keys():
            raise ValueError(f"{owner}: the checkpoint's peer has other weights than this peer (missing "
                             f"{sorted(mine.keys() - peer_state.keys())[:5]}, unexpected "
                             f"{sorted(peer_state.keys() - mine.keys())[:5]})")
        wrong = [k for k, v in peer_state.items() if v.shape != mine[k].shape]
        if wrong:
            raise ValueError(f"{owner}: the checkpoint's peer weights {wrong[:5]} have other shapes than this peer's")
        if state['peer_opt'] is not None and self.peer_opt is not None:
            self.peer_opt.load_state_dict(state['peer_opt'])  # checks the groups before changing anything
        self.peer.load_state_dict(peer_state)
        self._pending_opt_state = copy.deepcopy(state['peer_opt'])  # for a peer optimizer built at begin_fit
        kept = state['clean_kept']
        self._clean_kept = None if kept is None else kept.clone()  # moved to the device at begin_fit
        self._n_kept, self.history = int(state['n_kept']), copy.deepcopy(state['history'])


class CoTeaching(_PeerTraining):
    """Co-teaching (Han et al. 2018): each network learns from the items its peer finds the smallest-loss ones.

    `peer` is the second network, built and initialised by you (another seed); the learner's model is the
    first. At epoch e (0-based) the forget rate is `forget_rate_schedule(forget_rate, e, num_gradual, exponent)`
    and each training batch of n items keeps `int((1 − rate)·n)`. Per batch: both networks' forward passes, the
    per-item cross entropy of each; the learner's model is updated (by the learner: its loss is
    `learn.loss`) on the mean cross entropy over the items the peer ranks smallest, then the peer, with its own
    optimizer (`learn.opt_func` with the learner's hyper-parameters before every step, so it follows one-cycle
    and ParamScheduler), on the items the learner's model ranks smallest. Unlike the authors' `loss_coteaching`
    the mean is not divided by the kept count once more (their issue #9).

    Validation, metrics, `get_preds` and export use the learner's model alone; `learn.co_teaching.peer` is the
    trained peer; checkpoints hold its weights and optimizer. With `clean` (a bool mask over the training set,
    True where the label is right; needs `learn.idx`) `history` gets, per epoch, the label precision of the
    kept items ("pure ratio"): `pure_ratio_1` of the items the learner's model selected (the peer's update),
    `pure_ratio_2` of the peer's selection. Cross entropy is the papers' criterion whatever `learn.loss_func`
    (which the validation loss still uses).
    """
    selections = ('pure_ratio_1', 'pure_ratio_2')

    def __init__(self, peer: nn.Module, forget_rate: float, num_gradual: int = 10, exponent: float = 1.,
                 clean: Any = None):
        super().__init__(peer, forget_rate, num_gradual, exponent, clean)
        self.peer_loss: torch.Tensor | None = None

    def training_loss(self, pred: torch.Tensor, peer_pred: torch.Tensor, yb: torch.Tensor,
                      n_keep: int) -> torch.Tensor:
        kept_1 = torch.argsort(F.cross_entropy(pred.detach(), yb, reduction='none'))[:n_keep]
        kept_2 = torch.argsort(F.cross_entropy(peer_pred.detach(), yb, reduction='none'))[:n_keep]
        self._kept = (kept_1, kept_2)
        self.peer_loss = F.cross_entropy(peer_pred[kept_1], yb[kept_1])  # exchange: each learns from the other's pick
        return F.cross_entropy(pred[kept_2], yb[kept_2])

    def update_peer(self) -> None:
        self.peer_opt.zero_grad()
        self.peer_loss.backward()
        self.peer_opt.step()

    def after_batch(self) -> None:
        super().after_batch()
        self.peer_loss = None

    def after_fit(self) -> None:
        super().after_fit()
        self.peer_loss = None


class JoCoR(_PeerTraining):
    """JoCoR (Wei et al. 2020): both networks updated together on the small-loss items of a joint loss.

    Per item: (1 − λ)·(CE₁ + CE₂) + λ·(KL(p₂‖p₁) + KL(p₁‖p₂)), p the softmax of each network, and
    gradients through both (the authors' `loss_jocor` with `kl_loss_compute`); the loss is the mean over the
    `int((1 − rate)·n)` smallest, one backward through both networks, then one step of both: the learner's
    optimizer for its model, and the peer's optimizer (`learn.opt_func`, given the learner's hyper-parameters
    before every step) for the peer: together the authors' one optimizer over both networks' parameters for
    optimizers that update each parameter on its own (SGD, Adam...). `λ` is `co_lambda`; `peer`, the forget
    rate, validation, checkpoints and `clean` (one `pure_ratio` per epoch) as in `CoTeaching`.
    """
    selections = ('pure_ratio',)

    def __init__(self, peer: nn.Module, forget_rate: float, co_lambda: float = 0.1, num_gradual: int = 10,
                 exponent: float = 1., clean: Any = None):
        super().__init__(peer, forget_rate, num_gradual, exponent, clean)
        self.co_lambda = _check_fraction('JoCoR', 'co_lambda', co_lambda, upper_inclusive=True)

    @property
    def name(self) -> str:
        """`jocor`, the learner attribute this callback appears as."""
        return 'jocor'

    def training_loss(self, pred: torch.Tensor, peer_pred: torch.Tensor, yb: torch.Tensor,
                      n_keep: int) -> torch.Tensor:
        lam = self.co_lambda
        loss_1 = F.cross_entropy(pred, yb, reduction='none') * (1 - lam)
        loss_2 = F.cross_entropy(peer_pred, yb, reduction='none') * (1 - lam)
        per_item = loss_1 + loss_2 + lam * kl_per_item(pred, peer_pred) + lam * kl_per_item(peer_pred, pred)
        kept = torch.argsort(per_item.detach())[:n_keep]
        self._kept = (kept,)
        return per_item[kept].mean()

    def update_peer(self) -> None:
        self.peer_opt.step()  # the learner's backward of the joint loss filled the peer's gradients too
