"""Pre-flight checks: catch data/model/loss mismatches on the first batch, in plain words."""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .core import unwrap_loss

__all__ = ['is_class_index_loss', 'check_batch']

_CLASS_INDEX_FUNCS = (F.cross_entropy, F.nll_loss)
_CLASS_INDEX_MODULES = (nn.CrossEntropyLoss, nn.NLLLoss)


def is_class_index_loss(loss_func: Any) -> bool:
    """True for losses that take (N, C, ...) scores and (N, ...) integer class indices."""
    loss_func = unwrap_loss(loss_func)
    if isinstance(loss_func, functools.partial): loss_func = loss_func.func
    return (loss_func in _CLASS_INDEX_FUNCS or isinstance(loss_func, _CLASS_INDEX_MODULES)
            or getattr(loss_func, 'class_index_targets', False) is True)


def _loss_name(loss_func: Any) -> str:
    loss_func = unwrap_loss(loss_func)
    return getattr(loss_func, '__name__', None) or type(loss_func).__name__


def check_batch(pred: Any, yb: Any, loss_func: Any) -> None:
    """Raise a clear error when targets cannot go with this model output and loss (reads the batch once)."""
    if not (isinstance(pred, torch.Tensor) and isinstance(yb, torch.Tensor) and is_class_index_loss(loss_func)):
        return
    name = _loss_name(loss_func)
    if pred.ndim < 2:
        raise ValueError(f"{name} needs model outputs of shape (N, C, ...) with one score per class; the model "
                         f"returned shape {tuple(pred.shape)}. Does the last layer output the number of classes?")
    if yb.is_floating_point():
        if yb.shape == pred.shape: return  # per-class probabilities (soft targets) are allowed
        raise TypeError(f"float targets (dtype {yb.dtype}, shape {tuple(yb.shape)}) given to the class-index loss "
                        f"{name}: class indices must be integers (yb.long(), or label with a CategoryProcessor), "
                        f"or per-class probabilities of the output's shape {tuple(pred.shape)}")
    expected = (pred.shape[0],) + tuple(pred.shape[2:])
    if tuple(yb.shape) != expected:
        raise ValueError(f"target shape {tuple(yb.shape)} does not match the model output {tuple(pred.shape)}: "
                         f"{name} expects class indices of shape {expected}")
    n_classes = pred.shape[1]
    ignore_index = getattr(unwrap_loss(loss_func), 'ignore_index', -100)
    counted = yb[yb != ignore_index]
    if counted.numel() == 0: return
    low, high = int(counted.min()), int(counted.max())
    if low < 0:
        raise ValueError(f"target class index {low} is negative; class indices must lie in [0, {n_classes}) "
                         f"(ignore_index={ignore_index} excepted)")
    if high >= n_classes:
        raise ValueError(f"target class index {high} is out of range for a model with {n_classes} outputs: "
                         f"indices must lie in [0, {n_classes}). Give the last layer at least {high + 1} outputs "
                         f"(data.c_out) or fix the labels")
