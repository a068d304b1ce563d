"""Put the model and every batch on a device, and in the channels-last memory format."""
from __future__ import annotations

import warnings

import torch

from torch import nn

from ..core import to_device, unwrap_loss
from ..callback import Callback, Order

__all__ = ['DeviceCallback', 'CudaCallback', 'default_device', 'ChannelsLast']


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


class DeviceCallback(Callback):
    """Move the model (and optimizer state) at `begin_fit` and each batch at `begin_batch` to the fit's device.

    That is `device`, unless the learner's `fit_device` is already set when the fit begins (DistributedCallback,
    which runs first, sets this process's device there); `begin_fit` sets `fit_device`, `after_fit` restores it.
    Outside a fit (prediction) batches go to `device`.
    """
    _order = Order.DEVICE
    for_inference = True

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self._before: list | None = None  # during a fit: the learner's fit_device before it, restored after

    def begin_fit(self) -> None:
        self._before = [self.run.fit_device]
        if self.run.fit_device is None: self.run.fit_device = self.device
        device = self.run.fit_device
        self.run.model.to(device)
        loss_module = unwrap_loss(self.run.loss_func)
        if isinstance(loss_module, nn.Module): loss_module.to(device)  # class weights etc., moved once
        opt = self.run.opt
        if opt is not None:  # state loaded from a checkpoint may still be on another device
            for state in opt.state.values():
                for k, v in state.items():
                    if isinstance(v, torch.Tensor) and k != 'step': state[k] = v.to(device)

    def begin_batch(self) -> None:
        device = self.device if self.run.fit_device is None else self.run.fit_device
        self.run.xb = to_device(self.run.xb, device)
        self.run.yb = to_device(self.run.yb, device)
        idx = getattr(self.run, 'idx', None)  # the items' indices follow the batch (per-item state lives there)
        if idx is not None: self.run.idx = to_device(idx, device)

    def after_fit(self) -> None:
        if self._before is None: return  # begin_fit did not run
        self.run.fit_device, self._before = self._before[0], None


class CudaCallback(DeviceCallback):
    """The course's CudaCallback: CUDA, or (with a warning) the CPU where CUDA is missing."""

    def __init__(self) -> None:
        if not torch.cuda.is_available():
            warnings.warn("CudaCallback: CUDA is not available, training on the CPU", stacklevel=2)
        super().__init__()


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.ndim == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


class ChannelsLast(Callback):
    """The model's 4-D weights and every 4-D batch in `torch.channels_last` during the fit (faster convolutions
    on most CPUs and on tensor-core GPUs); `after_fit` gives each weight back its memory format.

    Batches that are not 4-D pass unchanged, with one warning per fit.
    """
    _order = Order.CHANNELS_LAST

    def __init__(self) -> None:
        self.saved: list | None = None
        self.saved_buffers: list = []
        self.warned = False

    def begin_fit(self) -> None:
        self.warned = False
        model = self.run.model
        # Parameters are converted in place; buffers are replaced by new tensors, so they are kept by name.
        self.saved = [(p, _memory_format(p)) for p in model.parameters() if p.ndim == 4]
        self.saved_buffers = [(module, name, _memory_format(b)) for module in model.modules()
                              for name, b in module.named_buffers(recurse=False) if b.ndim == 4]
        model.to(memory_format=torch.channels_last)

    def begin_batch(self) -> None:
        xb = self.run.xb
        if isinstance(xb, torch.Tensor) and xb.ndim == 4:
            self.run.xb = xb.contiguous(memory_format=torch.channels_last)
        elif not self.warned:
            self.warned = True
            shape = tuple(xb.shape) if isinstance(xb, torch.Tensor) else type(xb).__name__
            warnings.warn(f"ChannelsLast: the inputs are not (N, C, H, W) image batches (got {shape}); they are "
                          f"left as they are, and ChannelsLast does nothing for this model", stacklevel=2)

    def after_fit(self) -> None:
        if self.saved is None: return
        saved, self.saved = self.saved, None
        with torch.no_grad():
            for t, fmt in saved:
                if _memory_format(t) != fmt: t.data = t.data.contiguous(memory_format=fmt)
                if t.grad is not None and _memory_format(t.grad) != fmt:
                    t.grad = t.grad.contiguous(memory_format=fmt)
            for module, name, fmt in self.saved_buffers:
                buffer = getattr(module, name)
                if _memory_format(buffer) != fmt: setattr(module, name, buffer.contiguous(memory_format=fmt))
        self.saved_buffers = []
