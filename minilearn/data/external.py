"""Datasets from the web: `URLs`, `download_url`, `untar_data` (verified, atomic, safe extraction) and
`download_mnist`. The readers of the formats they hold are in `minilearn.data.formats` (re-exported here).

The default data folder is `~/.minilearn/data`; set the environment variable `MINILEARN_DATA` to use
another. Downloads land in a temporary file beside their destination, are checked against the known
size and md5, then moved into place; archives are extracted only when no member could write outside
the destination (no absolute paths, no `..`, no links leading out, no device files), with tarfile's
'data' filter on top. Progress shows as a fastprogress bar only in a terminal or notebook; otherwise
the module logs to the `minilearn.data.external` logger and prints nothing.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import math
import os
import posixpath
import shutil
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

from ..core import is_interactive
from .formats import (CIFAR10_CLASSES, cifar10_data, cifar10_databunch, mnist_data, mnist_databunch,  # re-exported
                      read_cifar10, read_idx, read_mnist)

__all__ = ['URLs', 'DATA_ENV', 'DownloadError', 'ChecksumError', 'UnsafeArchiveError', 'default_data_dir',
           'file_md5', 'download_url', 'untar_data', 'check_archive_members', 'extract_archive', 'download_mnist',
           'read_idx', 'read_mnist', 'read_cifar10', 'CIFAR10_CLASSES', 'cifar10_data', 'cifar10_databunch',
           'mnist_data', 'mnist_databunch']

log = logging.getLogger(__name__)

DATA_ENV = 'MINILEARN_DATA'
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
