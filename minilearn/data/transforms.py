"""Item transforms (PIL image -> tensor) in `_order`, and showing images and batches.

Transforms are plain callables composed in ascending `_order` (the course convention: `make_rgb` 0,
`ResizeFixed` 10, `to_byte_tensor` 20, `to_float_tensor` 30). A callable without `_order` — a
torchvision transform (v1 or v2), a user function — runs where it stands in the list: it takes the
`_order` of the nearest ordered transform before it (0 when none precedes it), and ties keep list
order. So `[make_rgb, T.RandomCrop(28), to_byte_tensor, to_float_tensor, T.Normalize(m, s)]` crops
the PIL image and normalizes the float tensor.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch

from .normalize import norm_stats
from ..core import listify

__all__ = ['Transform', 'MakeRGB', 'make_rgb', 'ResizeFixed', 'to_byte_tensor', 'to_float_tensor',
           'order_tfms', 'compose', 'show_image', 'show_batch', 'norm_stats']


class Transform:
    """Base class of item transforms: a callable with an `_order`."""
    _order = 0

    def __repr__(self) -> str:
        return f'{type(self).__name__}()'


class MakeRGB(Transform):
    """Convert a PIL image to 3-channel RGB (the class form of `make_rgb`)."""

    def __call__(self, item: PIL.Image.Image) -> PIL.Image.Image:
        return make_rgb(item)


def make_rgb(item: PIL.Image.Image) -> PIL.Image.Image:
    """The PIL image in RGB mode (unchanged when it already is)."""
    if not isinstance(item, PIL.Image.Image):
        raise TypeError(f"make_rgb expects a PIL image, got {type(item).__name__}; it must run before "
                        f"to_byte_tensor (_order 0 < 20)")
    return item if item.mode == 'RGB' else item.convert('RGB')


make_rgb._order = 0


class ResizeFixed(Transform):
    """Resize a PIL image to a fixed `size` (an int for a square, or (width, height)), bilinear."""
    _order = 10

    def __init__(self, size: int | tuple[int, int]):
        if isinstance(size, int) and not isinstance(size, bool): size = (size, size)
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
            raise ValueError(f"ResizeFixed size must be a positive int or a (width, height) pair, got {size!r}")
        self.size = tuple(size)

    def __call__(self, item: PIL.Image.Image) -> PIL.Image.Image:
        if not isinstance(item, PIL.Image.Image):
            raise TypeError(f"ResizeFixed expects a PIL image, got {type(item).__name__}; it must run before "
                            f"to_byte_tensor (_order 10 < 20)")
        if item.size == self.size: return item
        return item.resize(self.size, PIL.Image.Resampling.BILINEAR)

    def __repr__(self) -> str:
        return f'ResizeFixed(size={self.size})'


def to_byte_tensor(item: PIL.Image.Image) -> torch.Tensor:
    """A PIL image as a (C, H, W) uint8 tensor."""
    if not isinstance(item, PIL.Image.Image):
        raise TypeError(f"to_byte_tensor expects a PIL image, got {type(item).__name__}")
    arr = np.array(item)  # a writable copy the tensor can own
    if arr.dtype != np.uint8:
        raise TypeError(f"to_byte_tensor needs an 8-bit image, got PIL mode {item.mode!r}; "
                        f"convert it first (make_rgb, or item.convert('L'))")
    res = torch.from_numpy(arr)
    return res.unsqueeze(0) if res.ndim == 2 else res.permute(2, 0, 1)


to_byte_tensor._order = 20


def to_float_tensor(item: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor as floats in [0, 1]."""
    if not isinstance(item, torch.Tensor) or item.dtype != torch.uint8:
        got = item.dtype if isinstance(item, torch.Tensor) else type(item).__name__
        raise TypeError(f"to_float_tensor expects a uint8 tensor (after to_byte_tensor), got {got}; "
                        f"if another transform already made floats, drop to_float_tensor")
    return item.float().div_(255.)


to_float_tensor._order = 30


