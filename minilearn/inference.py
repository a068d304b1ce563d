"""After training: predictions, test-time augmentation, interpretation plots and the model summary."""
from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

from .callback import flag
from .data.core import TensorLoader
from .checks import is_class_index_loss
from .core import batch_size, callable_name, model_device, to_device, unwrap_loss
from .data.items import open_image
from .data.normalize import norm_stats
from .data.sampler import one_batch
from .data.transforms import compose
from .losses import NoneReduce

__all__ = ['get_preds', 'predict', 'tta', 'hflip', 'show_results', 'summary', 'ModelSummary',
           'ClassificationInterpretation', 'inference_callbacks', 'item_to_tensor',
           'decode_prediction']


# ---- helpers shared by every prediction function ------------------------------------------------
def inference_callbacks(learn: Any) -> list:
    """The learner's callbacks that prediction applies too (device move, normalization), in `_order`."""
    return sorted((cb for cb in learn.cbs if flag(cb, 'for_inference')), key=lambda cb: cb._order)


def _prepare_batch(learn: Any, cbs: list, xb: Any, yb: Any) -> tuple[Any, Any]:
    """Run the inference callbacks' `begin_batch` on (xb, yb) through the learner's state."""
    learn.xb, learn.yb = xb, yb
    for cb in cbs: cb('begin_batch')
    device = model_device(learn.model)
    if device is None: return learn.xb, learn.yb
    return to_device(learn.xb, device), to_device(learn.yb, device)


@contextlib.contextmanager
def _inference_state(learn: Any) -> Iterator[None]:
    """Eval mode and `in_train=False` for the block; the modules' modes and the batch state restored after."""
    modes = [(m, m.training) for m in learn.model.modules()]
    saved = {k: getattr(learn, k) for k in ('xb', 'yb', 'pred', 'in_train')}
    learn.model.eval()
    learn.in_train = False
    try:
        yield
    finally:
        for m, training in modes: m.training = training
        for k, v in saved.items(): setattr(learn, k, v)


def _per_item(loss: torch.Tensor, n: int, loss_func: Any) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.ndim == 0 or loss.shape[0] != n:
        raise ValueError(f"per-item losses need the loss with reduction='none' to return one value per item (shape "
                         f"({n}, ...)); {loss_func!r} returned {getattr(loss, 'shape', type(loss).__name__)}. Give "
                         f"the loss a `reduction` attribute or a `reduction` keyword argument")
    return loss.reshape(n, -1).float().mean(1) if loss.ndim > 1 else loss.float()


def _item_losses(item_loss: Callable, pred: Any, yb: Any) -> Any:
    try:
        return item_loss(pred, yb)
    except TypeError as e:
        if 'reduction' not in str(e): raise
        raise TypeError(f"per-item losses need a loss that accepts reduction='none' (an attribute or a keyword "
                        f"argument); calling it so failed: {e}") from e


def _cat(parts: list) -> Any:
    """Concatenate per-batch results along the batch dimension (tensors nested in tuples/lists too)."""
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat([p.reshape(1) if p.ndim == 0 else p for p in parts])
    if isinstance(first, (list, tuple)) and first and all(isinstance(p, torch.Tensor) for p in first):
        return type(first)(_cat([p[i] for p in parts]) for i in range(len(first)))
    return [x for p in parts for x in p]


def _reorder(o: Any, order: torch.Tensor) -> Any:
    if isinstance(o, torch.Tensor): return o[order]
    if isinstance(o, tuple): return tuple(_reorder(x, order) for x in o)
    return [o[i] for i in order.tolist()]


def _cpu(o: Any) -> Any:
    return to_device(o, 'cpu')


def _ordered_loader(dl: Any) -> tuple[Any, torch.Tensor | None]:
    """A loader giving the items of `dl` in dataset order, and the permutation to apply after (or None)."""
    if isinstance(dl, TensorLoader): return dl.ordered(), None
    if not isinstance(dl, DataLoader) or isinstance(dl.dataset, IterableDataset): return dl, None
    if isinstance(dl.sampler, SequentialSampler) and dl.batch_size is not None: return dl, None
    common = dict(num_workers=dl.num_workers, collate_fn=dl.collate_fn, pin_memory=dl.pin_memory,
                  worker_init_fn=dl.worker_init_fn, timeout=dl.timeout)
    if dl.batch_size is not None:  # a plain shuffling sampler: the same batches, sequentially
        return DataLoader(dl.dataset, batch_size=dl.batch_size, shuffle=False, drop_last=False, **common), None
    # A custom batch sampler (bucketing, ...): keep its batches, remember their indices to undo the order.
    batches = [list(b) for b in dl.batch_sampler]
    order = torch.tensor([i for b in batches for i in b]).argsort()
    return DataLoader(dl.dataset, batch_sampler=batches, **common), order


