"""Looking at a classifier's predictions: `show_results` (a grid of images titled predicted/actual) and
`ClassificationInterpretation` (confusion matrix, most confused pairs, top losses, and their plots)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from .checks import is_class_index_loss
from .data.core import TensorLoader
from .data.normalize import norm_stats
from .predictions import _check_loader, _run_loader, get_preds

__all__ = ['show_results', 'ClassificationInterpretation']


# ---- showing images -------------------------------------------------------------------------------
def _image_for_display(x: torch.Tensor, stats: tuple | None) -> tuple[torch.Tensor, str | None]:
    """An (H, W) or (H, W, 3) array in [0, 1] from a model-ready input, undoing normalization when known."""
    x = x.detach().float().cpu()
    if x.ndim == 1 and round(x.numel() ** 0.5) ** 2 == x.numel():  # flat square images (MNIST vectors)
        side = round(x.numel() ** 0.5)
        x = x.reshape(1, side, side)
    if x.ndim == 2: x = x[None]
    if x.ndim != 3 or x.shape[0] not in (1, 3):
        raise ValueError(f"cannot show an input of shape {tuple(x.shape)} as an image: expected (C, H, W) with "
                         f"1 or 3 channels")
    if stats is not None and stats[0].numel() in (1, x.shape[0]):
        mean, std = (s.reshape(-1, 1, 1) for s in stats)
        x = x * std + mean
    x = x.clamp(0, 1)
    return (x[0], 'gray') if x.shape[0] == 1 else (x.permute(1, 2, 0), None)


def _grid(n: int, figsize_per: float = 2.5, figsize: tuple | None = None):
    import matplotlib.pyplot as plt  # local: pyplot is slow to import and only plotting needs it
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    figsize = figsize or (cols * figsize_per, rows * figsize_per)
    fig, axes = plt.subplots(rows, cols, figsize=figsize, squeeze=False)
    axes = axes.flatten()
    for ax in axes: ax.axis('off')
    return fig, axes


def _class_name(vocab: Any, index: int) -> str:
    return str(vocab[index]) if vocab is not None else str(index)


def _head_loader(dl: Any, n: int) -> Any:
    """A loader over the first `n` items of `dl`'s dataset (dataset order), or `dl` when it cannot be cut."""
    if isinstance(dl, TensorLoader): return dl.head(n)
    if not isinstance(dl, DataLoader) or isinstance(dl.dataset, IterableDataset): return dl
    from torch.utils.data import Subset
    subset = Subset(dl.dataset, range(min(n, len(dl.dataset))))
    return DataLoader(subset, batch_size=dl.batch_size or n, shuffle=False, collate_fn=dl.collate_fn)


def show_results(learn: Any, n: int = 9, dl: Any = None, figsize: tuple | None = None):
    """A grid of the first `n` validation images titled predicted/actual (green when right); returns the figure."""
    dl = learn.data.valid_dl if dl is None else dl
    _check_loader(dl)
    inputs, preds, targets = _run_loader(learn, _head_loader(dl, n), with_input=True)
    vocab, stats = getattr(learn.data, 'vocab', None), norm_stats(learn)
    n = min(n, len(preds))
    fig, axes = _grid(n, figsize=figsize)
    for i, ax in enumerate(axes[:n]):
        image, cmap = _image_for_display(inputs[i], stats)
        ax.imshow(image.numpy(), cmap=cmap)
        predicted, actual = int(preds[i].argmax()), int(targets[i])
        ax.set_title(f'{_class_name(vocab, predicted)}/{_class_name(vocab, actual)}',
                     color='green' if predicted == actual else 'red')
    fig.suptitle('predicted/actual')
    fig.tight_layout()
    return fig


