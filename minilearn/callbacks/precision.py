"""Mixed precision, gradient clipping, gradient accumulation and torch.compile as callbacks."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..callback import Callback, CancelBatchException, Order
from ..core import batch_size, check_positive, model_device

__all__ = ['MixedPrecision', 'GradientClipping', 'GradientAccumulation', 'Compile']


def _to_float32(o: Any) -> Any:
    """Floating tensors (possibly nested in tuples, lists and dicts) converted to float32."""
    if isinstance(o, torch.Tensor): return o.float() if o.is_floating_point() and o.dtype != torch.float32 else o
    if isinstance(o, (list, tuple)):
        converted = [_to_float32(x) for x in o]
        return type(o)(*converted) if hasattr(o, '_fields') else type(o)(converted)
    if isinstance(o, dict): return {k: _to_float32(v) for k, v in o.items()}
    return o


def _grad_scaler(device_type: str, init_scale: float) -> torch.amp.GradScaler:
    if hasattr(torch.amp, 'GradScaler'): return torch.amp.GradScaler(device_type, init_scale=init_scale)
    return torch.cuda.amp.GradScaler(init_scale=init_scale)  # torch < 2.3: CUDA only


def _trained_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in opt.param_groups for p in group['params']]


class MixedPrecision(Callback):
    """Run the forward pass under autocast; with float16, scale the loss with a `torch.amp.GradScaler`.

    `dtype=None` follows the model's device at `begin_fit`: float16 with a GradScaler on CUDA, bfloat16
    (no scaler needed) elsewhere. Autocast covers `begin_batch` to `after_pred`; the prediction is then
    converted to float32, so the loss, metrics and callbacks after it work in float32 and `run.loss` is the
    real, unscaled loss. As in PyTorch, a step whose gradients hold inf/NaN is skipped and the scale
    lowered; `n_skipped` counts those steps (kept on the device, read only when asked). PyTorch's
    GradScaler reads its inf flag on the host at each step unless the optimizer is fused
    (e.g. `opt_func=partial(torch.optim.SGD, fused=True)` on CUDA).
    """
    _order = Order.MIXED_PRECISION

    def __init__(self, dtype: torch.dtype | None = None, init_scale: float = 2. ** 16):
        if dtype not in (None, torch.float16, torch.bfloat16):
            raise ValueError(f"MixedPrecision dtype must be torch.float16, torch.bfloat16 or None (follow the "
                             f"device), got {dtype!r}")
        self.dtype, self.init_scale = dtype, init_scale
        self.autocast = self.scaler = self._scaler_device = self._skipped = self._pending_state = None
        self._entered = self._fitting = False

    def begin_fit(self) -> None:
        device = model_device(self.run.model, torch.device('cpu'))
        dtype = self.dtype or (torch.float16 if device.type == 'cuda' else torch.bfloat16)
        self.device_type, self.used_dtype = device.type, dtype
        self.autocast = torch.autocast(device.type, dtype=dtype)
        self.old_scaler, self._fitting = self.run.grad_scaler, True
        if dtype != torch.float16: return
        if self.scaler is None or self._scaler_device != device.type:  # kept across fits: the scale carries over
            self.scaler, self._scaler_device = _grad_scaler(device.type, self.init_scale), device.type
            if self._pending_state is not None: self.scaler.load_state_dict(self._pending_state)
            self._pending_state = None
        if self._skipped is None or self._skipped.device != device:
            self._skipped = torch.zeros((), dtype=torch.int64, device=device)
        self._scale_before = torch.full((), self.scaler.get_scale(), device=device)  # one host read per fit
        self.run.grad_scaler = self.scaler

    def begin_batch(self) -> None:
        self._exit_autocast()  # a batch interrupted without after_pred must not leave autocast nested
        self.autocast.__enter__()
        self._entered = True

    def after_pred(self) -> None:
        self._exit_autocast()
        self.run.pred = _to_float32(self.run.pred)

    def after_cancel_batch(self) -> None:
        self._exit_autocast()

    def after_step(self) -> None:
        if self.scaler is None or self.run.grad_scaler is not self.scaler or self.scaler._scale is None: return
        scale = self.scaler._scale  # on the device: GradScaler.get_scale() would read it on the host
        self._skipped += scale < self._scale_before  # update() lowers the scale only after inf/NaN gradients
        self._scale_before = scale.clone()

    def after_fit(self) -> None:
        self._exit_autocast()
        if not self._fitting: return  # begin_fit never ran
        self._fitting = False
        self.run.grad_scaler = self.old_scaler

    def _exit_autocast(self) -> None:
        if self._entered:
            self._entered = False
            self.autocast.__exit__(None, None, None)

    @property
    def n_skipped(self) -> int:
        """Optimizer steps skipped because of inf/NaN gradients (float16 with a GradScaler); reads the device."""
        return 0 if self._skipped is None else int(self._skipped)

    def state_dict(self) -> dict:
        """The GradScaler's state (scale, growth tracker) for exact resume; empty without a scaler."""
        if self.scaler is not None: return {'scaler': self.scaler.state_dict()}
        return {'scaler': self._pending_state} if self._pending_state is not None else {}

    def load_state_dict(self, state: dict) -> None:
        scaler_state = state.get('scaler')
        if scaler_state is None: return
        if self.scaler is not None: self.scaler.load_state_dict(scaler_state)
        else: self._pending_state = dict(scaler_state)  # the scaler is built at begin_fit, on the model's device


