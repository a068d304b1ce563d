"""The tensor cache: labelled items read and transformed once into two tensors held in memory
(`LabeledData.to_tensors`, `SplitData.to_tensors`), and the DataBunch that trains from them
(`to_databunch(cache=True)`, which builds a `DataBunch.from_tensors`)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from fastprogress.fastprogress import IN_NOTEBOOK, ConsoleProgressBar, NBProgressBar
from torch.utils.data import DataLoader

from ..core import is_interactive
from .core import DataBunch, _draw_seed
from .transforms import order_tfms, to_float_tensor

if TYPE_CHECKING:
    from .items import LabeledData

__all__ = ['decode_tensors', 'cached_databunch']


def decode_tensors(data: LabeledData, num_workers: int = 0, bs: int = 256, progress: bool | None = None,
                   as_stored: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) of `data` decoded once, as `LabeledData.to_tensors` documents; `as_stored`: its inputs read each
    entry as it is stored (`ItemList.get`), so tensor entries without transforms are returned as they are."""
    if len(data) == 0: raise ValueError("to_tensors: the labelled data is empty")
    tfms = order_tfms(data.x.tfms)
    if tfms and tfms[-1] is to_float_tensor: tfms = tfms[:-1]  # keep bytes
    if (not tfms and isinstance(data.x.items, torch.Tensor) and as_stored
            and not data.y.tfms):  # already tensors (CIFAR batches, MNIST): nothing to decode
        x = data.x.items
        if x.ndim == 4: x = x.contiguous(memory_format=torch.channels_last)
        return x, torch.as_tensor(data.y.items)
    source = _Decoding(data, tfms)  # tfms already in their running order
    dl = DataLoader(source, batch_size=bs, shuffle=False, num_workers=num_workers, collate_fn=_stack_items)
    if progress is None: progress = is_interactive()
    bar = (NBProgressBar if IN_NOTEBOOK else ConsoleProgressBar)(dl, leave=False) if progress else dl
    x = y = None
    start = 0
    for xb, yb in bar:
        if x is None:  # sized from the first batch; filled in place, so memory stays at the data's size
            fmt = torch.channels_last if xb.ndim == 4 else torch.contiguous_format
            x = torch.empty((len(data), *xb.shape[1:]), dtype=xb.dtype, memory_format=fmt)
            y = torch.empty((len(data), *yb.shape[1:]), dtype=yb.dtype)
        if xb.shape[1:] != x.shape[1:]: _different_shapes({tuple(x.shape[1:]), tuple(xb.shape[1:])})
        x[start:start + len(xb)] = xb
        y[start:start + len(yb)] = yb
        start += len(xb)
    return x, y


class _Decoding:
    """Labelled data read through `tfms` (in order) instead of its own input transforms (picklable, for workers)."""

    def __init__(self, data: LabeledData, tfms: list):
        self.x, self.tfms = data.x, tfms
        y = data.y
        self.y = y.items if not y.tfms and isinstance(y.items, (list, torch.Tensor)) else y  # plain labels: no _get

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        raw = self.x.items[i]
        item = self.x.get(raw)
        try:
            for tfm in self.tfms: item = tfm(item)
        except Exception as e:
            if hasattr(e, 'add_note'): e.add_note(f"while transforming item {i} ({raw!r})")
            raise
        return item, self.y[i]


def _stack_items(items: list) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*items)
    for name, values in (('input', xs), ('target', ys)):
        bad = next((v for v in values if not isinstance(v, (torch.Tensor, int, float))), None)
        if bad is not None:
            raise TypeError(f"to_tensors: every {name} must be a tensor or a number after the transforms, got "
                            f"{type(bad).__name__}; end the input transforms with to_byte_tensor (and to_float_tensor)")
    xs = [torch.as_tensor(v) for v in xs]
    shapes = {tuple(v.shape) for v in xs}
    if len(shapes) > 1: _different_shapes(shapes)
    return torch.stack(xs), torch.as_tensor(ys)


def _different_shapes(shapes: set) -> None:
    raise ValueError(f"to_tensors: items of different shapes {sorted(shapes)[:4]}; resize them to one size "
                     f"in the transforms (ResizeFixed(size)) before decoding into tensors")


def cached_databunch(train: LabeledData, valid: LabeledData | None, bs: int, c_in: int | None, c_out: int | None,
                      vocab: list | None, item_tfms: list, device: Any, dl_kwargs: dict) -> DataBunch:
    unknown = set(dl_kwargs) - {'num_workers', 'generator', 'seed', 'shuffle', 'drop_last', 'progress'}
    if unknown:
        raise TypeError(f"to_databunch(cache=True) takes num_workers, seed (or generator), drop_last and progress; "
                        f"{sorted(unknown)} apply to DataLoaders only (cache=False)")
    workers, progress = dl_kwargs.get('num_workers', 0), dl_kwargs.get('progress')
    seed, generator = dl_kwargs.get('seed'), dl_kwargs.get('generator')
    if seed is None and generator is not None: seed = _draw_seed(generator)
    x_train, y_train = train.to_tensors(workers, progress=progress)
    x_valid, y_valid = (None, None) if valid is None else valid.to_tensors(workers, progress=progress)
    return DataBunch.from_tensors(x_train, y_train, x_valid, y_valid, bs=bs,
                                  drop_last=dl_kwargs.get('drop_last', False), device=device, c_in=c_in, c_out=c_out,
                                  vocab=vocab, item_tfms=item_tfms, seed=seed)


