"""Put the model and every batch on a device."""
from __future__ import annotations

import warnings

import torch

from torch import nn

from ..core import to_device, unwrap_loss
from ..callback import Callback, Order

__all__ = ['DeviceCallback', 'CudaCallback', 'default_device']


def default_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


class DeviceCallback(Callback):
    """Move the model (and optimizer state) at `begin_fit` and each batch at `begin_batch` to `device`."""
    _order = Order.DEVICE
    for_inference = True

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else default_device()

    def begin_fit(self) -> None:
        self.run.model.to(self.device)
        loss_module = unwrap_loss(self.run.loss_func)
        if isinstance(loss_module, nn.Module): loss_module.to(self.device)  # class weights etc., moved once
        opt = self.run.opt
        if opt is not None:  # state loaded from a checkpoint may still be on another device
            for state in opt.state.values():
                for k, v in state.items():
                    if isinstance(v, torch.Tensor) and k != 'step': state[k] = v.to(self.device)

    def begin_batch(self) -> None:
        self.run.xb = to_device(self.run.xb, self.device)
        self.run.yb = to_device(self.run.yb, self.device)


class CudaCallback(DeviceCallback):
    """The course's CudaCallback: CUDA, or (with a warning) the CPU where CUDA is missing."""

    def __init__(self) -> None:
        if not torch.cuda.is_available():
            warnings.warn("CudaCallback: CUDA is not available, training on the CPU", stacklevel=2)
        super().__init__()
