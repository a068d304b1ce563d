"""Freezing parameter groups for transfer learning: `freeze_to(learn, n)` as fastai v2 does it.

Matched to fastai's `Learner.freeze_to` and `_BaseOptimizer.freeze_to` (fastai/learner.py, fastai/optimizer.py):
the groups are the optimizer's (the learner's splitter's; the optimizer is built first when there is none yet);
`freeze_to(n)` stops the groups before index `n` from training (`n=-1`: all but the last, the head), the
others train; the parameters of normalization layers keep training in every group (fastai's `train_bn=True`,
its `norm_types`: BatchNorm, InstanceNorm and LayerNorm); the optimizer's state is cleared (`clear_state`).

A frozen parameter has `requires_grad=False` and no gradient, and torch's optimizers skip a parameter without a
gradient: no update, no weight decay, no optimizer state. The freeze state lives on the parameters, so it
survives `create_opt` (`fit(reset_opt=True)`); checkpoints save it (`trainable_state`).
"""
from __future__ import annotations

import warnings
from typing import Any

from torch import nn

__all__ = ['NORM_TYPES', 'norm_params', 'freeze_to', 'freeze', 'unfreeze', 'trainable_state', 'set_trainable_state']

NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.InstanceNorm1d, nn.InstanceNorm2d,
              nn.InstanceNorm3d, nn.LayerNorm)  # fastai's norm_types


def norm_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the model's normalization layers (those that train while their group is frozen)."""
    return [p for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)]


def freeze_to(learn: Any, n: int) -> None:
    """Freeze the parameter groups before index `n` (negative: counted from the end), normalization layers
    excepted, and unfreeze the others; clears the optimizer state. `learn.frozen_idx` becomes that index."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"freeze_to takes a group index (an int such as -1), got {n!r}")
    if learn.opt is None: learn.create_opt()
    groups = [group['params'] for group in learn.opt.param_groups]
    idx = n if n >= 0 else len(groups) + n
    if idx < 0:
        raise ValueError(f"freeze_to({n}): the optimizer has {len(groups)} parameter groups; pass -{len(groups)} "
                         f"to {len(groups)}")
    if idx >= len(groups) > 0:
        warnings.warn(f"Freezing {idx} groups; the model has {len(groups)}: the whole model is frozen "
                      f"(normalization layers excepted)", stacklevel=3)
    keep_training = {id(p) for p in norm_params(learn.model)}
    for group in groups[idx:]:
        for p in group: p.requires_grad_(True)
    for group in groups[:idx]:
        for p in group:
            train = id(p) in keep_training
            p.requires_grad_(train)
            if not train: p.grad = None  # a stale gradient would still be stepped on by the optimizer
    learn.opt.state.clear()
    learn.frozen_idx = min(idx, len(groups))


def freeze(learn: Any) -> None:
    """Train only the last parameter group (the head) and the normalization layers: `freeze_to(-1)`."""
    if learn.opt is None: learn.create_opt()
    n = len(learn.opt.param_groups)
    if n < 2:
        raise ValueError(f"freeze() needs at least two parameter groups (a body and a head), this learner has {n}: "
                         f"build it with vision_learner, or pass a splitter returning [body_params, head_params]")
    freeze_to(learn, -1)


def unfreeze(learn: Any) -> None:
    """Train every parameter group: `freeze_to(0)`."""
    freeze_to(learn, 0)


def trainable_state(model: nn.Module) -> list[bool]:
    """`requires_grad` of every parameter, in `model.parameters()` order (what a checkpoint saves)."""
    return [p.requires_grad for p in model.parameters()]


def set_trainable_state(model: nn.Module, state: list[bool]) -> None:
    """Restore `trainable_state`; frozen parameters lose any gradient."""
    params = list(model.parameters())
    if len(state) != len(params):
        raise ValueError(f"the trainable state has {len(state)} entries for {len(params)} parameters")
    for p, train in zip(params, state):
        p.requires_grad_(bool(train))
        if not train: p.grad = None
