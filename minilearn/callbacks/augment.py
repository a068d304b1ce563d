"""Batch augmentation on the batch's device: random crop with padding, horizontal flip, random resized crop.

Written here rather than taken from torchvision's v2 transforms because those, given a batch, draw one
set of parameters for all of it, and per-item parameters need a Python loop over the items. These draw
per item, as tensors on the device, and apply one operation per batch (a gather, a `torch.where`, or
a `grid_sample`). Each callback runs on training batches only (identity in validation and in get_preds),
draws from torch's generator of the batch's device (saved with the RNG state, so a resume is exact), and
keeps the batch's memory format (channels-last batches stay channels-last). `draw(xb)` returns the random
parameters of a batch and `apply(xb, params)` applies them: a test or a notebook can fix them.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..callback import Callback, Order

__all__ = ['RandomCropPad', 'RandomFlip', 'RandomResizedCrop']


def _check_images(xb: Any, who: str) -> None:
    if not isinstance(xb, torch.Tensor) or xb.ndim != 4:
        shape = tuple(xb.shape) if isinstance(xb, torch.Tensor) else type(xb).__name__
        raise ValueError(f"{who} augments (N, C, H, W) image batches, got {shape}; reshape the inputs to images "
                         f"first (a BatchTransformXCallback(view_tfm(...)) runs before augmentation)")


def _is_channels_last(xb: torch.Tensor) -> bool:
    return xb.is_contiguous(memory_format=torch.channels_last) and not xb.is_contiguous()


def _gather_pixels(xb: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """out[n, :, i, j] = xb[n, :, rows[n, i], cols[n, j]], in one gather, in the batch's memory format."""
    n, c, h, w = xb.shape
    oh, ow = rows.shape[1], cols.shape[1]
    flat = (rows[:, :, None] * w + cols[:, None, :]).reshape(n, oh * ow)
    if _is_channels_last(xb):
        out = xb.permute(0, 2, 3, 1).reshape(n, h * w, c).gather(1, flat[:, :, None].expand(n, oh * ow, c))
        return out.view(n, oh, ow, c).permute(0, 3, 1, 2)
    out = xb.reshape(n, c, h * w).gather(2, flat[:, None, :].expand(n, c, oh * ow))
    return out.view(n, c, oh, ow)


class _BatchAugment(Callback):
    """Training batches only: `xb = apply(xb, draw(xb))` at `begin_batch`."""
    _order = Order.AUGMENT

    def begin_batch(self) -> None:
        if not self.run.in_train: return
        xb = self.run.xb
        self.run.xb = self.apply(xb, self.draw(xb))

    def draw(self, xb: torch.Tensor) -> Any:
        """The random parameters of batch `xb` (per item), on its device."""
        raise NotImplementedError

    def apply(self, xb: torch.Tensor, params: Any) -> torch.Tensor:
        """`xb` augmented with `params` (what `draw` returned)."""
        raise NotImplementedError


