"""Learning with noisy labels: inject label noise reproducibly, and rank items by how likely they are mislabeled."""
from __future__ import annotations

import math
from numbers import Real
from typing import Any, NamedTuple

import numpy as np
import torch

from .inference import get_preds

__all__ = ['NoisyLabels', 'inject_label_noise', 'add_label_noise', 'LabelIssues', 'find_label_issues']


class NoisyLabels(NamedTuple):
    """New labels and the boolean mask of the positions whose label actually changed."""
    labels: torch.Tensor
    changed: torch.Tensor


def _as_label_tensor(labels: Any) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(np.asarray(labels))
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"labels must be a 1-D sequence of integer class indices, "
                            f"got {type(labels).__name__}") from e
    if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be a 1-D tensor of integer class indices, got shape {tuple(labels.shape)} "
                        f"and dtype {labels.dtype}")
    return labels


def _n_classes(labels: torch.Tensor, n_classes: int | None) -> int:
    if n_classes is None:
        if labels.numel() == 0: raise ValueError("n_classes is needed when there are no labels")
        return int(labels.max()) + 1
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
    return n_classes


def inject_label_noise(labels: Any, noise_ratio: float, n_classes: int | None = None, exclude_true: bool = False,
                       generator: torch.Generator | None = None) -> NoisyLabels:
    """Redraw exactly round(N·noise_ratio) randomly chosen labels uniformly at random; the input is left untouched.

    By default a redrawn label may equal the original one (the common lab convention), so `changed`
    can have fewer True entries than positions redrawn; `exclude_true=True` always picks another class.
    `n_classes` defaults to max(labels)+1. Draws come from `generator` (a CPU `torch.Generator`), else
    from torch's global generator.
    """
    labels = _as_label_tensor(labels)
    if isinstance(noise_ratio, bool) or not isinstance(noise_ratio, Real) or not math.isfinite(noise_ratio) \
            or not 0 <= noise_ratio <= 1:
        raise ValueError(f"noise_ratio must be a number in [0, 1], got {noise_ratio!r}")
    n_classes = _n_classes(labels, n_classes)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"labels must lie in [0, n_classes={n_classes}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if exclude_true and n_classes < 2:
        raise ValueError("exclude_true=True needs at least 2 classes to pick a different one")
    n_noisy = round(len(labels) * noise_ratio)
    positions = torch.randperm(len(labels), generator=generator)[:n_noisy]
    original = labels.cpu()[positions].long()
    if exclude_true:  # a uniform shift in [1, C) is a uniform draw among the other classes
        drawn = (original + torch.randint(1, n_classes, (n_noisy,), generator=generator)) % n_classes
    else:
        drawn = torch.randint(0, n_classes, (n_noisy,), generator=generator)
    noisy = labels.clone()
    noisy[positions.to(labels.device)] = drawn.to(device=labels.device, dtype=labels.dtype)
    return NoisyLabels(noisy, noisy != labels)


# ---- applying noise to a dataset ---------------------------------------------------------------
def _label_slot(data: Any) -> tuple[Any, str, int | None]:
    """(object, attribute) holding the class indices of `data`, and the number of classes when known."""
    if hasattr(data, 'train') and hasattr(data, 'valid'):
        raise TypeError("add noise to one half of a split (usually the training half): add_label_noise(ll.train, ...)")
    if hasattr(data, 'targets'):  # torchvision datasets
        classes = getattr(data, 'classes', None)
        return data, 'targets', len(classes) if classes else None
    y = getattr(data, 'y', None)
    if y is not None and hasattr(y, 'items'):  # minilearn LabeledData: y.items are the processed class indices
        vocab = getattr(getattr(data, 'proc_y', None), 'vocab', None)
        return y, 'items', len(vocab) if vocab else None
    if y is not None:  # minilearn Dataset(x, y)
        vocab = getattr(data, 'vocab', None)
        return data, 'y', len(vocab) if vocab else None
    raise TypeError(f"{type(data).__name__} exposes no labels: add_label_noise needs a dataset with `targets` "
                    f"(torchvision style), labelled data with `y.items` (LabeledData) or a Dataset with `y`")


def _like(new: torch.Tensor, old: Any) -> Any:
    """`new` in the container type of `old` (list, numpy array or tensor)."""
    if isinstance(old, torch.Tensor): return new.to(device=old.device, dtype=old.dtype)
    if isinstance(old, np.ndarray): return new.cpu().numpy().astype(old.dtype)
    return new.tolist()


def _copy(labels: Any) -> Any:
    return labels.clone() if isinstance(labels, torch.Tensor) else labels.copy() if isinstance(labels, np.ndarray) \
        else list(labels)


def add_label_noise(data: Any, noise_ratio: float, n_classes: int | None = None, exclude_true: bool = False,
                    generator: torch.Generator | None = None) -> NoisyLabels:
    """Replace a dataset's labels by noisy ones (see `inject_label_noise`), keeping the clean ones in `clean_targets`.

    Works on datasets with `targets` (torchvision; an ImageFolder's `samples` follow), minilearn
    `LabeledData` (its `y.items`) and minilearn `Dataset`s (their `y`). `data.noise_mask` marks the
    changed items. Calling it again starts from the clean labels.
    """
    owner, attr, known_classes = _label_slot(data)
    clean = getattr(data, 'clean_targets', None)
    if clean is None: clean = _copy(getattr(owner, attr))
    result = inject_label_noise(clean, noise_ratio, n_classes if n_classes is not None else known_classes,
                                exclude_true=exclude_true, generator=generator)
    setattr(owner, attr, _like(result.labels, clean))
    samples = getattr(data, 'samples', None)
    if attr == 'targets' and isinstance(samples, list) and len(samples) == len(result.labels):
        samples[:] = [(item[0], int(t)) for item, t in zip(samples, result.labels)]  # in place: `imgs` is the same list
    data.clean_targets, data.noise_mask = clean, result.changed
    return result


# ---- finding label issues ----------------------------------------------------------------------
class LabelIssues(NamedTuple):
    """Items ranked by loss, highest first: dataset indices, losses, given labels and predicted labels."""
    indices: torch.Tensor
    losses: torch.Tensor
    labels: Any
    predicted: torch.Tensor


def find_label_issues(learn: Any, dl: Any = None) -> LabelIssues:
    """Per-item losses of the model over a loader (validation by default), ranked so likely mislabels come first.

    Predictions run in eval mode without MixUp or other training-only callbacks (`get_preds`); pass a
    loader without augmentation, e.g. `DataLoader(learn.data.train_ds, batch_size=256)` for the training set.
    """
    preds, targets, losses = get_preds(learn, dl=dl, with_loss=True)
    order = losses.argsort(descending=True, stable=True)
    predicted = preds.argmax(1) if isinstance(preds, torch.Tensor) and preds.ndim > 1 else preds
    labels = targets[order] if isinstance(targets, torch.Tensor) else [targets[int(i)] for i in order]
    return LabelIssues(order, losses[order], labels, predicted[order])
