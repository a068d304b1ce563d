"""Per-channel normalization and its statistics: data code that knows no training events."""
from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any

import torch

from .sampler import position_kept

__all__ = ['normalize_chan', 'Normalize', 'norm_stats', 'tfm_stats', 'channel_stats']


def _as_channel_stat(stat: Any, x: torch.Tensor) -> torch.Tensor:
    stat = torch.as_tensor(stat)
    stat = stat.to(device=x.device, dtype=x.dtype, non_blocking=True)
    return stat.reshape((1, -1) + (1,) * (x.ndim - 2))


def normalize_chan(x: torch.Tensor, mean: Any, std: Any) -> torch.Tensor:
    """(x - mean) / std per channel of an (N, C, ...) batch; stats follow the batch's device and dtype."""
    if x.ndim < 2: raise ValueError(f"normalize_chan expects an (N, C, ...) batch, got shape {tuple(x.shape)}")
    return (x - _as_channel_stat(mean, x)) / _as_channel_stat(std, x)


class Normalize:
    """Per-channel normalization with stats cached per (device, dtype): no copy per batch."""

    def __init__(self, mean: Any, std: Any):
        self.mean, self.std = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
        if (self.std <= 0).any(): raise ValueError(f"std must be positive in every channel, got {self.std.tolist()}")
        self._cache: dict = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        channels_last = x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
        key = (x.device, x.dtype, x.ndim) + ((tuple(x.shape[2:]),) if channels_last else ())
        if key not in self._cache:
            mean, std = _as_channel_stat(self.mean, x), _as_channel_stat(self.std, x)
            if channels_last:  # stats over the whole image plane: channels innermost otherwise make a 3-wide loop
                mean, std = (s.expand(1, -1, *x.shape[2:]).contiguous(memory_format=torch.channels_last)
                             for s in (mean, std))
            self._cache[key] = (mean, std)
        mean, std = self._cache[key]
        return (x - mean) / std

    def __repr__(self) -> str:
        return f'Normalize(mean={self.mean.tolist()}, std={self.std.tolist()})'


def _float_stats(mean: Any, std: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.as_tensor(mean, dtype=torch.float32).flatten().cpu(),
            torch.as_tensor(std, dtype=torch.float32).flatten().cpu())


def tfm_stats(tfm: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (mean, std) a normalizing transform applies; None for any other transform."""
    if isinstance(tfm, functools.partial) and tfm.func is normalize_chan:
        keywords = tfm.keywords
        return _float_stats(keywords['mean'], keywords['std']) if {'mean', 'std'} <= keywords.keys() else None
    mean, std = getattr(tfm, 'mean', None), getattr(tfm, 'std', None)  # Normalize, torchvision's Normalize
    return None if mean is None or std is None else _float_stats(mean, std)


def norm_stats(source: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, std) as CPU float tensors, from a (mean, std) pair, a `Normalize` (or torchvision's),
    `partial(normalize_chan, mean=..., std=...)`, or an object that reports its own through a `norm_stats()`
    method (a BatchTransformXCallback, a Learner: None when it normalizes nothing). None for None."""
    if source is None: return None
    if isinstance(source, (tuple, list)) and len(source) == 2: return _float_stats(*source)
    if callable(getattr(source, 'norm_stats', None)): return source.norm_stats()
    stats = tfm_stats(source)
    if stats is None:
        raise TypeError(f"cannot read normalization stats from {source!r}: pass (mean, std), a Normalize, or "
                        f"BatchTransformXCallback(partial(normalize_chan, mean=..., std=...))")
    return stats


def channel_stats(dl: Iterable, n_batches: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std over the inputs of a DataLoader (all of it, or its first `n_batches`), leaving
    the loader's position (and torch's random state) as they were."""
    total = total_sq = None
    count = 0
    with position_kept(dl):
        for i, (xb, _) in enumerate(dl):
            if n_batches is not None and i >= n_batches: break
            xb = xb.double().transpose(0, 1).reshape(xb.shape[1], -1)
            total = xb.sum(1) if total is None else total + xb.sum(1)
            total_sq = (xb * xb).sum(1) if total_sq is None else total_sq + (xb * xb).sum(1)
            count += xb.shape[1]
    if not count: raise ValueError("channel_stats: the DataLoader gave no batches")
    mean = total / count
    std = (total_sq / count - mean * mean).clamp_min(0).sqrt()
    return mean.float(), std.float()
