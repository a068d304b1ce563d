"""Datasets from the web and from disk: `URLs`, `untar_data` (verified, atomic, safe extraction) and
readers of the standard formats (CIFAR-10 python batches or image folders, MNIST idx files).

The default data folder is `~/.minilearn/data`; set the environment variable `MINILEARN_DATA` to use
another. Downloads land in a temporary file beside their destination, are checked against the known
size and md5, then moved into place; archives are extracted only when no member could write outside
the destination (no absolute paths, no `..`, no links leading out, no device files), with tarfile's
'data' filter on top. Progress shows as a fastprogress bar only in a terminal or notebook; otherwise
the module logs to the `minilearn.data.external` logger and prints nothing.
"""
from __future__ import annotations

import contextlib
import codecs
import gzip
import hashlib
import http.client
import importlib
import importlib.util
import logging
import math
import os
import pickle
import posixpath
import shutil
import struct
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

import numpy as np
import torch

from ..core import is_interactive
from .core import DataBunch
from .items import CategoryProcessor, ItemList, LabeledData, SplitData, label_image_folder
from .transforms import make_rgb, to_byte_tensor, to_float_tensor

__all__ = ['URLs', 'DATA_ENV', 'DownloadError', 'ChecksumError', 'UnsafeArchiveError', 'default_data_dir',
           'file_md5', 'download_url', 'untar_data', 'check_archive_members', 'extract_archive', 'download_mnist',
           'read_idx', 'read_mnist', 'read_cifar10', 'CIFAR10_CLASSES', 'cifar10_data', 'cifar10_databunch',
           'mnist_data', 'mnist_databunch']

log = logging.getLogger(__name__)

DATA_ENV = 'MINILEARN_DATA'
CIFAR10_CLASSES = ('airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck')
_ARCHIVE_SUFFIXES = ('.tar.gz', '.tgz', '.tar.bz2', '.tbz2', '.tar.xz', '.txz', '.tar')
_CHUNK = 1 << 20


class URLs:
    """Addresses of datasets used by fast.ai and the original sites."""
    S3_IMAGE = 'https://s3.amazonaws.com/fast-ai-imageclas/'
    S3_SAMPLE = 'https://s3.amazonaws.com/fast-ai-sample/'
    IMAGENETTE = f'{S3_IMAGE}imagenette2.tgz'
    IMAGENETTE_160 = f'{S3_IMAGE}imagenette2-160.tgz'
    IMAGENETTE_320 = f'{S3_IMAGE}imagenette2-320.tgz'
    IMAGEWOOF = f'{S3_IMAGE}imagewoof2.tgz'
    IMAGEWOOF_160 = f'{S3_IMAGE}imagewoof2-160.tgz'
    IMAGEWOOF_320 = f'{S3_IMAGE}imagewoof2-320.tgz'
    CIFAR = f'{S3_SAMPLE}cifar10.tgz'  # fast.ai: train/<class>/*.png, test/<class>/*.png
    CIFAR10_PYTHON = 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'  # the original python batches
    MNIST = f'{S3_IMAGE}mnist_png.tgz'  # fast.ai: training/<digit>/*.png, testing/<digit>/*.png
    MNIST_SAMPLE = f'{S3_SAMPLE}mnist_sample.tgz'
    MNIST_TINY = f'{S3_SAMPLE}mnist_tiny.tgz'
    MNIST_IDX = 'https://ossci-datasets.s3.amazonaws.com/mnist/'  # mirror of the original idx files
    MNIST_FILES = ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz', 't10k-images-idx3-ubyte.gz',
                   't10k-labels-idx1-ubyte.gz')


