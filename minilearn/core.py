"""Tiny shared helpers used across the package."""
from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch

__all__ = ['listify', 'camel2snake', 'to_device', 'unwrap_loss', 'is_main_process']

_camel_re1 = re.compile('(.)([A-Z][a-z]+)')
_camel_re2 = re.compile('([a-z0-9])([A-Z])')


def listify(o: Any) -> list:
    """Turn `o` into a list: None -> [], a list stays, a string or single object is wrapped."""
    if o is None: return []
    if isinstance(o, list): return o
    if isinstance(o, (str, bytes, torch.Tensor, Mapping)): return [o]
    if isinstance(o, Iterable): return list(o)
    return [o]


def camel2snake(name: str) -> str:
    """`AvgStatsCallback` -> `avg_stats_callback`."""
    return _camel_re2.sub(r'\1_\2', _camel_re1.sub(r'\1_\2', name)).lower()


def to_device(o: Any, device: torch.device | str) -> Any:
    """Move tensors (possibly nested in tuples, lists and dicts) to `device`; non-blocking from pinned memory."""
    if isinstance(o, torch.Tensor):
        return o.to(device, non_blocking=o.is_pinned()) if o.device != torch.device(device) else o
    if isinstance(o, (list, tuple)):
        moved = [to_device(x, device) for x in o]
        return type(o)(*moved) if hasattr(o, '_fields') else type(o)(moved)
    if isinstance(o, dict): return {k: to_device(v, device) for k, v in o.items()}
    return o


def unwrap_loss(loss_func: Any) -> Any:
    """The user's own loss behind wrappers (such as MixUp's) that expose it as `base_loss_func`."""
    while getattr(loss_func, 'base_loss_func', None) is not None: loss_func = loss_func.base_loss_func
    return loss_func


def is_main_process() -> bool:
    """False on the ranks other than 0 of an initialised torch.distributed run (they write no files)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