class GradientClipping(Callback):
    """Clip the gradients' total norm to `max_norm` before each optimizer step (`None` turns it off).

    With a GradScaler (float16 MixedPrecision) the gradients are unscaled first, so `max_norm` applies to
    the true gradients. No host read: the clip factor stays on the device.
    """

    def __init__(self, max_norm: float | None = 1., norm_type: float = 2.):
        if max_norm is not None: check_positive('GradientClipping max_norm', max_norm)
        check_positive('GradientClipping norm_type', norm_type)
        self.max_norm, self.norm_type = max_norm, norm_type

    @property
    def clip(self) -> float | None:
        """The course's name for `max_norm`."""
        return self.max_norm

    def after_backward(self) -> None:
        if self.max_norm is None: return
        if self.run.grad_scaler is not None: self.run.grad_scaler.unscale_(self.run.opt)
        nn.utils.clip_grad_norm_(_trained_params(self.run.opt), self.max_norm, norm_type=self.norm_type)


class GradientAccumulation(Callback):
    """Accumulate gradients over `n_acc` training batches and step once, as with an `n_acc`× larger batch.

    Gradients are averaged over the items of the accumulated batches (each batch weighted by its size,
    assuming the loss is a mean over items, the default), so with equal batches the step equals one on a
    batch `n_acc` times larger. The optimizer also steps on the last batch of each epoch: the leftover
    batches (fewer than `n_acc`) are averaged over their own items, exactly like the smaller last batch of
    a DataLoader with the larger batch size. Between steps it cancels the rest of the batch after
    `after_backward` (`after_batch` still runs), so it runs before GradientClipping and other
    `after_backward` callbacks, which then only see complete gradients. Under DistributedDataParallel the
    batches between steps run in `no_sync()`, so gradients are all-reduced once per step.
    """
    _order = Order.GRADIENT_ACCUMULATION

    def __init__(self, n_acc: int = 2):
        if isinstance(n_acc, bool) or not isinstance(n_acc, int) or n_acc < 1:
            raise ValueError(f"GradientAccumulation n_acc must be a positive int (batches per step), got {n_acc!r}")
        self.n_acc = n_acc
        self._reset()
        self._opt = self._ddp = self._no_sync = None

    def _reset(self) -> None:
        self.n_batches, self.n_items, self.last_bs, self._undo = 0, 0, None, None

    def _steps_at(self, n_batches: int) -> bool:
        return n_batches >= self.n_acc or self.run.iter + 1 >= self.run.iters

    def begin_fit(self) -> None:
        self._reset()
        self._opt = self.run.opt  # the learner drops an optimizer that never stepped when fit fails
        self._ddp = self.run.model if hasattr(self.run.model, 'no_sync') else None  # after DistributedCallback
        self._no_sync = None

    def begin_batch(self) -> None:
        if self._ddp is not None and self.run.in_train and not self._steps_at(self.n_batches + 1):
            self._no_sync = self._ddp.no_sync()  # no all-reduce in this batch's backward pass
            self._no_sync.__enter__()

    def begin_epoch(self) -> None:
        if self.n_batches: self.run.opt.zero_grad()  # an epoch cut short left partial gradients behind
        self._reset()

    def after_loss(self) -> None:
        if not self.run.in_train: return
        bs = batch_size(self.run.xb, self.run.yb)
        self._undo = (self.n_batches, self.n_items, self.last_bs)
        # The stored gradients are kept as (sum of size-weighted batch gradients) / current batch size,
        # so adding this batch's mean-loss gradient weights it by its size; equal sizes need no work.
        if self.n_batches and bs != self.last_bs: self._scale_grads(self.last_bs / bs)
        self.n_batches, self.n_items, self.last_bs = self.n_batches + 1, self.n_items + bs, bs

    def after_backward(self) -> None:
        self._undo = None
        self._leave_no_sync()
        if not self._steps_at(self.n_batches): raise CancelBatchException()
        self._scale_grads(self.last_bs / self.n_items)
        self._reset()

    def _leave_no_sync(self) -> None:
        if self._no_sync is not None:
            self._no_sync.__exit__(None, None, None)
            self._no_sync = None

    def after_cancel_batch(self) -> None:
        self._leave_no_sync()
        if self._undo is None: return
        # Cancelled between the loss and the backward pass: this batch added no gradient, forget it.
        bs = self.last_bs
        self.n_batches, self.n_items, self.last_bs = self._undo
        if self.n_batches and bs != self.last_bs: self._scale_grads(bs / self.last_bs)
        self._undo = None

    def after_fit(self) -> None:
        self._leave_no_sync()
        if self.n_batches: self._opt.zero_grad()  # stopped mid-accumulation
        self._reset()
        self._opt = self._ddp = None

    def _scale_grads(self, factor: float) -> None:
        if factor == 1: return
        grads = [p.grad for p in _trained_params(self.run.opt) if p.grad is not None]
        if grads: torch._foreach_mul_(grads, factor)


class Compile(Callback):
    """Train a `torch.compile`d version of the model; the original module is restored at `after_fit`.

    Keyword arguments go to `torch.compile` (`mode`, `backend`, `dynamic`, ...). The compiled module shares
    the original's parameters, so the optimizer and checkpoints are unaffected. Compilation happens on the
    first batch (seconds to minutes) and again when input shapes change.
    """
    _order = Order.COMPILE

    def __init__(self, **compile_kwargs: Any):
        self.compile_kwargs = compile_kwargs
        self.original = self.compiled = None

    def begin_fit(self) -> None:
        self.original = self.run.model
        self.compiled = torch.compile(self.original, **self.compile_kwargs)
        self.run.model = self.compiled

    def after_fit(self) -> None:
        # Only if the learner still holds the compiled model: a user may have replaced it. (after_fit runs in
        # reverse _order, so DistributedCallback unwraps its DDP model after this.)
        if self.compiled is not None and self.run.model is self.compiled: self.run.model = self.original
        self.original = self.compiled = None
