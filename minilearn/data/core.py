"""Dataset and DataBunch: the training and validation loaders a Learner reads."""
from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from .transforms import show_batch

__all__ = ['Dataset', 'DataBunch', 'get_dls']


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


def get_dls(train_ds: Any, valid_ds: Any, bs: int, **kwargs: Any) -> tuple[DataLoader, DataLoader | None]:
    """A shuffled training loader of batch size `bs` and a validation loader of batch size 2·bs."""
    if isinstance(bs, bool) or not isinstance(bs, int) or bs < 1:
        raise ValueError(f"batch size must be a positive int, got {bs!r}")
    kwargs.pop('shuffle', None)
    train_dl = DataLoader(train_ds, batch_size=bs, shuffle=True, **kwargs)
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
        xb, yb = next(iter(dl))
        return show_batch(xb, yb, vocab=self.vocab, n=n, norm=norm, **kwargs)

    def __repr__(self) -> str:
        n_valid = 0 if self.valid_dl is None else len(self.valid_ds)
        return (f'DataBunch(train: {len(self.train_ds)} items, valid: {n_valid} items, '
                f'c_in={self.c_in}, c_out={self.c_out})')
