"""Dataset and DataBunch: the training and validation loaders a Learner reads; TensorLoader, batches of
tensors held in memory by one index-gather per batch (DataLoader's per-item reads and collate are the cost
it removes)."""
from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from .sampler import ResumableLoader, _draw_seed, checked_batches_done, epoch_order, one_batch
from .transforms import show_batch

__all__ = ['Dataset', 'DataBunch', 'get_dls', 'TensorLoader']


class Dataset(torch.utils.data.Dataset):
    """Pairs `x[i], y[i]` of two indexable collections of the same length."""

    def __init__(self, x: Any, y: Any):
        if len(x) != len(y):
            raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        return self.x[i], self.y[i]

    def __repr__(self) -> str:
        return f'{type(self).__name__} ({len(self)} items)'


def _check_bs(bs: Any) -> None:
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"batch size must be a positive int, got {bs!r}")


class TensorLoader:
    """Batches `(x[idx], y[idx])` of two tensors in memory, one index-gather per batch; a DataLoader's interface.

    uint8 inputs come out as float32 in [0, 1] (what `to_float_tensor` gives), converted after the gather,
    on the tensors' device. `last_idx` is the dataset indices of the batch yielded last, on that device (the
    learner's `idx`). Shuffled orders come from a torch.Generator seeded with `seed + epoch`: epoch e's
    order depends on nothing else. Implements the resumable loader protocol (`state_dict`, `load_state_dict`,
    `set_epoch`) and DDP sharding (`shard`): rank r of w reads items r, r+w, ... of the epoch's order, the
    training order padded (as DistributedSampler pads) so every rank runs the same number of steps.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, bs: int = 64, shuffle: bool = False, drop_last: bool = False,
                 seed: int | None = None, rank: int = 0, world_size: int = 1, pad: bool = False):
        _check_bs(bs)
        for name, t in (('x', x), ('y', y)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"TensorLoader needs tensors, got {type(t).__name__} for {name}; convert with "
                                f"torch.as_tensor (image folders: LabeledData.to_tensors())")
        if len(x) != len(y): raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
        if x.device != y.device: raise ValueError(f"x and y must be on the same device, got {x.device} and {y.device}")
        if not 0 <= rank < world_size: raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        self.dataset = Dataset(x, y)  # read at each epoch, so labels replaced there (label noise) are used
        self.batch_size, self.shuffle, self.drop_last = bs, shuffle, drop_last
        self.seed = _draw_seed() if seed is None else int(seed)
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch = 0  # the epoch whose order the next iteration yields
        self._skip = 0  # batches of that epoch already done (set by load_state_dict)
        self._iter_epoch: int | None = None  # the epoch being iterated, and how many of its batches were yielded
        self._done = 0
        self._current: object | None = None  # the iteration those describe
        self.last_idx: torch.Tensor | None = None  # dataset indices of the batch yielded last (learn.idx)

    @property
    def x(self) -> torch.Tensor:
        return self.dataset.x

    @property
    def y(self) -> torch.Tensor:
        return self.dataset.y

    @property
    def device(self) -> torch.device:
        return self.dataset.x.device

    def _n_items(self) -> int:
        """How many items this rank reads per epoch."""
        n = len(self.dataset)
        if self.pad: return math.ceil(n / self.world_size)
        return max(0, math.ceil((n - self.rank) / self.world_size))

    def __len__(self) -> int:
        n = self._n_items()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def order(self, epoch: int | None = None) -> torch.Tensor:
        """The indices (on the CPU) this rank reads in `epoch` (the next epoch by default), in order."""
        return epoch_order(len(self.dataset), self.seed, self.epoch if epoch is None else epoch, self.shuffle,
                           self.rank, self.world_size, self.pad)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration yield epoch `epoch`'s order (the DistributedSampler convention)."""
        if epoch != self.epoch: self._skip = 0
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        epoch, skip, token = self.epoch, self._skip, object()
        self.epoch, self._skip = epoch + 1, 0
        self._iter_epoch, self._done, self._current = epoch, skip, token
        x, y, bs, n_batches = self.x, self.y, self.batch_size, len(self)
        idx = self.order(epoch).to(x.device)  # one copy per epoch; each batch then gathers on the device
        try:
            for b in range(skip, n_batches):
                batch_idx = idx[b * bs:(b + 1) * bs]
                xb = x[batch_idx]  # advanced indexing keeps channels-last strides (index_select does not)
                if xb.dtype == torch.uint8: xb = xb.float().div_(255.)
                if self._current is token: self._done = b + 1
                self.last_idx = batch_idx
                yield xb, y[batch_idx]
        finally:
            # Finished, or dropped after a few batches: the position is the next epoch's start (as ResumableLoader).
            if self._current is token: self._iter_epoch = self._current = None

    def one_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The first batch of the next epoch, leaving the loader's position as it is (show_batch)."""
        return one_batch(self)

    def state_dict(self) -> dict:
        """The position between batches: seed, the epoch being read and how many of its batches were yielded."""
        if self._iter_epoch is not None and self._done < len(self):
            epoch, done = self._iter_epoch, self._done
        else:
            epoch, done = self.epoch, self._skip
        return {'seed': self.seed, 'epoch': epoch, 'batches_done': done, 'n_items': len(self.dataset),
                'batch_size': self.batch_size, 'shuffle': self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: the next iteration yields the rest of its epoch, without loading the batches done."""
        done = checked_batches_done(self, state, n_items=len(self.dataset), shuffle=self.shuffle)
        self.seed, self.epoch, self._skip = int(state['seed']), int(state['epoch']), done
        if done == len(self): self.epoch, self._skip = self.epoch + 1, 0
        self._iter_epoch, self._done = None, 0

    def _new(self, **changes: Any) -> TensorLoader:
        kwargs = dict(x=self.x, y=self.y, bs=self.batch_size, shuffle=self.shuffle, drop_last=self.drop_last,
                      seed=self.seed, rank=self.rank, world_size=self.world_size, pad=self.pad)
        kwargs.update(changes)
        return type(self)(**kwargs)

    def shard(self, rank: int, world_size: int, train: bool, seed: int | None = None) -> TensorLoader:
        """This rank's shard (same tensors, no copy): training padded and reseeded with `seed`; validation unpadded."""
        if self.world_size != 1: raise ValueError("this TensorLoader is a shard already; shard the full loader")
        if not train and self.shuffle:
            raise ValueError("DistributedCallback shards validation without shuffling; build the validation "
                             "loader with shuffle=False")
        loader = self._new(rank=rank, world_size=world_size, pad=train, seed=self.seed if seed is None else seed)
        loader.epoch, loader._skip = self.epoch, self._skip  # a resumed epoch continues on every rank
        return loader

    def ordered(self) -> TensorLoader:
        """The same data in dataset order, every item once (prediction, statistics)."""
        return self._new(shuffle=False, drop_last=False, rank=0, world_size=1, pad=False)

    def head(self, n: int) -> TensorLoader:
        """A loader over the first `n` items in dataset order."""
        return self._new(x=self.x[:n], y=self.y[:n], shuffle=False, drop_last=False, rank=0, world_size=1, pad=False)

    def __repr__(self) -> str:
        return (f'{type(self).__name__}({len(self.dataset)} items, bs={self.batch_size}, shuffle={self.shuffle}, '
                f'device={self.device})')


def get_dls(train_ds: Any, valid_ds: Any, bs: int, seed: int | None = None,
            **kwargs: Any) -> tuple[DataLoader, DataLoader | None]:
    """A shuffled training loader of batch size `bs` and a validation loader of batch size 2·bs.

    The training loader is a `ResumableLoader`: epoch e's order comes from `seed + e` (`seed` drawn from
    `generator`, or torch's global generator, when None), and it can resume inside an epoch. Each pass reads the
    next epoch; `train_dl.set_epoch(0)` before a fit replays the same batches for another learner.
    """
    _check_bs(bs)
    kwargs.pop('shuffle', None)
    train_dl = ResumableLoader(train_ds, batch_size=bs, shuffle=True, seed=seed, **kwargs)
    valid_dl = None if valid_ds is None else DataLoader(valid_ds, batch_size=bs * 2, shuffle=False, **kwargs)
    return train_dl, valid_dl


class DataBunch:
    """A training and a validation DataLoader, the number of input channels and of outputs.

    `vocab` (class names, index order) and `item_tfms` (the item transforms of the inputs) are set
    when the data comes from a labelled item list; prediction and export read them.
    """

    def __init__(self, train_dl: DataLoader, valid_dl: DataLoader | None, c_in: int | None = None,
                 c_out: int | None = None, vocab: list | None = None, item_tfms: list | None = None):
        self.train_dl, self.valid_dl, self.c_in, self.c_out = train_dl, valid_dl, c_in, c_out
        self.vocab, self.item_tfms = vocab, item_tfms

    @classmethod
    def from_datasets(cls, train_ds: Any, valid_ds: Any, bs: int = 64, c_in: int | None = None,
                      c_out: int | None = None, **dl_kwargs: Any) -> DataBunch:
        """Build the loaders from two map-style datasets (torchvision datasets included)."""
        return cls(*get_dls(train_ds, valid_ds, bs, **dl_kwargs), c_in=c_in, c_out=c_out)

    @classmethod
    def from_tensors(cls, x_train: torch.Tensor, y_train: torch.Tensor, x_valid: torch.Tensor | None = None,
                     y_valid: torch.Tensor | None = None, bs: int = 64, shuffle: bool = True, drop_last: bool = False,
                     device: torch.device | str | None = None, c_in: int | None = None, c_out: int | None = None,
                     seed: int | None = None, vocab: list | None = None, item_tfms: list | None = None) -> DataBunch:
        """Loaders that gather batches from tensors in memory (`TensorLoader`); validation in order at 2·bs.

        With `device`, the tensors are moved there once (keep images uint8: a quarter of float32's memory,
        converted per batch on the device). `c_in` defaults to `x_train.shape[1]` for image batches.
        `seed` seeds the shuffling (drawn from torch's global generator when None).
        """
        if (x_valid is None) != (y_valid is None):
            raise ValueError("give both x_valid and y_valid, or neither (no validation loader)")
        tensors = [x_train, y_train] + ([] if x_valid is None else [x_valid, y_valid])
        if device is not None: tensors = [t.to(device) if isinstance(t, torch.Tensor) else t for t in tensors]
        train_dl = TensorLoader(tensors[0], tensors[1], bs, shuffle=shuffle, drop_last=drop_last, seed=seed)
        if len(train_dl) == 0:
            raise ValueError(f"the training loader is empty: {len(x_train)} items with bs={bs} and "
                             f"drop_last={drop_last}; lower bs or set drop_last=False")
        valid_dl = None if x_valid is None else TensorLoader(tensors[2], tensors[3], bs * 2, seed=0)
        if c_in is None and x_train.ndim == 4: c_in = x_train.shape[1]
        return cls(train_dl, valid_dl, c_in=c_in, c_out=c_out, vocab=vocab, item_tfms=item_tfms)

    @property
    def c(self) -> int | None:
        """The number of outputs (the course's name)."""
        return self.c_out

    @property
    def train_ds(self) -> Any:
        return self.train_dl.dataset

    @property
    def valid_ds(self) -> Any:
        return None if self.valid_dl is None else self.valid_dl.dataset

    def show_batch(self, n: int = 9, norm: Any = None, valid: bool = False, **kwargs: Any):
        """A grid of `n` images of one training (or validation) batch titled by class name; returns the figure.

        `norm` (a `(mean, std)` pair, a `Normalize` or a normalization callback) undoes normalization.
        """
        dl = self.valid_dl if valid else self.train_dl
        if dl is None: raise ValueError("this DataBunch has no validation loader; use show_batch(valid=False)")
        xb, yb = one_batch(dl)
        return show_batch(xb, yb, vocab=self.vocab, n=n, norm=norm, **kwargs)

    def __repr__(self) -> str:
        n_valid = 0 if self.valid_dl is None else len(self.valid_ds)
        return (f'DataBunch(train: {len(self.train_ds)} items, valid: {n_valid} items, '
                f'c_in={self.c_in}, c_out={self.c_out})')