# (size in bytes, md5 of the whole file); None where not reliably known. fast.ai publishes sizes (its
# md5s cover only the first MiB, so they are not used here).
_CHECKS = MappingProxyType({
    URLs.IMAGENETTE: (1557161267, None),
    URLs.IMAGENETTE_160: (99003388, None),
    URLs.IMAGENETTE_320: (341663724, None),
    URLs.IMAGEWOOF: (1343715595, None),
    URLs.IMAGEWOOF_160: (92612825, None),
    URLs.IMAGEWOOF_320: (328387740, None),
    URLs.CIFAR: (168168549, None),
    URLs.MNIST: (15683414, None),
    URLs.MNIST_SAMPLE: (3214948, None),
    URLs.MNIST_TINY: (342207, None),
    URLs.CIFAR10_PYTHON: (None, 'c58f30108f718f92721af3b95e74349a'),
    URLs.MNIST_IDX + 'train-images-idx3-ubyte.gz': (None, 'f68b3c2dcbeaaa9fbdd348bbdeb94873'),
    URLs.MNIST_IDX + 'train-labels-idx1-ubyte.gz': (None, 'd53e105ee54ea40749a09fcbcd1e9432'),
    URLs.MNIST_IDX + 't10k-images-idx3-ubyte.gz': (None, '9fb629c4189551a2d022fa330f9573f3'),
    URLs.MNIST_IDX + 't10k-labels-idx1-ubyte.gz': (None, 'ec29112dd5afa0611ce80d1b7f02629c'),
})


class DownloadError(OSError):
    """A download failed (network, HTTP status, incomplete transfer); the message names the URL and the fix."""


class ChecksumError(DownloadError):
    """A downloaded file does not have the expected size or md5."""


class UnsafeArchiveError(ValueError):
    """An archive member would be written outside the destination (or is a device file)."""


def default_data_dir() -> Path:
    """Where datasets go: `$MINILEARN_DATA`, else `~/.minilearn/data`."""
    return Path(os.environ.get(DATA_ENV) or Path.home() / '.minilearn' / 'data').expanduser()


def file_md5(path: str | Path) -> str:
    """The md5 hex digest of a file."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, 'rb') as f:
        while block := f.read(_CHUNK): digest.update(block)
    return digest.hexdigest()


# ---- downloading -------------------------------------------------------------------------------

class _ProgressBar:
    """A fastprogress bar counting MiB."""

    def __init__(self, total: int):
        from fastprogress.fastprogress import progress_bar
        self.bar = progress_bar(range(max(1, math.ceil(total / _CHUNK))), leave=False)
        self.bar.comment = 'MiB'
        self.bar.update(0)

    def __call__(self, done: int, total: int | None) -> None:
        self.bar.update(min(math.ceil(done / _CHUNK), self.bar.total))


def _reporter(progress: Any, total: int | None) -> Callable[[int, int | None], None] | None:
    if callable(progress): return progress
    show = is_interactive() if progress is None else bool(progress)
    return _ProgressBar(total) if show and total else None


def _content_length(resp: Any) -> int | None:
    length = getattr(resp, 'length', None)
    if length is None and getattr(resp, 'headers', None) is not None:
        length = resp.headers.get('Content-Length')
    try:
        return int(length) if length is not None else None
    except ValueError:
        return None


def _offline(url: str, reason: Any, target: Path) -> DownloadError:
    return DownloadError(f"could not download {url} ({reason}). Check the network connection (or proxy "
                         f"settings), or fetch the file yourself and save it as {target}")


def _copy_stream(url: str, resp: Any, out: BinaryIO, report: Callable | None, total: int | None, target: Path) -> int:
    done = 0
    while True:
        try:
            chunk = resp.read(_CHUNK)
        except (OSError, http.client.HTTPException) as e:
            raise _offline(url, f'connection lost after {done} bytes: {e}', target) from None
        if not chunk: return done
        out.write(chunk)
        done += len(chunk)
        if report is not None: report(done, total)


def _check_file(path: Path, url: str, md5: str | None, size: int | None) -> None:
    got_size = path.stat().st_size
    if size is not None and got_size != size:
        raise ChecksumError(f"{url}: got {got_size} bytes, expected {size}: the download is incomplete or the file "
                            f"changed upstream; try again (or pass size=None to skip the check)")
    if md5 is not None:
        got = file_md5(path)
        if got != md5.lower():
            raise ChecksumError(f"{url}: md5 {got} does not match the expected {md5}: the download is corrupt or "
                                f"the file changed upstream; try again (or pass md5=None to skip the check)")


def download_url(url: str, dest: str | Path, md5: str | None = None, size: int | None = None, *,
                 progress: Any = None, opener: Callable[[str], Any] | None = None, timeout: float = 30.) -> Path:
    """Download `url` to the file `dest`: into a temporary file beside it, verified, then moved into place.

    `progress`: None shows a bar only when interactive, False never, True always, or a callable
    `progress(bytes_done, total_or_None)`. `opener(url)` returns a file-like response (default: urllib's
    `urlopen`, which also reads `file://` URLs).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    opener = opener or partial(urllib.request.urlopen, timeout=timeout)
    log.info('downloading %s to %s', url, dest)
    try:
        resp = opener(url)
    except (OSError, ValueError, http.client.HTTPException) as e:  # URLError, HTTPError, timeouts are OSErrors
        reason = e if isinstance(e, urllib.error.HTTPError) else getattr(e, 'reason', None) or e
        raise _offline(url, reason, dest) from None
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f'.{dest.name}.', suffix='.part')
    tmp = Path(tmp_name)
    try:
        with contextlib.closing(resp), os.fdopen(fd, 'wb') as out:
            total = _content_length(resp)
            done = _copy_stream(url, resp, out, _reporter(progress, total), total, dest)
        if total is not None and done != total:
            raise _offline(url, f'transfer ended after {done} of {total} bytes', dest)
        _check_file(tmp, url, md5, size)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError): tmp.unlink()
        raise
    return dest


