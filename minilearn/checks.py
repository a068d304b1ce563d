"""Pre-flight checks: catch data/model/loss mismatches on the first batch, in plain words."""
from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .core import callable_name, unwrap_loss
from .data.core import Dataset
from .data.items import LabeledData

__all__ = ['is_class_index_loss', 'is_elementwise_loss', 'check_batch', 'check_dataset_targets']

_CLASS_INDEX_FUNCS = (F.cross_entropy, F.nll_loss)
_CLASS_INDEX_MODULES = (nn.CrossEntropyLoss, nn.NLLLoss)
# Losses comparing prediction and target element by element: torch only warns, then broadcasts, when the
# shapes differ.
_ELEMENTWISE_FUNCS = (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss)
_ELEMENTWISE_MODULES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss)


def is_class_index_loss(loss_func: Any) -> bool:
    """True for losses that take (N, C, ...) scores and (N, ...) integer class indices."""
    loss_func = unwrap_loss(loss_func)
    if isinstance(loss_func, functools.partial): loss_func = loss_func.func
    return (loss_func in _CLASS_INDEX_FUNCS or isinstance(loss_func, _CLASS_INDEX_MODULES)
            or getattr(loss_func, 'class_index_targets', False) is True)


def is_elementwise_loss(loss_func: Any) -> bool:
    """True for losses that compare prediction and target element by element (MSE, L1, smooth L1, Huber)."""
    loss_func = unwrap_loss(loss_func)
    if isinstance(loss_func, functools.partial): loss_func = loss_func.func
    return loss_func in _ELEMENTWISE_FUNCS or isinstance(loss_func, _ELEMENTWISE_MODULES)


def _check_elementwise(pred: torch.Tensor, yb: torch.Tensor, name: str) -> None:
    if yb.shape == pred.shape: return
    shapes = f"target shape {tuple(yb.shape)} does not match the model output {tuple(pred.shape)}"
    if not yb.is_floating_point() and pred.ndim >= 2 and tuple(yb.shape) == (pred.shape[0],) + tuple(pred.shape[2:]):
        raise ValueError(f"{shapes}: {name} compares them element by element, and these targets look like class "
                         f"indices. For classification use F.cross_entropy (or LabelSmoothingCrossEntropy); to "
                         f"regress on one-hot targets, give {name} F.one_hot(yb, {pred.shape[1]}).float()")
    if yb.numel() == pred.numel():
        per_item = ', '.join(str(d) for d in pred.shape[1:])
        raise ValueError(f"{shapes}: {name} compares them element by element and would broadcast them instead. "
                         f"Give the targets the output's shape (yb.view(-1, {per_item}), in the dataset or a "
                         f"transform), or reshape the model output")
    raise ValueError(f"{shapes}: {name} compares them element by element; give the targets the output's shape, "
                     f"or make the model output {tuple(yb.shape[1:]) or 'one value'} per item")


def _loss_name(loss_func: Any) -> str:
    return callable_name(unwrap_loss(loss_func))


def check_batch(pred: Any, yb: Any, loss_func: Any) -> None:
    """Raise a clear error when targets cannot go with this model output and loss (reads the batch once)."""
    if not (isinstance(pred, torch.Tensor) and isinstance(yb, torch.Tensor)): return
    if is_elementwise_loss(loss_func): return _check_elementwise(pred, yb, _loss_name(loss_func))
    if not is_class_index_loss(loss_func): return
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
    _check_range(yb, n_classes, ignore_index, where='')


def _check_range(targets: torch.Tensor, n_classes: int, ignore_index: int, where: str) -> None:
    counted = targets[targets != ignore_index]
    if counted.numel() == 0: return
    low, high = int(counted.min()), int(counted.max())
    if low < 0:
        raise ValueError(f"target class index {low}{where} is negative; class indices must lie in [0, {n_classes}) "
                         f"(ignore_index={ignore_index} excepted)")
    if high >= n_classes:
        raise ValueError(f"target class index {high}{where} is out of range for a model with {n_classes} outputs: "
                         f"indices must lie in [0, {n_classes}). Give the last layer at least {high + 1} outputs "
                         f"(data.c_out) or fix the labels")


def _stored_targets(dataset: Any) -> torch.Tensor | None:
    """The class indices a dataset keeps in memory, for datasets known to return them unchanged, else None.

    minilearn's Dataset (`y`) and labelled item lists (`y.items`), torchvision's datasets (`targets`) without
    a target transform; any other dataset (or a subclass with its own `__getitem__`) may map its labels.
    """
    getitem = type(dataset).__getitem__ if dataset is not None else None
    if isinstance(dataset, Dataset) and getitem is Dataset.__getitem__: targets = dataset.y
    elif isinstance(dataset, LabeledData) and getitem is LabeledData.__getitem__ and not getattr(dataset.y, 'tfms', 1):
        targets = getattr(dataset.y, 'items', None)
    elif type(dataset).__module__.startswith('torchvision.datasets') and getattr(dataset, 'target_transform',
                                                                                  None) is None:
        targets = getattr(dataset, 'targets', None)
    else:
        return None
    try:
        targets = torch.as_tensor(targets)
    except (TypeError, ValueError, RuntimeError):  # strings, nested lists: not class indices
        return None
    usable = (targets.ndim == 1 and not targets.is_floating_point() and not targets.is_complex()
              and targets.dtype != torch.bool and len(targets) == len(dataset))
    return targets if usable else None


def check_dataset_targets(data: Any, pred: Any, yb: Any, loss_func: Any) -> None:
    """For classification (N, C) outputs, check every stored label of the training and validation sets at once."""
    if not (isinstance(pred, torch.Tensor) and isinstance(yb, torch.Tensor) and pred.ndim == 2 and yb.ndim == 1
            and not yb.is_floating_point() and is_class_index_loss(loss_func)):
        return
    ignore_index = getattr(unwrap_loss(loss_func), 'ignore_index', -100)
    for attr, name in (('train_dl', 'training'), ('valid_dl', 'validation')):
        targets = _stored_targets(getattr(getattr(data, attr, None), 'dataset', None))
        if targets is not None: _check_range(targets, pred.shape[1], ignore_index, where=f' (in the {name} set)')
