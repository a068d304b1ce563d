"""Predictions of a trained learner: `get_preds` over a loader (in dataset order, with inputs and per-item
losses on request), test-time augmentation (`tta`), and `predict` for one raw item; the helpers every
inference-time pass shares (eval mode, the learner's inference callbacks, a batch in dataset order)."""
from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, SequentialSampler

from .callback import flag
from .data.core import TensorLoader
from .checks import is_class_index_loss
from .core import batch_size, model_device, to_device, unwrap_loss
from .data.items import open_image
from .data.sampler import one_batch
from .data.transforms import compose
from .losses import NoneReduce

__all__ = ['get_preds', 'predict', 'tta', 'hflip', 'inference_callbacks', 'item_to_tensor', 'decode_prediction']


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


def _first_batch(dl: Any) -> Any:
    """The first batch in dataset order, without drawing from the global random generator."""
    if isinstance(dl, TensorLoader): dl = dl.head(dl.batch_size)
    if isinstance(dl, DataLoader) and not isinstance(dl.dataset, IterableDataset) and dl.batch_size:
        items = [dl.dataset[i] for i in range(min(dl.batch_size, len(dl.dataset)))]
        if not items: raise ValueError("summary: the training dataset is empty")
        return dl.collate_fn(items)
    return one_batch(dl)


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
