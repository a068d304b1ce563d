"""Item lists: find files, split them, label them, and turn them into a DataBunch (course-v3 08/10b).

    tfms = [make_rgb, ResizeFixed(128), to_byte_tensor, to_float_tensor]
    il = ImageList.from_files(path, tfms=tfms)
    sd = SplitData.split_by_func(il, partial(grandparent_splitter, valid_name='val'))
    ll = label_by_func(sd, parent_labeler, proc_y=CategoryProcessor())
    data = ll.to_databunch(bs, c_in=3, c_out=10, num_workers=4)

`ll` is a `SplitData` whose `train` and `valid` are `LabeledData` (`ll.train.x`, `ll.train.y.items`
holds the processed class indices). Everything here is picklable, so DataLoader workers can use it
under any start method. `to_tensors` and `to_databunch(cache=True)` decode the items once into memory
(`minilearn.data.cache`).
"""
from __future__ import annotations

import mimetypes
import os
import random
from collections.abc import Callable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from ..core import listify
from .cache import cached_databunch, decode_tensors
from .core import DataBunch, get_dls
from .transforms import compose

__all__ = ['image_extensions', 'get_files', 'ItemList', 'ImageList', 'open_image', 'SplitData', 'split_by_func',
           'grandparent_splitter', 'random_splitter', 'Processor', 'CategoryProcessor', 'LabeledData',
           'label_by_func', 'parent_labeler', 'uniqueify', 'label_image_folder']

image_extensions = frozenset(k for k, v in mimetypes.types_map.items() if v.startswith('image/'))


def _normalize_extensions(extensions: Any) -> frozenset[str] | None:
    if extensions is None: return None
    exts = {e.lower() if e.startswith('.') else f'.{e.lower()}' for e in listify(extensions)}
    return frozenset(exts) or None


def _extension(name: str) -> str:
    dot = name.rfind('.')
    return name[dot:].lower() if dot > 0 else ''


def _scan(folder: Path, exts: frozenset[str] | None, recurse: bool, include: set | None,
          seen: set, out: list[Path]) -> None:
    is_dir: dict[str, bool] = {}
    with os.scandir(folder) as entries:
        for entry in entries:  # the entry's type comes from the directory listing: no stat per file
            name = entry.name
            if name.startswith('.'): continue
            if entry.is_dir():
                if recurse and (include is None or name in include): is_dir[name] = True
            elif (exts is None or _extension(name) in exts) and entry.is_file():
                is_dir[name] = False
    # Names in sorted order, descending into folders where they fall: the order of sorted(paths).
    for name in sorted(is_dir):
        path = folder / name
        if not is_dir[name]:
            out.append(path)
            continue
        st = path.stat()
        if (st.st_dev, st.st_ino) in seen: continue  # a symlink loop
        seen.add((st.st_dev, st.st_ino))
        _scan(path, exts, recurse, None, seen, out)


