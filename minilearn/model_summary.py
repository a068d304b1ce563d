"""The model summary: per layer its output shape for one batch, its parameter count and trainability, then the
totals, optimizer, loss and callbacks (`summary(learn)`, also `learn.summary()`)."""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .core import callable_name, unwrap_loss
from .predictions import _first_batch, _inference_state, _prepare_batch, inference_callbacks

__all__ = ['summary', 'ModelSummary']


class ModelSummary(str):
    """The summary table as text; also `rows` (one dict per layer), `total_params` and `trainable_params`."""
    rows: list[dict]
    total_params: int
    trainable_params: int

    def __repr__(self) -> str:
        return str(self)


def _shape_of(o: Any) -> str:
    if isinstance(o, torch.Tensor): return str(list(o.shape))
    if isinstance(o, (list, tuple)): return ', '.join(_shape_of(x) for x in o)
    if isinstance(o, dict): return ', '.join(f'{k}: {_shape_of(v)}' for k, v in o.items())
    return type(o).__name__


def _trainable(params: list[nn.Parameter]) -> str:
    if not params: return '-'
    flags = {p.requires_grad for p in params}
    return 'partly' if len(flags) == 2 else ('yes' if flags == {True} else 'no')


def _layer_rows(model: nn.Module) -> list[dict]:
    """One row per leaf module, and per container that holds parameters of its own."""
    rows = []
    for name, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if next(module.children(), None) is not None and not own: continue
        rows.append({'name': name or type(module).__name__, 'type': type(module).__name__, 'module': module,
                     'output_shape': '-', 'n_params': sum(p.numel() for p in own), 'trainable': _trainable(own)})
    return rows


def _record_shapes(learn: Any, rows: list[dict]) -> str:
    """Run one training batch (model-ready, in eval mode) and fill each row's output shape; returns the input shape."""
    def hook(row: dict) -> Callable:
        def record(module: nn.Module, args: Any, output: Any) -> None:
            if row['output_shape'] == '-': row['output_shape'] = _shape_of(output)
        return record
    handles = [row['module'].register_forward_hook(hook(row)) for row in rows]
    try:
        with _inference_state(learn), torch.inference_mode():
            batch = learn._split_batch(_first_batch(learn.data.train_dl))
            xb, _ = _prepare_batch(learn, inference_callbacks(learn), *batch)
            learn.model(xb)
    finally:
        for handle in handles: handle.remove()
    return _shape_of(xb)


def summary(learn: Any) -> ModelSummary:
    """Per layer its output shape for one batch, parameter count and trainability; totals, optimizer, loss, cbs."""
    rows = _layer_rows(learn.model)
    input_shape = _record_shapes(learn, rows)
    params = list(learn.model.parameters())
    total, trainable = sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)
    width = max([len('Layer (type)')] + [len(f"{r['name']} ({r['type']})") for r in rows]) + 2
    shape_width = max([len('Output shape')] + [len(r['output_shape']) for r in rows]) + 2
    rule = '=' * (width + shape_width + 22)
    lines = [f'{type(learn.model).__name__} (input {input_shape})', rule,
             f"{'Layer (type)':<{width}}{'Output shape':<{shape_width}}{'Param #':>10}  Trainable", rule]
    lines += [f"{r['name'] + ' (' + r['type'] + ')':<{width}}{r['output_shape']:<{shape_width}}{r['n_params']:>10,}  "
              f"{r['trainable']}" for r in rows]
    opt = (f'{type(learn.opt).__name__} ({len(learn.opt.param_groups)} param group(s))' if learn.opt is not None
           else f'{callable_name(learn.opt_func)} (created at the first fit)')
    lines += [rule, f'Total params: {total:,}', f'Trainable params: {trainable:,}',
              f'Frozen params: {total - trainable:,}', '', f'Optimizer: {opt}',
              f'Loss: {callable_name(unwrap_loss(learn.loss_func))}', 'Callbacks (in _order):']
    lines += [f'  {type(cb).__name__} (_order={cb._order})' for cb in sorted(learn.cbs, key=lambda cb: cb._order)]
    text = ModelSummary('\n'.join(lines))
    text.rows = [{k: v for k, v in r.items() if k != 'module'} for r in rows]
    text.total_params, text.trainable_params = total, trainable
    return text
