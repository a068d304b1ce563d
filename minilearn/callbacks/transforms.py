"""BatchTransformXCallback: a function applied to every batch `xb` on the device (normalization, reshaping)."""
from __future__ import annotations

from collections.abc import Callable

import torch

from ..callback import Callback, Order
from ..data.normalize import Normalize, channel_stats, norm_stats, normalize_chan, tfm_stats

# Normalize, normalize_chan, norm_stats and channel_stats live in data/normalize.py; imported here for old import paths.
__all__ = ['BatchTransformXCallback', 'view_tfm', 'normalize_chan', 'Normalize', 'norm_stats', 'channel_stats']


class BatchTransformXCallback(Callback):
    """Replace `xb` by `tfm(xb)` at every batch (after the device move)."""
    _order = Order.BATCH_TRANSFORM
    for_inference = True

    def __init__(self, tfm: Callable[[torch.Tensor], torch.Tensor]):
        self.tfm = tfm

    def begin_batch(self) -> None:
        self.run.xb = self.tfm(self.run.xb)

    def norm_stats(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The (mean, std) this callback normalizes with; None when its transform is no normalization."""
        return tfm_stats(self.tfm)


def view_tfm(*size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """A batch transform reshaping flat items to `size` (the course's `view_tfm(1, 28, 28)`)."""
    def _inner(x: torch.Tensor) -> torch.Tensor: return x.view(*((-1,) + size))
    return _inner