def get_files(path: str | Path, extensions: Any = None, recurse: bool = True, include: Any = None) -> list[Path]:
    """Sorted paths of the files under `path` with one of `extensions`, skipping hidden ones.

    `include` names the top-level folders to descend into (all of them when None).
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"get_files: {str(path)!r} is not a folder")
    found: list[Path] = []
    st = path.stat()
    _scan(path, _normalize_extensions(extensions), recurse, None if include is None else set(listify(include)),
          {(st.st_dev, st.st_ino)}, found)
    return found


def _is_mask(idx: Any) -> bool:
    if isinstance(idx, (torch.Tensor, np.ndarray)): return idx.dtype in (torch.bool, np.bool_)
    return len(idx) > 0 and isinstance(idx[0], (bool, np.bool_))


class ItemList:
    """A list of items with the transforms applied when an item is read (`il[i]`).

    Indexing takes an int, a slice, a boolean mask or a list/array of indices; all but an int give a
    list of transformed items. `items` may be a list or an (N, ...) tensor.
    """

    def __init__(self, items: Any, path: str | Path = '.', tfms: Any = None):
        self.items = items if isinstance(items, (torch.Tensor, np.ndarray)) else list(items)
        self.path, self.tfms = Path(path), listify(tfms)

    def new(self, items: Any, cls: type | None = None) -> ItemList:
        """An item list of the same kind (path and transforms) holding `items`."""
        return (cls or type(self))(items, self.path, tfms=self.tfms)

    def get(self, item: Any) -> Any:
        """The raw item behind a stored entry (the entry itself here; `ImageList` opens a file)."""
        return item

    def _get(self, item: Any) -> Any:
        x = self.get(item)
        if not self.tfms: return x
        try:
            return compose(x, self.tfms)
        except Exception as e:
            if hasattr(e, 'add_note'): e.add_note(f"while transforming item {item if not isinstance(item, torch.Tensor) else 'tensor'}")
            raise

    def __len__(self) -> int:
        return len(self.items)

    def __iter__(self) -> Iterator[Any]:
        for i in range(len(self)): yield self[i]

    def __getitem__(self, idx: Any) -> Any:
        if isinstance(idx, (int, np.integer)) or (isinstance(idx, torch.Tensor) and idx.ndim == 0):
            return self._get(self.items[int(idx)])
        if isinstance(idx, slice): return [self._get(o) for o in self.items[idx]]
        if _is_mask(idx):
            if len(idx) != len(self):
                raise IndexError(f"boolean mask of length {len(idx)} for an item list of length {len(self)}")
            return [self._get(o) for o, keep in zip(self.items, idx) if keep]
        return [self._get(self.items[int(i)]) for i in idx]

    def __setitem__(self, idx: int | slice, value: Any) -> None:
        self.items[idx] = value

    def __repr__(self) -> str:
        shown = ', '.join(repr(o) if not isinstance(o, torch.Tensor) else f'tensor{tuple(o.shape)}'
                          for o in self.items[:5])
        more = ', ...' if len(self) > 5 else ''
        return f'{type(self).__name__} ({len(self)} items)\n[{shown}{more}]\nPath: {self.path}'


def open_image(fn: str | Path) -> PIL.Image.Image:
    """Open and decode an image file with PIL; an unreadable file raises OSError naming it."""
    try:
        im = PIL.Image.open(fn)
        im.load()  # decode now, so a truncated file fails here, naming its path
    except (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError) as e:
        raise OSError(f"cannot open image {str(fn)!r}: {e}") from e
    return im


class ImageList(ItemList):
    """An item list of image files, opened with PIL when read."""

    @classmethod
    def from_files(cls, path: str | Path, extensions: Any = None, recurse: bool = True, include: Any = None,
                   **kwargs: Any) -> ImageList:
        """Every image file under `path` (see `get_files`); `tfms=` gives the item transforms."""
        if extensions is None: extensions = image_extensions
        return cls(get_files(path, extensions, recurse=recurse, include=include), path, **kwargs)

    def get(self, fn: str | Path) -> PIL.Image.Image:
        return open_image(fn)


# ---- splitting ---------------------------------------------------------------------------------

def grandparent_splitter(fn: str | Path, valid_name: str = 'valid', train_name: str = 'train') -> bool | None:
    """True for `.../valid_name/<cls>/file`, False for `.../train_name/<cls>/file`, None (dropped) otherwise."""
    gp = os.path.basename(os.path.dirname(os.path.dirname(fn)))
    return True if gp == valid_name else False if gp == train_name else None


def random_splitter(fn: Any, p_valid: float = 0.2, seed: int | None = None) -> bool:
    """True (validation) with probability `p_valid`; with a `seed`, the same answer for the same item every time."""
    if not 0 <= p_valid <= 1: raise ValueError(f"p_valid must lie in [0, 1], got {p_valid}")
    draw = random.random() if seed is None else random.Random(f'{seed}:{fn}').random()
    return draw < p_valid


def split_by_func(items: Sequence, f: Callable[[Any], bool | None]) -> tuple[list, list]:
    """(train, valid) items: `f(item)` False -> train, True -> valid, None -> left out."""
    mask = [f(o) for o in items]
    train = [o for o, m in zip(items, mask) if m is not None and not m]
    valid = [o for o, m in zip(items, mask) if m is not None and m]
    return train, valid


class SplitData:
    """A training and a validation item list (attribute reads fall through to `train`)."""

    def __init__(self, train: Any, valid: Any):
        self.train, self.valid = train, valid

    def __getattr__(self, name: str) -> Any:
        if name.startswith('__') or 'train' not in self.__dict__:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        return getattr(self.__dict__['train'], name)

    @classmethod
    def split_by_func(cls, il: ItemList, f: Callable[[Any], bool | None]) -> SplitData:
        """Split an item list with `f` (see `split_by_func`)."""
        return cls(*map(il.new, split_by_func(il.items, f)))

    def _check_labelled(self) -> None:
        for name, part in (('train', self.train), ('valid', self.valid)):
            if not isinstance(part, LabeledData):
                raise TypeError(f"SplitData.{name} is a {type(part).__name__}, not labelled data: label the split "
                                f"first, e.g. label_by_func(sd, parent_labeler, proc_y=CategoryProcessor())")

    def to_tensors(self, num_workers: int = 0, bs: int = 256, progress: bool | None = None
                   ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """((x_train, y_train), (x_valid, y_valid)): both halves decoded once (see `LabeledData.to_tensors`)."""
        self._check_labelled()
        return (self.train.to_tensors(num_workers, bs, progress=progress),
                self.valid.to_tensors(num_workers, bs, progress=progress))

    def to_databunch(self, bs: int, c_in: int | None = None, c_out: int | None = None, cache: bool = False,
                     device: torch.device | str | None = None, **dl_kwargs: Any) -> DataBunch:
        """A DataBunch (train shuffled, valid at 2·bs) with `vocab` and the validation inputs' `item_tfms`.

        `cache=True` decodes every item once (`to_tensors`, with `num_workers`) and trains from memory
        (`DataBunch.from_tensors`, resident on `device` when given, shuffled with `seed`, or a seed drawn
        from `generator`); otherwise DataLoaders read the items every epoch.
        """
        self._check_labelled()
        vocab = getattr(self.train.proc_y, 'vocab', None)
        if c_out is None and vocab is not None: c_out = len(vocab)
        if cache:
            return cached_databunch(self.train, self.valid, bs, c_in, c_out, vocab, self.valid.x.tfms, device,
                                    dl_kwargs)
        if device is not None: raise ValueError("device= needs cache=True (DataLoaders leave batches on the CPU; "
                                                "a DeviceCallback moves them)")
        return DataBunch(*get_dls(self.train, self.valid, bs, **dl_kwargs), c_in=c_in, c_out=c_out,
                         vocab=vocab, item_tfms=self.valid.x.tfms)

    def __repr__(self) -> str:
        return f'{type(self).__name__}\nTrain: {self.train}\nValid: {self.valid}\n'


# ---- labelling ---------------------------------------------------------------------------------

def uniqueify(x: Sequence, sort: bool = False) -> list:
    """The distinct values of `x` in first-seen order (sorted when `sort`)."""
    res = list(dict.fromkeys(x))
    if sort: res.sort()
    return res


class Processor:
    """Turns a whole list of items into another once, before training (and back with `deprocess`)."""

    def __call__(self, items: Sequence) -> list:
        return self.process(items)

    def process(self, items: Sequence) -> list:
        return list(items)

    def deprocess(self, items: Sequence) -> list:
        return list(items)


class CategoryProcessor(Processor):
    """Labels -> class indices. The vocab (sorted labels) comes from the first list processed: the training set."""

    def __init__(self, vocab: Sequence | None = None):
        self.vocab: list | None = None
        self.otoi: dict = {}
        if vocab is not None: self.set_vocab(vocab)

    def set_vocab(self, vocab: Sequence) -> None:
        """Fix the class names (index order)."""
        self.vocab = list(vocab)
        self.otoi = {v: i for i, v in enumerate(self.vocab)}

    def process(self, items: Sequence) -> list[int]:
        if self.vocab is None:
            labels = uniqueify(items)
            try:
                labels.sort()
            except TypeError:
                pass  # labels of mixed types keep first-seen order
            self.set_vocab(labels)
        otoi = self.otoi
        try:
            return [otoi[o] for o in items]
        except KeyError:
            unknown = uniqueify(o for o in items if o not in otoi)
            raise ValueError(f"label(s) {unknown[:10]} not in the vocab learned from the training set "
                             f"{self.vocab[:20]}: every validation class needs training examples "
                             f"(or give CategoryProcessor(vocab=...) explicitly)") from None

    def proc1(self, item: Any) -> int:
        if self.vocab is None: raise ValueError("CategoryProcessor has no vocab yet: process the training labels first")
        return self.process([item])[0]

    def deprocess(self, idxs: Sequence) -> list:
        if self.vocab is None: raise ValueError("CategoryProcessor has no vocab yet: process the training labels first")
        return [self.deproc1(i) for i in idxs]

    def deproc1(self, idx: Any) -> Any:
        return self.vocab[int(idx)]

    def __repr__(self) -> str:
        return f'CategoryProcessor(vocab={self.vocab})'


def parent_labeler(fn: str | Path) -> str:
    """The name of the file's folder (`train/dog/1.jpg` -> 'dog')."""
    return os.path.basename(os.path.dirname(fn))