# ---- extracting --------------------------------------------------------------------------------

def _is_absolute(name: str) -> bool:
    return name.startswith(('/', '\\')) or (name[:1].isalpha() and name[1:3] in (':/', ':\\'))  # C:/ on Windows


def _member_problem(m: tarfile.TarInfo, link_names: set[str]) -> str | None:
    name = m.name
    if _is_absolute(name): return 'has an absolute path'
    if '..' in name.replace('\\', '/').split('/'): return "has a '..' path component"
    if m.ischr() or m.isblk() or m.isfifo(): return 'is a device or fifo file'
    if not (m.isreg() or m.isdir() or m.issym() or m.islnk()): return 'has an unsupported member type'
    norm = posixpath.normpath(name)
    parts = norm.split('/')
    if any('/'.join(parts[:i]) in link_names for i in range(1, len(parts))): return 'is written through a link'
    if m.issym() or m.islnk():
        target = m.linkname
        if _is_absolute(target):
            return f'is a link to the absolute path {target!r}'
        base = posixpath.dirname(norm) if m.issym() else ''
        resolved = posixpath.normpath(posixpath.join(base, target))
        if resolved == '..' or resolved.startswith('../'): return f'is a link pointing outside ({target!r})'
    return None


def check_archive_members(members: Sequence[tarfile.TarInfo], archive: str | Path = 'archive') -> None:
    """Raise UnsafeArchiveError unless every member stays inside the destination."""
    link_names = {posixpath.normpath(m.name) for m in members if m.issym() or m.islnk()}
    for m in members:
        problem = _member_problem(m, link_names)
        if problem:
            raise UnsafeArchiveError(f"refusing to extract {archive}: member {m.name!r} {problem}; nothing was "
                                     f"extracted. Delete the archive and download it again from a trusted source")


def _unwrap_single_folder(folder: Path) -> Path:
    entries = list(folder.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and not entries[0].is_symlink(): return entries[0]
    return folder


def _move_into_place(src: Path, folder: Path) -> None:
    if folder.exists():  # replacing (force_download): swap, then delete the old copy
        old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f'.{folder.name}.', suffix='.old'))
        os.replace(folder, old / 'data')
        os.replace(src, folder)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        os.rename(src, folder)
    except OSError:
        if not folder.is_dir(): raise  # else another process extracted it at the same time


