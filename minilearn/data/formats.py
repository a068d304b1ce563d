"""Readers of the standard dataset formats: MNIST idx files (gzipped or not) and CIFAR-10, as python batches
(unpickled without running code) or as image folders `train/<class>`, `test/<class>`; as tensors
(`read_idx`, `read_mnist`, `read_cifar10`), labelled data (`mnist_data`, `cifar10_data`) or a DataBunch.

`minilearn.data.external` downloads the files (`untar_data(URLs.CIFAR10_PYTHON)`, `download_mnist`).
"""
from __future__ import annotations

import codecs
import gzip
import importlib
import importlib.util
import math
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from .core import DataBunch
from .items import CategoryProcessor, ItemList, LabeledData, SplitData, label_image_folder
from .transforms import make_rgb, to_byte_tensor, to_float_tensor

__all__ = ['read_idx', 'read_mnist', 'read_cifar10', 'CIFAR10_CLASSES', 'cifar10_data', 'cifar10_databunch',
           'mnist_data', 'mnist_databunch']

CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
_IDX_DTYPES = MappingProxyType({0x08: '>u1', 0x09: '>i1', 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4', 0x0E: '>f8'})


def read_idx(path: str | Path) -> torch.Tensor:
    """The array stored in an idx file (MNIST format), gzipped or not."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == '.gz' else open)(path, 'rb') as f: data = f.read()
    except (OSError, EOFError) as e:
        raise OSError(f"cannot read the idx file {str(path)!r}: {e}") from e
    if len(data) < 4 or data[0] or data[1] or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{str(path)!r} is not an idx file (bad magic number {data[:4].hex()})")
    ndim, dtype = data[3], np.dtype(_IDX_DTYPES[data[2]])
    header = 4 + 4 * ndim
    dims = struct.unpack(f'>{ndim}I', data[4:header]) if len(data) >= header else ()
    expected = header + math.prod(dims) * dtype.itemsize
    if len(data) < header or len(data) != expected:
        raise ValueError(f"{str(path)!r} is truncated or corrupt: {len(data)} bytes, the header of shape {dims} "
                         f"needs {expected}; download it again")
    arr = np.frombuffer(data, dtype, offset=header).reshape(dims)
    return torch.from_numpy(arr.astype(dtype.newbyteorder('=')))


def _find_file(folder: Path, stem: str) -> Path:
    for name in (stem, stem + '.gz'):
        if (folder / name).is_file(): return folder / name
    raise FileNotFoundError(f"{stem}(.gz) not found in {str(folder)!r}; "
                            f"download it with download_mnist({str(folder)!r})")


def read_mnist(path: str | Path, split: str = 'train') -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST images (N, 28, 28) uint8 and labels (N,) int64 of `split` ('train' or 'test') from idx files."""
    if split not in ('train', 'test'): raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path, prefix = Path(path), 'train' if split == 'train' else 't10k'
    images = read_idx(_find_file(path, f'{prefix}-images-idx3-ubyte'))
    labels = read_idx(_find_file(path, f'{prefix}-labels-idx1-ubyte')).long()
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"MNIST {split} files in {str(path)!r} disagree: images {tuple(images.shape)}, "
                         f"labels {tuple(labels.shape)}")
    return images, labels


def _numpy_reconstruct() -> Any:
    module = 'numpy._core.multiarray' if importlib.util.find_spec('numpy._core') else 'numpy.core.multiarray'
    return importlib.import_module(module)._reconstruct


class _CifarUnpickler(pickle.Unpickler):
    """Loads the CIFAR-10 batches (dicts of lists, bytes and numpy arrays) and nothing that can run code."""

    def find_class(self, module: str, name: str) -> Any:
        if name == '_reconstruct' and module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
            return _numpy_reconstruct()
        if (module, name) in (('numpy', 'ndarray'), ('numpy', 'dtype')): return getattr(np, name)
        if (module, name) == ('_codecs', 'encode'):
            return codecs.encode
        raise pickle.UnpicklingError(f"unexpected object {module}.{name} in a CIFAR-10 batch file")


def _load_cifar_batch(path: Path) -> dict:
    try:
        with open(path, 'rb') as f: batch = _CifarUnpickler(f, encoding='bytes').load()
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as e:
        raise OSError(f"cannot read the CIFAR-10 batch {str(path)!r}: {e}") from e
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _cifar_batches_dir(path: Path) -> Path | None:
    for folder in (path, path / 'cifar-10-batches-py'):
        if (folder / 'data_batch_1').is_file() or (folder / 'test_batch').is_file(): return folder
    return None


def read_cifar10(path: str | Path, split: str = 'train') -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """CIFAR-10 python batches: images (N, 3, 32, 32) uint8, labels (N,) int64, and the class names."""
    if split not in ('train', 'test'): raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = _cifar_batches_dir(Path(path))
    if folder is None:
        raise FileNotFoundError(f"no CIFAR-10 python batches (data_batch_1, ..., test_batch) in {str(path)!r}; "
                                f"download them with untar_data(URLs.CIFAR10_PYTHON)")
    names = ['test_batch'] if split == 'test' else [f'data_batch_{i}' for i in range(1, 6)]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing: raise FileNotFoundError(f"CIFAR-10 batch file(s) {missing} missing in {str(folder)!r}")
    batches = [_load_cifar_batch(folder / n) for n in names]
    images = torch.from_numpy(np.concatenate([np.asarray(b['data'], dtype=np.uint8) for b in batches]))
    labels = torch.tensor([int(y) for b in batches for y in b['labels']], dtype=torch.long)
    if images.ndim != 2 or images.shape[1] != 3 * 32 * 32 or len(images) != len(labels):
        raise ValueError(f"CIFAR-10 {split} batches in {str(folder)!r} have images {tuple(images.shape)} and "
                         f"{len(labels)} labels; expected (N, 3072) and N")
    classes = list(CIFAR10_CLASSES)
    if (folder / 'batches.meta').is_file():
        names = _load_cifar_batch(folder / 'batches.meta')['label_names']
        classes = [n.decode() if isinstance(n, bytes) else n for n in names]
    return images.view(-1, 3, 32, 32), labels, classes


def _first_per_class(labels: torch.Tensor, n_per_class: int | None) -> torch.Tensor | None:
    """Indices (in order) of the first `n_per_class` items of each class; None keeps everything."""
    if n_per_class is None: return None
    if n_per_class < 1: raise ValueError(f"n_per_class must be a positive int, got {n_per_class}")
    keep = torch.zeros(len(labels), dtype=torch.bool)
    for c in labels.unique():
        keep[(labels == c).nonzero().flatten()[:n_per_class]] = True
    return keep.nonzero().flatten()


def _tensor_labeled(images: torch.Tensor, labels: torch.Tensor, classes: Sequence, path: Path, tfms: Any,
                    n_per_class: int | None) -> LabeledData:
    keep = _first_per_class(labels, n_per_class)
    if keep is not None: images, labels = images[keep], labels[keep]
    names = [classes[i] for i in labels.tolist()]
    return LabeledData(ItemList(images, path, tfms=tfms), ItemList(names, path),
                       proc_y=CategoryProcessor(vocab=classes))


def cifar10_data(path: str | Path, n_per_class: int | None = None, valid_n_per_class: int | None = None,
                 tfms: Any = None) -> SplitData:
    """CIFAR-10 (train, test) as labelled data, from the python batches or an image folder `train/<cls>`, `test/<cls>`.

    `n_per_class` keeps the first images of each training class (the label-noise lab's 2000), in file
    order; the vocab is the class names in CIFAR-10 index order. Python batches give uint8 tensor items
    (default `tfms=[to_float_tensor]`); image folders give files (default `[make_rgb, to_byte_tensor,
    to_float_tensor]`).
    """
    path = Path(path)
    if _cifar_batches_dir(path) is not None:
        tfms = [to_float_tensor] if tfms is None else tfms
        sets = [read_cifar10(path, split) for split in ('train', 'test')]
        return SplitData(*(_tensor_labeled(x, y, classes, path, tfms, n)
                           for (x, y, classes), n in zip(sets, (n_per_class, valid_n_per_class))))
    if (path / 'train').is_dir() and (path / 'test').is_dir():
        tfms = [make_rgb, to_byte_tensor, to_float_tensor] if tfms is None else tfms
        return label_image_folder(path, tfms=tfms, train_name='train', valid_name='test', n_per_class=n_per_class,
                                  valid_n_per_class=valid_n_per_class)
    raise FileNotFoundError(f"{str(path)!r} holds neither CIFAR-10 python batches (data_batch_1, ..., test_batch) "
                            f"nor image folders train/<class>/ and test/<class>/; download with "
                            f"untar_data(URLs.CIFAR10_PYTHON) or untar_data(URLs.CIFAR)")


def cifar10_databunch(path: str | Path, bs: int = 64, n_per_class: int | None = None,
                      valid_n_per_class: int | None = None, tfms: Any = None, **dl_kwargs: Any) -> DataBunch:
    """A DataBunch of CIFAR-10 (train, test as validation); see `cifar10_data`."""
    sd = cifar10_data(path, n_per_class=n_per_class, valid_n_per_class=valid_n_per_class, tfms=tfms)
    return sd.to_databunch(bs, c_in=3, c_out=10, **dl_kwargs)


def mnist_data(path: str | Path, n_per_class: int | None = None, split_test: float | None = None,
               tfms: Any = None) -> SplitData:
    """MNIST (train, test) as labelled (1, 28, 28) uint8 tensor items from idx files (vocab '0'..'9').

    With `split_test` (e.g. 0.2), only the t10k files are read: the first 1-split_test of them train,
    the rest validate (for a folder holding only the test set). `n_per_class` truncates training.
    """
    path, tfms = Path(path), [to_float_tensor] if tfms is None else tfms
    classes = [str(i) for i in range(10)]
    if split_test is None:
        (x_train, y_train), (x_valid, y_valid) = read_mnist(path, 'train'), read_mnist(path, 'test')
    else:
        if not 0 < split_test < 1: raise ValueError(f"split_test must lie in (0, 1), got {split_test}")
        x, y = read_mnist(path, 'test')
        n_train = len(x) - round(len(x) * split_test)
        (x_train, y_train), (x_valid, y_valid) = (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])
    return SplitData(_tensor_labeled(x_train.unsqueeze(1), y_train, classes, path, tfms, n_per_class),
                     _tensor_labeled(x_valid.unsqueeze(1), y_valid, classes, path, tfms, None))


def mnist_databunch(path: str | Path, bs: int = 64, n_per_class: int | None = None, split_test: float | None = None,
                    tfms: Any = None, **dl_kwargs: Any) -> DataBunch:
    """A DataBunch of MNIST from idx files; see `mnist_data`."""
    sd = mnist_data(path, n_per_class=n_per_class, split_test=split_test, tfms=tfms)
    return sd.to_databunch(bs, c_in=1, c_out=10, **dl_kwargs)
