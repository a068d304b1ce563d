"""An embedded, generated image dataset: coloured geometric shapes, deterministic, no download.

`make_shapes(n, size, n_classes, seed)` renders `n` RGB images of one shape each (circle, square,
triangle, ...) at a random position, scale and rotation, in a random light colour over a noisy, shaded
background of a random dark colour. Rendering is vectorised with torch (coordinate grids and
anti-aliased masks from signed distances), so 10,000 32×32 images take about a second.

Every random draw comes from a `torch.Generator` seeded from `seed`: the same arguments give the
same bytes on every machine and run, and the global RNG is never touched.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .core import DataBunch, Dataset, get_dls

__all__ = ['SHAPE_NAMES', 'make_shapes', 'ShapesDataset', 'shapes_datasets', 'shapes_databunch', 'save_shapes_folder']

SHAPE_NAMES = ('circle', 'square', 'triangle', 'cross', 'ring', 'star', 'diamond', 'hexagon', 'plus',
               'crescent', 'semicircle', 'ellipse')

_CHUNK = 2048  # images rendered at once: bounds the memory of the coordinate grids

# ---- signed distances of the shapes, in shape units (the shape fits in the unit disc) ----------------
# Negative inside, positive outside; exact or close to exact near the edge, which is all the
# anti-aliasing needs.


def _box(u: torch.Tensor, v: torch.Tensor, half_w: float, half_h: float) -> torch.Tensor:
    return torch.maximum(u.abs() - half_w, v.abs() - half_h)


def _polygon(u: torch.Tensor, v: torch.Tensor, n_sides: int, radius: float) -> torch.Tensor:
    # Distance to the edge of the nearest angular sector of a regular polygon (circumradius `radius`).
    sector = 2 * math.pi / n_sides
    angle = torch.remainder(torch.atan2(v, u) + sector / 2, sector) - sector / 2
    return torch.hypot(u, v) * torch.cos(angle) - radius * math.cos(sector / 2)


def _circle(u, v): return torch.hypot(u, v) - 0.9
def _square(u, v): return _box(u, v, 0.7, 0.7)
def _triangle(u, v): return _polygon(u, v + 0.15, 3, 1.05)
def _ring(u, v): return (torch.hypot(u, v) - 0.68).abs() - 0.24
def _hexagon(u, v): return _polygon(u, v, 6, 0.9)
def _plus(u, v): return torch.minimum(_box(u, v, 0.9, 0.26), _box(u, v, 0.26, 0.9))
def _ellipse(u, v): return (torch.hypot(u / 0.95, v / 0.5) - 1) * 0.5


def _cross(u, v):  # a Latin cross: not symmetric under rotation, unlike the plus
    return torch.minimum(_box(u, v, 0.24, 0.95), _box(u, v + 0.3, 0.66, 0.24))


def _star(u, v):  # five points; the radius varies linearly with the angle between tips and notches
    sector = 2 * math.pi / 5
    angle = (torch.remainder(torch.atan2(v, u) + sector / 2, sector) - sector / 2).abs() / (sector / 2)
    return (torch.hypot(u, v) - (1.0 - 0.58 * angle)) * 0.6


def _diamond(u, v):  # a rhombus, longer than wide
    a, b = 0.95, 0.55
    return (u.abs() / a + v.abs() / b - 1) * (a * b / math.hypot(a, b))


def _crescent(u, v):
    return torch.maximum(torch.hypot(u, v) - 0.9, 0.72 - torch.hypot(u - 0.45, v))


def _semicircle(u, v):
    v = v - 0.4
    return torch.maximum(torch.hypot(u, v) - 0.95, v)


_SDFS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    'circle': _circle, 'square': _square, 'triangle': _triangle, 'cross': _cross, 'ring': _ring, 'star': _star,
    'diamond': _diamond, 'hexagon': _hexagon, 'plus': _plus, 'crescent': _crescent, 'semicircle': _semicircle,
    'ellipse': _ellipse}


def _check_args(n: int, size: int, n_classes: int, seed: int) -> None:
    for name, value, low in (('n', n, 0), ('size', size, 8), ('n_classes', n_classes, 2)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if n_classes > len(SHAPE_NAMES):
        raise ValueError(f"n_classes must be at most {len(SHAPE_NAMES)} (the shapes: {', '.join(SHAPE_NAMES)}), "
                         f"got {n_classes}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")


def _uniform(g: torch.Generator, shape: tuple, low: float, high: float) -> torch.Tensor:
    return torch.rand(shape, generator=g) * (high - low) + low


def _render(labels: torch.Tensor, size: int, n_classes: int, g: torch.Generator) -> torch.Tensor:
    """Float images (N, 3, size, size) in [0, 1] of the shapes `labels`, drawing from `g`."""
    n = len(labels)
    scale = _uniform(g, (n, 1, 1), 0.32, 0.68)                     # shape radius, in half-image units
    centre = (torch.rand((n, 2, 1, 1), generator=g) * 2 - 1) * (1 - scale.unsqueeze(1))
    angle = _uniform(g, (n, 1, 1), 0, 2 * math.pi)
    # A light shape on a dark background, each of a random colour: with a random polarity (or colours
    # unrelated in brightness) a small CNN needs far longer than the default run to start learning.
    background = _uniform(g, (n, 3, 1, 1), 0, 0.5)
    foreground = _uniform(g, (n, 3, 1, 1), 0.5, 1)
    shading = _uniform(g, (n, 3, 1, 1), -0.25, 0.25)                # a linear light gradient across the image
    shade_angle = _uniform(g, (n, 1, 1), 0, 2 * math.pi)
    noise_std = _uniform(g, (n, 1, 1, 1), 0.04, 0.2)

    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(axis, axis, indexing='ij')
    dx, dy = x - centre[:, 0], y - centre[:, 1]
    cos, sin = torch.cos(angle), torch.sin(angle)
    u, v = (cos * dx + sin * dy) / scale, (cos * dy - sin * dx) / scale
    distance = torch.empty_like(u)
    for k, name in enumerate(SHAPE_NAMES[:n_classes]):
        idx = (labels == k).nonzero().squeeze(1)
        if len(idx): distance[idx] = _SDFS[name](u[idx], v[idx])
    pixel = 2 / size
    alpha = (0.5 - distance * scale / pixel).clamp(0, 1).unsqueeze(1)  # anti-aliased edge one pixel wide

    ramp = (torch.cos(shade_angle) * x + torch.sin(shade_angle) * y).unsqueeze(1)
    image = background * (1 - alpha) + foreground * alpha + shading * ramp
    image = image + torch.randn(image.shape, generator=g) * noise_std
    return image.clamp_(0, 1)


def make_shapes(n: int, size: int = 32, n_classes: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """`(images, labels)`: `n` uint8 images (n, 3, size, size) of coloured shapes and their int64 classes.

    Class `k` is the shape `SHAPE_NAMES[k]`; classes are balanced (counts differ by at most one) and in
    random order. Deterministic in all arguments; a different `seed` gives a different set.
    """
    _check_args(n, size, n_classes, seed)
    g = torch.Generator().manual_seed(int(seed))
    labels = (torch.arange(n) % n_classes)[torch.randperm(n, generator=g)]
    images = torch.empty((n, 3, size, size), dtype=torch.uint8)
    for start in range(0, n, _CHUNK):
        chunk = _render(labels[start:start + _CHUNK], size, n_classes, g)
        images[start:start + _CHUNK] = chunk.mul_(255).round_().to(torch.uint8)
    return images, labels


def _sub_seed(seed: int, stream: int) -> int:
    """An independent seed for stream `stream` of `seed` (train and valid sets never share draws)."""
    return int(np.random.SeedSequence([int(seed), stream]).generate_state(1, dtype=np.uint64)[0] >> 1)


class ShapesDataset(Dataset):
    """uint8 images stored compactly, served as float tensors in [0, 1] with their int64 labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, vocab: list[str] | None = None):
        super().__init__(images, labels)
        self.vocab = vocab

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i].float().div_(255), self.y[i]