def _check_loader(dl: Any) -> None:
    if dl is None:
        raise ValueError("get_preds needs a DataLoader: this learner's data has no validation loader "
                         "(data.valid_dl is None); pass one with dl=...")
    if not hasattr(dl, '__iter__'):
        raise TypeError(f"dl must be an iterable of (xb, yb) batches (a DataLoader), got {type(dl).__name__}")


def _default_act(learn: Any) -> Callable:
    return functools.partial(F.softmax, dim=1) if is_class_index_loss(learn.loss_func) else (lambda x: x)


# ---- predictions ------------------------------------------------------------------------------
def get_preds(learn: Any, dl: Any = None, with_input: bool = False, with_loss: bool = False,
              act: Callable | None = None, reorder: bool = True) -> tuple:
    """Predictions and targets over a loader (the validation loader by default), in dataset order.

    Returns `(preds, targets)`, `(inputs, preds, targets)` with `with_input`, and the per-item losses
    last with `with_loss`. `act` defaults to softmax for a classification loss, identity otherwise.
    """
    return _run_loader(learn, dl, with_input=with_input, with_loss=with_loss, act=act, reorder=reorder)


def _run_loader(learn: Any, dl: Any, with_input: bool = False, with_loss: bool = False, act: Callable | None = None,
                reorder: bool = True, batch_tfm: Callable | None = None) -> tuple:
    dl = learn.data.valid_dl if dl is None else dl
    _check_loader(dl)
    loader, order = _ordered_loader(dl) if reorder else (dl, None)
    act = _default_act(learn) if act is None else act
    inputs, preds, targets, losses = [], [], [], []
    loss_func = unwrap_loss(learn.loss_func)
    cbs = inference_callbacks(learn)
    with _inference_state(learn), torch.inference_mode(), \
            (NoneReduce(loss_func) if with_loss else contextlib.nullcontext(None)) as item_loss:
        for batch in loader:
            xb, yb = _prepare_batch(learn, cbs, *learn._split_batch(batch))
            if batch_tfm is not None: xb = batch_tfm(xb)
            pred = learn.model(xb)
            preds.append(pred)
            targets.append(yb)
            if with_input: inputs.append(xb)
            if with_loss: losses.append(_per_item(_item_losses(item_loss, pred, yb), batch_size(xb, yb), loss_func))
    if not preds: raise ValueError("get_preds: the DataLoader gave no batches (is the dataset empty?)")
    results = [act(_cat(preds)), _cat(targets)]
    if with_input: results.insert(0, _cat(inputs))
    if with_loss: results.append(_cat(losses))
    results = [_cpu(r) for r in results]
    if order is not None: results = [_reorder(r, order) for r in results]
    return tuple(results)


def hflip(xb: torch.Tensor) -> torch.Tensor:
    """Horizontal flip of an image batch (the last dimension): the default test-time augmentation."""
    return xb.flip(-1)


def tta(learn: Any, dl: Any = None, n: int = 4, beta: float = 0.25, tfm: Callable | None = None) -> tuple:
    """Test-time augmentation: `beta · plain + (1 − beta) · mean of n augmented passes`, as `(preds, targets)`.

    `tfm` (a horizontal flip by default) transforms each model-ready batch (after device move and
    normalization); a random transform gives a different augmentation per pass.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"tta: n (the number of augmented passes) must be an int >= 0, got {n!r}")
    if not 0 <= beta <= 1: raise ValueError(f"tta: beta must lie in [0, 1], got {beta!r}")
    preds, targets = _run_loader(learn, dl)
    if n == 0: return preds, targets
    tfm = hflip if tfm is None else tfm
    augmented = torch.stack([_run_loader(learn, dl, batch_tfm=tfm)[0] for _ in range(n)]).mean(0)
    return beta * preds + (1 - beta) * augmented, targets


# ---- one item -----------------------------------------------------------------------------------
def item_to_tensor(item: Any, item_tfms: Any, what: str = 'the learner') -> torch.Tensor:
    """A raw item (path, PIL image or model-ready tensor) as a model-ready tensor, without the batch dimension.

    Paths are opened like `ImageList` does; the item transforms run in the data pipeline's order.
    """
    if isinstance(item, torch.Tensor): return item
    if isinstance(item, (str, Path)):
        if not Path(item).is_file(): raise FileNotFoundError(f"predict: no file at {str(item)!r}")
        item = open_image(item)
    if item_tfms is None:
        raise ValueError(f"predict needs the item transforms to turn a {type(item).__name__} into a tensor, and "
                         f"{what} has none (data.item_tfms is None). Pass a model-ready tensor instead, or set "
                         f"learn.data.item_tfms (e.g. [make_rgb, ResizeFixed(128), to_byte_tensor, to_float_tensor])")
    item = compose(item, item_tfms)
    if not isinstance(item, torch.Tensor):
        raise TypeError(f"the item transforms gave a {type(item).__name__}, not a tensor; end them with "
                        f"to_byte_tensor and to_float_tensor (or torchvision's ToTensor)")
    return item


def decode_prediction(probs: torch.Tensor, vocab: Any, classification: bool) -> tuple:
    """(label, class_index, probabilities) from one item's activations; for other losses (output, None, output)."""
    if not classification: return probs, None, probs
    index = int(probs.argmax())
    return (vocab[index] if vocab is not None else index), index, probs