# ---- interpretation ---------------------------------------------------------------------------
class ClassificationInterpretation:
    """Where a classifier goes wrong: confusion matrix, most confused pairs and the items with the top losses."""

    def __init__(self, inputs: Any, preds: torch.Tensor, targets: torch.Tensor, losses: torch.Tensor,
                 vocab: Any = None, norm_stats: tuple | None = None):
        if preds.ndim != 2:
            raise ValueError(f"ClassificationInterpretation needs (N, n_classes) predictions, got {tuple(preds.shape)}")
        self.inputs, self.preds, self.targets, self.losses = inputs, preds, targets.long(), losses
        self.vocab, self.norm_stats = vocab, norm_stats
        self.pred_classes = preds.argmax(1)

    @classmethod
    def from_learner(cls, learn: Any, dl: Any = None) -> ClassificationInterpretation:
        """Predictions, targets and per-item losses of the learner over `dl` (validation by default)."""
        if not is_class_index_loss(learn.loss_func):
            raise ValueError(f"ClassificationInterpretation needs a classification loss (cross-entropy on class "
                             f"indices); the learner's loss is {learn.loss_func!r}")
        inputs, preds, targets, losses = get_preds(learn, dl, with_input=True, with_loss=True)
        return cls(inputs, preds, targets, losses, getattr(learn.data, 'vocab', None), norm_stats(learn))

    @property
    def n_classes(self) -> int:
        return self.preds.shape[1]

    @property
    def class_names(self) -> list[str]:
        return [_class_name(self.vocab, i) for i in range(self.n_classes)]

    def confusion_matrix(self) -> torch.Tensor:
        """Counts as an (n_classes, n_classes) tensor: rows are the actual classes, columns the predicted ones."""
        c = self.n_classes
        return torch.bincount(self.targets * c + self.pred_classes, minlength=c * c).reshape(c, c)

    def most_confused(self, min_val: int = 1) -> list[tuple[str, str, int]]:
        """`(actual, predicted, count)` of the off-diagonal cells with at least `min_val` items, most first."""
        cm = self.confusion_matrix()
        cm.fill_diagonal_(0)
        names = self.class_names
        cells = [(names[a], names[p], int(cm[a, p])) for a in range(self.n_classes) for p in range(self.n_classes)
                 if cm[a, p] >= min_val and a != p]
        return sorted(cells, key=lambda cell: -cell[2])

    def top_losses(self, k: int | None = None, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """`(losses, indices)` of the `k` items with the largest (or smallest) loss, all items when k is None."""
        k = len(self.losses) if k is None else min(k, len(self.losses))
        return self.losses.topk(k, largest=largest)

    def plot_confusion_matrix(self, normalize: bool = False, cmap: str = 'Blues', figsize: tuple | None = None):
        """The confusion matrix with class names and counts (row-normalized fractions with `normalize`); a Figure."""
        import matplotlib.pyplot as plt  # local: pyplot is slow to import and only plotting needs it
        cm = self.confusion_matrix().float()
        if normalize: cm = cm / cm.sum(1, keepdim=True).clamp_min(1)
        size = max(4., 0.6 * self.n_classes + 2)
        fig, ax = plt.subplots(figsize=figsize or (size, size))
        ax.imshow(cm.numpy(), interpolation='nearest', cmap=cmap)
        ticks = range(self.n_classes)
        ax.set_xticks(ticks, self.class_names, rotation=90)
        ax.set_yticks(ticks, self.class_names)
        threshold = cm.max() / 2
        for a in ticks:
            for p in ticks:
                value = cm[a, p]
                ax.text(p, a, f'{value:.2f}' if normalize else f'{int(value)}', ha='center', va='center',
                        color='white' if value > threshold else 'black')
        ax.set_xlabel('Predicted')
        ax.set_ylabel('Actual')
        ax.set_title('Confusion matrix, normalized: fraction of each actual class' if normalize
                     else 'Confusion matrix: counts')
        fig.tight_layout()
        return fig

    def plot_top_losses(self, k: int = 9, largest: bool = True, figsize: tuple | None = None):
        """The `k` items with the top losses, titled predicted/actual/loss/probability of the prediction; a Figure."""
        if self.inputs is None: raise ValueError("plot_top_losses needs the inputs (build with from_learner)")
        losses, indices = self.top_losses(k, largest=largest)
        fig, axes = _grid(len(indices), figsize_per=3., figsize=figsize)
        for ax, loss, i in zip(axes, losses.tolist(), indices.tolist()):
            image, cmap = _image_for_display(self.inputs[i], self.norm_stats)
            ax.imshow(image.numpy(), cmap=cmap)
            predicted, actual = int(self.pred_classes[i]), int(self.targets[i])
            ax.set_title(f'{_class_name(self.vocab, predicted)}/{_class_name(self.vocab, actual)}\n'
                         f'{loss:.2f} / {float(self.preds[i, predicted]):.2f}', fontsize=9)
        fig.suptitle('Prediction/Actual\nLoss/Probability')
        fig.tight_layout()
        return fig