def _label_by_func(il: ItemList, f: Callable[[Any], Any], cls: type = ItemList) -> ItemList:
    return cls([f(o) for o in il.items], path=il.path)


class LabeledData:
    """Inputs `x` and targets `y` (item lists), each run through its processors once; a map-style dataset."""

    def __init__(self, x: ItemList, y: ItemList, proc_x: Any = None, proc_y: Any = None):
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
        self.x, self.y = self.process(x, proc_x), self.process(y, proc_y)
        self.proc_x, self.proc_y = proc_x, proc_y

    @staticmethod
    def process(il: ItemList, proc: Any) -> ItemList:
        """The item list with its raw items replaced by their processed form."""
        if not listify(proc): return il
        return il.new(compose(il.items, proc))

    @classmethod
    def label_by_func(cls, il: ItemList, f: Callable[[Any], Any], proc_x: Any = None,
                      proc_y: Any = None) -> LabeledData:
        """Label each item of `il` with `f(item)`."""
        return cls(il, _label_by_func(il, f), proc_x=proc_x, proc_y=proc_y)

    def __getitem__(self, idx: Any) -> tuple[Any, Any]:
        return self.x[idx], self.y[idx]

    def __len__(self) -> int:
        return len(self.x)

    def x_obj(self, idx: Any) -> Any:
        """The unprocessed input(s) at `idx`."""
        return self.obj(self.x, idx, self.proc_x)

    def y_obj(self, idx: Any) -> Any:
        """The unprocessed target(s) at `idx` (class names for a CategoryProcessor)."""
        return self.obj(self.y, idx, self.proc_y)

    @staticmethod
    def obj(items: ItemList, idx: Any, procs: Any) -> Any:
        is_int = isinstance(idx, (int, np.integer)) or (isinstance(idx, torch.Tensor) and idx.ndim == 0)
        item = items[idx]
        for proc in reversed(listify(procs)):
            item = proc.deproc1(item) if is_int else proc.deprocess(item)
        return item

    def to_tensors(self, num_workers: int = 0, bs: int = 256, progress: bool | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y): every item read and transformed once, stacked in order, with a progress bar while decoding.

        When the input transforms end with `to_float_tensor`, images are kept as uint8 (a quarter of the
        memory; `DataBunch.from_tensors` batches convert them the same way on the device). 4-D images are
        stored channels-last. `num_workers` decoding processes; `progress` None shows the bar in notebooks
        and terminals only. Every item must have the same shape (resize first: `ResizeFixed`). Items that
        are tensors already and need no transform are returned without a copy where their layout allows.
        """
        return decode_tensors(self, num_workers, bs, progress, as_stored=type(self.x).get is ItemList.get)

    def to_databunch(self, bs: int, c_in: int | None = None, c_out: int | None = None, cache: bool = False,
                     device: torch.device | str | None = None, **dl_kwargs: Any) -> DataBunch:
        """A training-only DataBunch (no validation loader); split first to get one with validation.

        `cache=True` decodes once and trains from memory, as `SplitData.to_databunch` does.
        """
        vocab = getattr(self.proc_y, 'vocab', None)
        if c_out is None and vocab is not None: c_out = len(vocab)
        if cache: return cached_databunch(self, None, bs, c_in, c_out, vocab, self.x.tfms, device, dl_kwargs)
        if device is not None: raise ValueError("device= needs cache=True (DataLoaders leave batches on the CPU; "
                                                "a DeviceCallback moves them)")
        return DataBunch(*get_dls(self, None, bs, **dl_kwargs), c_in=c_in, c_out=c_out, vocab=vocab,
                         item_tfms=self.x.tfms)

    def __repr__(self) -> str:
        return f'{type(self).__name__}\nx: {self.x}\ny: {self.y}\n'


def label_by_func(sd: SplitData, f: Callable[[Any], Any], proc_x: Any = None, proc_y: Any = None) -> SplitData:
    """Label both halves of a split with `f`; processors learn their state (the vocab) on the training half."""
    train = LabeledData.label_by_func(sd.train, f, proc_x=proc_x, proc_y=proc_y)
    valid = LabeledData.label_by_func(sd.valid, f, proc_x=proc_x, proc_y=proc_y)
    return SplitData(train, valid)


def _first_per_class(items: list[Path], n_per_class: int | None) -> list[Path]:
    if n_per_class is None: return items
    counts: dict[Path, int] = {}
    kept = []
    for fn in items:
        folder = fn.parent
        if counts.get(folder, 0) < n_per_class:
            counts[folder] = counts.get(folder, 0) + 1
            kept.append(fn)
    return kept


def label_image_folder(path: str | Path, tfms: Any = None, train_name: str = 'train', valid_name: str = 'valid',
                       n_per_class: int | None = None, valid_n_per_class: int | None = None) -> SplitData:
    """Labelled split of an image folder tree `train_name/<class>/*`, `valid_name/<class>/*`.

    `n_per_class` keeps the first (in sorted file order) images of each training class;
    `valid_n_per_class` does the same for validation.
    """
    path = Path(path)
    for name in (train_name, valid_name):
        if not (path / name).is_dir():
            raise FileNotFoundError(f"{str(path / name)!r} is not a folder: expected {train_name}/<class>/ and "
                                    f"{valid_name}/<class>/ under {str(path)!r}")
    il = ImageList.from_files(path, include=[train_name, valid_name], tfms=tfms)
    sd = SplitData.split_by_func(il, partial(grandparent_splitter, valid_name=valid_name, train_name=train_name))
    sd = SplitData(sd.train.new(_first_per_class(sd.train.items, n_per_class)),
                   sd.valid.new(_first_per_class(sd.valid.items, valid_n_per_class)))
    if len(sd.train) == 0: raise ValueError(f"no training images found under {str(path / train_name)!r}")
    return label_by_func(sd, parent_labeler, proc_y=CategoryProcessor())