class RandomCropPad(_BatchAugment):
    """Pad each image by `pad` pixels (`mode` 'zeros' or 'reflect') and crop it back at a random offset per item.

    It runs after normalization (`Order.AUGMENT`), so zero padding is the dataset mean. With a RandomFlip
    attached, the flip is done within the crop's gather (the result of flipping the cropped batch, with
    the same draws in the same order, for one pass over the batch less).
    """

    def __init__(self, pad: int = 4, mode: str = 'zeros'):
        if isinstance(pad, bool) or not isinstance(pad, int) or pad < 0:
            raise ValueError(f"RandomCropPad: pad must be an int >= 0, got {pad!r}")
        if mode not in ('zeros', 'reflect'):
            raise ValueError(f"RandomCropPad: mode must be 'zeros' or 'reflect', got {mode!r}")
        self.pad, self.mode = pad, mode
        self.flip: RandomFlip | None = None

    def begin_fit(self) -> None:
        self.flip = self.run.find_cb(RandomFlip)

    def after_fit(self) -> None:
        self.flip = None

    def begin_batch(self) -> None:
        if not self.run.in_train: return
        xb = self.run.xb
        params = self.draw(xb)
        flips = None if self.flip is None else self.flip.draw(xb)
        self.run.xb = self.apply(xb, params, flips)

    def draw(self, xb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(top, left) offsets in the padded image, each of shape (N,), in [0, 2·pad]."""
        _check_images(xb, type(self).__name__)
        offsets = torch.randint(0, 2 * self.pad + 1, (2, xb.shape[0]), device=xb.device)
        return offsets[0], offsets[1]

    def apply(self, xb: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor],
              flips: torch.Tensor | None = None) -> torch.Tensor:
        """`xb` cropped at `params`; then flipped horizontally where `flips` (N booleans) is True."""
        _check_images(xb, type(self).__name__)
        top, left = params
        h, w = xb.shape[-2:]
        if self.mode == 'reflect' and self.pad >= min(h, w):
            raise ValueError(f"RandomCropPad: reflect padding needs pad < image size, got pad={self.pad} for "
                             f"{h}x{w} images; use mode='zeros' or a smaller pad")
        padded = F.pad(xb, (self.pad,) * 4, mode='constant' if self.mode == 'zeros' else 'reflect')
        cols = torch.arange(w, device=xb.device)
        if flips is not None: cols = torch.where(flips[:, None], cols.flip(0), cols)
        rows = top[:, None] + torch.arange(h, device=xb.device)
        return _gather_pixels(padded, rows, left[:, None] + cols)

    def __repr__(self) -> str:
        return f'RandomCropPad(pad={self.pad}, mode={self.mode!r})'


class RandomFlip(_BatchAugment):
    """Flip each image horizontally with probability `p` (within RandomCropPad's gather when one is attached)."""

    def __init__(self, p: float = 0.5):
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
            raise ValueError(f"RandomFlip: p must be a probability in [0, 1], got {p!r}")
        self.p = float(p)
        self.in_crop = False

    def begin_fit(self) -> None:
        self.in_crop = self.run.find_cb(RandomCropPad) is not None

    def after_fit(self) -> None:
        self.in_crop = False

    def begin_batch(self) -> None:
        if not self.in_crop: super().begin_batch()

    def draw(self, xb: torch.Tensor) -> torch.Tensor:
        """A boolean of shape (N,): which items are flipped."""
        _check_images(xb, type(self).__name__)
        return torch.rand(xb.shape[0], device=xb.device) < self.p

    def apply(self, xb: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        _check_images(xb, type(self).__name__)
        return torch.where(params[:, None, None, None], xb.flip(3), xb)

    def __repr__(self) -> str:
        return f'RandomFlip(p={self.p})'


class RandomResizedCrop(_BatchAugment):
    """A random box per item (area fraction in `scale`, aspect ratio in `ratio`, log-uniform) resized to `size`.

    Bilinear, in one `F.grid_sample` per batch; boxes are real-valued (no per-item retry loop). Validation
    batches are not resized: give `size` the validation images' size.
    """

    def __init__(self, size: int | tuple[int, int], scale: tuple[float, float] = (0.35, 1.),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3)):
        if isinstance(size, int) and not isinstance(size, bool): size = (size, size)
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
            raise ValueError(f"RandomResizedCrop: size must be a positive int or an (height, width) pair, got {size!r}")
        if not (isinstance(scale, (tuple, list)) and len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1):
            raise ValueError(f"RandomResizedCrop: scale must be (low, high) with 0 < low <= high <= 1, got {scale!r}")
        if not (isinstance(ratio, (tuple, list)) and len(ratio) == 2 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(f"RandomResizedCrop: ratio must be (low, high) with 0 < low <= high, got {ratio!r}")
        self.size, self.scale, self.ratio = tuple(size), tuple(scale), tuple(ratio)

    def draw(self, xb: torch.Tensor) -> torch.Tensor:
        """Boxes (N, 4) as (top, left, height, width) in pixels, inside the image."""
        _check_images(xb, type(self).__name__)
        n, (h, w) = xb.shape[0], xb.shape[-2:]
        u = torch.rand(4, n, device=xb.device)
        area = (self.scale[0] + (self.scale[1] - self.scale[0]) * u[0]) * (h * w)
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u[1])  # width / height
        bh = (area / aspect).sqrt().clamp(max=h)
        bw = (area * aspect).sqrt().clamp(max=w)
        return torch.stack([u[2] * (h - bh), u[3] * (w - bw), bh, bw], 1)

    def apply(self, xb: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        _check_images(xb, type(self).__name__)
        n, c, h, w = xb.shape
        top, left, bh, bw = params.to(xb.dtype if xb.is_floating_point() else torch.float32).unbind(1)
        theta = torch.zeros(n, 2, 3, device=xb.device, dtype=top.dtype)
        # affine_grid maps the output's [-1, 1] onto the box: x' = (bw/w)·x + (2·left + bw)/w - 1.
        theta[:, 0, 0], theta[:, 0, 2] = bw / w, (2 * left + bw) / w - 1
        theta[:, 1, 1], theta[:, 1, 2] = bh / h, (2 * top + bh) / h - 1
        grid = F.affine_grid(theta, [n, c, *self.size], align_corners=False)
        out = F.grid_sample(xb, grid, mode='bilinear', padding_mode='border', align_corners=False)
        return out.contiguous(memory_format=torch.channels_last) if _is_channels_last(xb) else out

    def __repr__(self) -> str:
        return f'RandomResizedCrop(size={self.size}, scale={self.scale}, ratio={self.ratio})'