def extract_archive(archive: str | Path, folder: str | Path) -> Path:
    """Safely extract a tar archive so its content becomes `folder` (a single top-level folder is unwrapped)."""
    archive, folder = Path(archive), Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        tf = tarfile.open(archive)
    except (tarfile.TarError, OSError) as e:
        raise ValueError(f"{archive} is not a readable tar archive ({e}); delete it and download it again") from None
    with tf:
        members = tf.getmembers()
        check_archive_members(members, archive)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f'.{folder.name}.', suffix='.extracting'))
        try:
            if hasattr(tarfile, 'data_filter'): tf.extractall(tmp, members=members, filter='data')
            else: tf.extractall(tmp, members=members)
            _move_into_place(_unwrap_single_folder(tmp), folder)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    log.info('extracted %s to %s', archive, folder)
    return folder


def _archive_name(url: str) -> str:
    name = posixpath.basename(urllib.parse.unquote(urllib.parse.urlparse(url).path))
    if not name: raise ValueError(f"cannot tell the archive's file name from the URL {url!r}")
    return name


def _strip_archive_suffix(name: str) -> str | None:
    for suffix in _ARCHIVE_SUFFIXES:
        if name.lower().endswith(suffix): return name[:-len(suffix)]
    return None


def untar_data(url: str, dest: str | Path | None = None, md5: str | None = None, size: int | None = None, *,
               force_download: bool = False, progress: Any = None, opener: Callable[[str], Any] | None = None,
               timeout: float = 30.) -> Path:
    """Download and safely extract a dataset archive; returns its folder `dest/<archive name>`.

    Nothing is fetched when the folder already exists (unless `force_download`). `dest` defaults to
    `default_data_dir()`. Size and md5 are checked when given or known for the URL. A URL without an
    archive suffix gets `.tgz` (fast.ai style). See `download_url` for `progress` and `opener`.
    """
    if _strip_archive_suffix(_archive_name(url)) is None: url = url + '.tgz'
    archive_name = _archive_name(url)
    folder_name = _strip_archive_suffix(archive_name)
    if folder_name in ('', '.', '..') or any(sep in folder_name for sep in '/\\'):
        raise ValueError(f"cannot name a dataset folder after the archive in {url!r}: it gives {folder_name!r}; "
                         f"use a URL whose last part is the archive's file name (e.g. .../cifar10.tgz)")
    dest = default_data_dir() if dest is None else Path(dest).expanduser()
    folder = dest / folder_name
    if folder.is_dir() and not force_download: return folder
    known_size, known_md5 = _CHECKS.get(url, (None, None))
    md5, size = md5 or known_md5, size if size is not None else known_size
    archive = dest / archive_name
    if force_download or not archive.is_file() or not _is_intact(archive, url, md5, size):
        try:
            download_url(url, archive, md5=md5, size=size, progress=progress, opener=opener, timeout=timeout)
        except ChecksumError:
            raise
        except DownloadError as e:  # offline: also say where an extracted copy goes
            raise DownloadError(f"{e} (or put the extracted folder at {folder}; datasets live in ${DATA_ENV}, "
                                f"else ~/.minilearn/data)") from None
    return extract_archive(archive, folder)


def _is_intact(path: Path, url: str, md5: str | None, size: int | None) -> bool:
    try:
        _check_file(path, url, md5, size)
    except ChecksumError:
        log.info('%s does not match its checksum; downloading it again', path)
        return False
    return True


def download_mnist(dest: str | Path | None = None, *, progress: Any = None,
                   opener: Callable[[str], Any] | None = None) -> Path:
    """Download the four MNIST idx files (md5-checked) into `dest` (default `<data dir>/mnist`)."""
    dest = default_data_dir() / 'mnist' if dest is None else Path(dest).expanduser()
    for fname in URLs.MNIST_FILES:
        url = URLs.MNIST_IDX + fname
        md5 = _CHECKS[url][1]
        if (dest / fname).is_file() and _is_intact(dest / fname, url, md5, None): continue
        download_url(url, dest / fname, md5=md5, progress=progress, opener=opener)
    return dest


# ---- standard formats --------------------------------------------------------------------------

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
