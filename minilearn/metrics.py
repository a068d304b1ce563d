"""Metric functions of tensors: `accuracy`, averaged over batches, and the scores of a whole pass's predictions
(precision, recall and F1 averaged as scikit-learn does, balanced accuracy, top-k accuracy) behind
`f1_score()`, `balanced_accuracy()`... of `minilearn.callbacks.metrics`, which keeps them per epoch.

The whole-pass scores are written here rather than taken from torchmetrics or scikit-learn so that minilearn
depends on neither: they run on the predictions' device, in a few tensor operations, once per pass.
"""
from __future__ import annotations

import torch

__all__ = ['accuracy']


def accuracy(out: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """Fraction of items whose highest score is the target class ((N, C, ...) scores, (N, ...) targets)."""
    return (out.argmax(dim=1) == yb).float().mean()


# ---- scores of a whole pass (AccumMetric calls them on every prediction of the pass) ------------------
def _class_predictions(preds: torch.Tensor, targets: torch.Tensor, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted classes, targets), flattened: argmax over dim 1 of (N, C, ...) scores against (N, ...) indices."""
    if preds.ndim < 2 or preds.shape[1] < 2:
        raise ValueError(f"{who} needs scores of shape (N, C, ...) with C >= 2 classes, got shape "
                         f"{tuple(preds.shape)}; "
                         f"for one output per item give the model two outputs, or pass AccumMetric(your_function)")
    expected = (preds.shape[0],) + tuple(preds.shape[2:])
    if tuple(targets.shape) != expected or targets.is_floating_point():
        raise ValueError(f"{who} needs integer class indices of shape {expected} for scores of shape "
                         f"{tuple(preds.shape)}, got {targets.dtype} targets of shape {tuple(targets.shape)}")
    return preds.argmax(dim=1).reshape(-1), targets.reshape(-1)


def _confusion(preds: torch.Tensor, targets: torch.Tensor, who: str) -> torch.Tensor:
    """(C, C) counts, rows the targets and columns the predictions; targets outside [0, C) (ignore_index) left out."""
    predicted, targets = _class_predictions(preds, targets, who)
    n = preds.shape[1]
    kept = (targets >= 0) & (targets < n)
    index = torch.where(kept, targets * n + predicted, n * n)  # left-out items land in a spare bin
    return torch.bincount(index, minlength=n * n + 1)[:n * n].reshape(n, n)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return num / den.clamp(min=1)  # 0 where the denominator is 0 (scikit-learn's zero_division=0)


def _per_class_average(scores: torch.Tensor, cm: torch.Tensor, average: str) -> torch.Tensor:
    support, predicted = cm.sum(1).double(), cm.sum(0).double()
    if average == 'weighted': return (scores * support).sum() / support.sum().clamp(min=1)
    seen = ((support + predicted) > 0).double()  # classes among the targets or the predictions, as scikit-learn
    return (scores * seen).sum() / seen.sum().clamp(min=1)


def _score(preds: torch.Tensor, targets: torch.Tensor, kind: str, average: str) -> torch.Tensor:
    """Precision, recall or F1 of the class predictions, averaged over classes as scikit-learn does."""
    cm = _confusion(preds, targets, f'{kind}_score')
    tp, support, predicted = cm.diag().double(), cm.sum(1).double(), cm.sum(0).double()
    if average == 'micro':  # every item counted once: precision = recall = F1 = accuracy over the counted items
        tp, support, predicted = tp.sum(), support.sum(), predicted.sum()
    scores = {'precision': lambda: _ratio(tp, predicted), 'recall': lambda: _ratio(tp, support),
              'f1': lambda: _ratio(2 * tp, support + predicted)}[kind]()
    return scores if average == 'micro' else _per_class_average(scores, cm, average)


def _balanced_accuracy(preds: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    cm = _confusion(preds, targets, 'balanced_accuracy')
    support = cm.sum(1).double()
    present = (support > 0).double()  # the mean recall over the classes that occur among the targets
    return (_ratio(cm.diag().double(), support) * present).sum() / present.sum().clamp(min=1)


def _top_k_accuracy(preds: torch.Tensor, targets: torch.Tensor, k: int) -> torch.Tensor:
    _class_predictions(preds, targets, f'top_{k}_accuracy')
    if k > preds.shape[1]:
        raise ValueError(f"top_k_accuracy(k={k}) needs at least {k} classes; the model outputs {preds.shape[1]}")
    top = preds.topk(k, dim=1).indices
    return (top == targets.unsqueeze(1)).any(dim=1).double().mean()