def order_tfms(tfms: Any) -> list[Callable]:
    """The transforms in the order they run: by `_order`; unordered ones stay where they stand in the list."""
    keyed, current = [], 0
    for position, tfm in enumerate(listify(tfms)):
        if not callable(tfm):
            raise TypeError(f"item transforms must be callables, got {tfm!r} at position {position}")
        current = getattr(tfm, '_order', current)
        keyed.append((current, position, tfm))
    return [tfm for _, _, tfm in sorted(keyed, key=lambda k: (k[0], k[1]))]


def compose(x: Any, funcs: Any, *args: Any, **kwargs: Any) -> Any:
    """Apply `funcs` to `x` in `_order` (see `order_tfms`)."""
    for f in order_tfms(funcs): x = f(x, *args, **kwargs)
    return x


# ---- showing ------------------------------------------------------------------------------------

def _denormalize(x: torch.Tensor, norm: Any) -> torch.Tensor:
    stats = norm_stats(norm)
    if stats is None: return x
    mean, std = (s.reshape(-1, *([1] * (x.ndim - 2))) for s in stats)
    return x * std + mean


def _as_hwc(im: Any) -> np.ndarray:
    """An image (PIL, CHW/HW tensor, HWC array) as an HWC or HW numpy array for imshow."""
    if isinstance(im, PIL.Image.Image): return np.asarray(im)
    if isinstance(im, torch.Tensor):
        im = im.detach().cpu()
        if im.is_floating_point(): im = im.float().clamp(0, 1)
        if im.ndim == 3: im = im[0] if im.shape[0] == 1 else im.permute(1, 2, 0)
        return im.numpy()
    return np.asarray(im)


def show_image(im: Any, ax: Any = None, figsize: tuple = (3, 3), title: str | None = None):
    """Show one image (CHW tensor, PIL image or array) without axes; returns the figure."""
    import matplotlib.pyplot as plt  # local: pyplot is slow to import and only plotting needs it
    if ax is None: _, ax = plt.subplots(figsize=figsize)
    arr = _as_hwc(im)
    ax.imshow(arr, cmap='gray' if arr.ndim == 2 else None)
    ax.axis('off')
    if title is not None: ax.set_title(str(title))
    return ax.figure


def show_batch(xb: torch.Tensor, yb: Any = None, vocab: Sequence | None = None, n: int = 9,
               norm: Any = None, ncols: int | None = None, figsize: tuple | None = None):
    """A grid of the first `n` images of a batch, titled by label (decoded through `vocab`); returns the figure.

    `norm` (a `(mean, std)` pair, a `Normalize` or a normalization callback) undoes normalization first.
    Given a DataBunch instead of a batch (fastai's habit), shows one of its training batches.
    """
    import matplotlib.pyplot as plt  # local: pyplot is slow to import and only plotting needs it
    if hasattr(xb, 'train_dl') and hasattr(xb, 'show_batch'):  # a DataBunch (duck-typed: data.core imports us)
        if yb is not None:
            raise TypeError("show_batch(data) shows a batch of the DataBunch's own; pass labels only with a batch: "
                            "show_batch(xb, yb)")
        return xb.show_batch(n=n, norm=norm, ncols=ncols, figsize=figsize)
    if not isinstance(xb, torch.Tensor) and not hasattr(xb, '__len__'):
        raise TypeError(f"show_batch takes a batch of images (a tensor, with its labels: show_batch(xb, yb)) or a "
                        f"DataBunch, got {type(xb).__name__}; for a loader: xb, yb = one_batch(dl)")
    n = min(n, len(xb))
    if n < 1: raise ValueError("show_batch needs at least one image")
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize or (2 * ncols, 2 * nrows), squeeze=False)
    images = _denormalize(xb[:n].detach().float().cpu(), norm) if isinstance(xb, torch.Tensor) else xb[:n]
    for i, ax in enumerate(axes.flat):
        if i >= n:
            ax.axis('off')
            continue
        title = None
        if yb is not None:
            label = yb[i].item() if isinstance(yb[i], torch.Tensor) else yb[i]
            title = vocab[label] if vocab is not None else label
        show_image(images[i], ax=ax, title=title)
    fig.tight_layout()
    return fig