def shapes_datasets(n_train: int, n_valid: int, size: int = 32, n_classes: int = 10,
                    seed: int = 0) -> tuple[ShapesDataset, ShapesDataset]:
    """A training and a validation `ShapesDataset`, drawn from independent streams of `seed`."""
    vocab = list(SHAPE_NAMES[:n_classes])
    train = ShapesDataset(*make_shapes(n_train, size, n_classes, _sub_seed(seed, 0)), vocab=vocab)
    valid = ShapesDataset(*make_shapes(n_valid, size, n_classes, _sub_seed(seed, 1)), vocab=vocab)
    return train, valid


def shapes_databunch(n_train: int, n_valid: int, bs: int, size: int = 32, seed: int = 0, n_classes: int = 10,
                     **dl_kwargs: Any) -> DataBunch:
    """A DataBunch of generated shapes: float images in [0, 1], `c_in=3`, `c_out=n_classes`, `vocab` the shape names.

    Extra keyword arguments go to both DataLoaders (`num_workers`, `generator`, ...).
    """
    train, valid = shapes_datasets(n_train, n_valid, size, n_classes, seed)
    if len(train) == 0: raise ValueError("n_train must be at least 1 (the training loader would be empty)")
    train_dl, valid_dl = get_dls(train, valid if len(valid) else None, bs, **dl_kwargs)
    return DataBunch(train_dl, valid_dl, c_in=3, c_out=n_classes, vocab=train.vocab)


def save_shapes_folder(path: str | Path, n_per_class: int, n_valid_per_class: int | None = None, size: int = 32,
                       n_classes: int = 10, seed: int = 0, valid_name: str = 'val') -> Path:
    """Write generated shapes as PNG files in an image-folder tree `train/<shape>/`, `<valid_name>/<shape>/`.

    `n_valid_per_class` defaults to a quarter of `n_per_class` (at least one). Returns `path`.
    """
    from PIL import Image
    if n_valid_per_class is None: n_valid_per_class = max(1, n_per_class // 4)
    for name, value in (('n_per_class', n_per_class), ('n_valid_per_class', n_valid_per_class)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    path = Path(path)
    train, valid = shapes_datasets(n_per_class * n_classes, n_valid_per_class * n_classes, size, n_classes, seed)
    for split, ds in (('train', train), (valid_name, valid)):
        pixels = ds.x.permute(0, 2, 3, 1).numpy()
        counts = [0] * n_classes
        for image, label in zip(pixels, ds.y.tolist()):
            folder = path / split / SHAPE_NAMES[label]
            if counts[label] == 0: folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(folder / f'{counts[label]:05d}.png')
            counts[label] += 1
    return path