def predict(learn: Any, item: Any) -> tuple:
    """`(label, class_index, probabilities)` for one raw item: a path, a PIL image, or a model-ready tensor.

    Paths and PIL images go through `learn.data.item_tfms`; every item then through the inference
    callbacks (device, normalization). The label is decoded through `learn.data.vocab` when there is one.
    """
    x = item_to_tensor(item, getattr(learn.data, 'item_tfms', None))
    cbs = inference_callbacks(learn)
    with _inference_state(learn), torch.inference_mode():
        xb, _ = _prepare_batch(learn, cbs, x[None], None)
        out = learn.model(xb)
    probs = _cpu(_default_act(learn)(out))[0]
    return decode_prediction(probs, getattr(learn.data, 'vocab', None), is_class_index_loss(learn.loss_func))


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


def _grid(n: int, figsize_per: float = 2.5):
    import matplotlib.pyplot as plt  # local: pyplot is slow to import and only plotting needs it
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * figsize_per, rows * figsize_per), squeeze=False)
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


def show_results(learn: Any, n: int = 9, dl: Any = None):
    """A grid of the first `n` validation images titled predicted/actual (green when right); returns the figure."""
    dl = learn.data.valid_dl if dl is None else dl
    _check_loader(dl)
    inputs, preds, targets = _run_loader(learn, _head_loader(dl, n), with_input=True)
    vocab, stats = getattr(learn.data, 'vocab', None), norm_stats(learn)
    n = min(n, len(preds))
    fig, axes = _grid(n)
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

    def plot_confusion_matrix(self, normalize: bool = False, cmap: str = 'Blues'):
        """The confusion matrix with class names and counts (row-normalized fractions with `normalize`); a Figure."""
        import matplotlib.pyplot as plt  # local: pyplot is slow to import and only plotting needs it
        cm = self.confusion_matrix().float()
        if normalize: cm = cm / cm.sum(1, keepdim=True).clamp_min(1)
        size = max(4., 0.6 * self.n_classes + 2)
        fig, ax = plt.subplots(figsize=(size, size))
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
        ax.set_title('Confusion matrix')
        fig.tight_layout()
        return fig

    def plot_top_losses(self, k: int = 9, largest: bool = True):
        """The `k` items with the top losses, titled predicted/actual/loss/probability of the prediction; a Figure."""
        if self.inputs is None: raise ValueError("plot_top_losses needs the inputs (build with from_learner)")
        losses, indices = self.top_losses(k, largest=largest)
        fig, axes = _grid(len(indices), figsize_per=3.)
        for ax, loss, i in zip(axes, losses.tolist(), indices.tolist()):
            image, cmap = _image_for_display(self.inputs[i], self.norm_stats)
            ax.imshow(image.numpy(), cmap=cmap)
            predicted, actual = int(self.pred_classes[i]), int(self.targets[i])
            ax.set_title(f'{_class_name(self.vocab, predicted)}/{_class_name(self.vocab, actual)}\n'
                         f'{loss:.2f} / {float(self.preds[i, predicted]):.2f}', fontsize=9)
        fig.suptitle('Prediction/Actual\nLoss/Probability')
        fig.tight_layout()
        return fig


# ---- summary --------------------------------------------------------------------------------------
class ModelSummary(str):
    """The summary table as text; also `rows` (one dict per layer), `total_params` and `trainable_params`."""
    rows: list[dict]
    total_params: int
    trainable_params: int

    def __repr__(self) -> str:
        return str(self)


def _first_batch(dl: Any) -> Any:
    """The first batch in dataset order, without drawing from the global random generator."""
    if isinstance(dl, TensorLoader): dl = dl.head(dl.batch_size)
    if isinstance(dl, DataLoader) and not isinstance(dl.dataset, IterableDataset) and dl.batch_size:
        items = [dl.dataset[i] for i in range(min(dl.batch_size, len(dl.dataset)))]
        if not items: raise ValueError("summary: the training dataset is empty")
        return dl.collate_fn(items)
    return one_batch(dl)


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
