"""untar_data (download, checks, safe extraction) and download_mnist, all without network (readers: test_formats)."""
import hashlib
import io
import socket
import tarfile
import urllib.error
from pathlib import Path

import pytest

from minilearn.data.external import (URLs, ChecksumError, DownloadError, UnsafeArchiveError, default_data_dir,
                                     download_mnist, download_url, extract_archive, untar_data)


# ---- archives ----------------------------------------------------------------------------------

def _tar(path: Path, members: list) -> Path:
    """Write a .tgz from (TarInfo, bytes-or-None) pairs."""
    with tarfile.open(path, 'w:gz') as tf:
        for info, data in members:
            if data is not None: info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _file(name: str, data: bytes = b'hello') -> tuple:
    return tarfile.TarInfo(name), data


def _dir(name: str) -> tuple:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info, None


def _link(name: str, target: str, kind=tarfile.SYMTYPE) -> tuple:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info, None


@pytest.fixture
def good_archive(tmp_path):
    src = tmp_path / 'src'
    src.mkdir()
    return _tar(src / 'mini.tgz', [_dir('mini'), _dir('mini/train'), _file('mini/train/a.txt', b'A' * 100),
                                   _file('mini/valid/b.txt', b'B'), _link('mini/alias.txt', 'train/a.txt')])


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


class CountingOpener:
    """An injected opener serving local bytes, counting calls."""

    def __init__(self, data: bytes, length: int | None = None):
        self.data, self.length, self.calls = data, length, 0

    def __call__(self, url):
        self.calls += 1
        resp = io.BytesIO(self.data)
        resp.length = len(self.data) if self.length is None else self.length
        return resp


def _tree(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob('*')}


def test_good_archive_extracts_once(tmp_path, good_archive):
    dest = tmp_path / 'data'
    url = good_archive.as_uri()  # file://
    folder = untar_data(url, dest=dest, md5=_md5(good_archive), progress=False)
    assert folder == dest / 'mini'
    assert (folder / 'train' / 'a.txt').read_bytes() == b'A' * 100  # the single top folder is unwrapped
    assert (folder / 'valid' / 'b.txt').read_bytes() == b'B'
    assert (folder / 'alias.txt').is_symlink() and (folder / 'alias.txt').read_bytes() == b'A' * 100
    assert _tree(dest) == {'mini.tgz', 'mini', 'mini/train', 'mini/train/a.txt', 'mini/valid', 'mini/valid/b.txt',
                           'mini/alias.txt'}  # no temporary files left
    (folder / 'marker').write_text('kept')
    opener = CountingOpener(b'')
    assert untar_data(url, dest=dest, opener=opener) == folder
    assert opener.calls == 0 and (folder / 'marker').exists()  # skipped: already extracted
    again = untar_data(url, dest=dest, md5=_md5(good_archive), force_download=True, progress=False)
    assert again == folder and not (folder / 'marker').exists()  # force_download replaces the folder


def test_injected_opener_and_progress(tmp_path, good_archive):
    data = good_archive.read_bytes()
    opener, seen = CountingOpener(data), []
    folder = untar_data('https://example.com/x/mini.tgz', dest=tmp_path / 'd', md5=_md5(good_archive),
                        size=len(data), opener=opener, progress=lambda done, total: seen.append((done, total)))
    assert opener.calls == 1 and (folder / 'train' / 'a.txt').exists()
    assert seen[-1] == (len(data), len(data))


def test_progress_bar_when_asked(tmp_path, capsys):
    data = b'x' * (3 << 20)
    download_url('https://e.com/f', tmp_path / 'f', opener=CountingOpener(data), progress=True)
    assert '[3/3' in capsys.readouterr().out and (tmp_path / 'f').stat().st_size == len(data)
    download_url('https://e.com/f', tmp_path / 'g', opener=CountingOpener(data))  # not interactive: silent
    assert capsys.readouterr().out == ''


def test_archive_is_extracted_again_without_download_when_folder_missing(tmp_path, good_archive):
    dest = tmp_path / 'd'
    untar_data(good_archive.as_uri(), dest=dest, progress=False)
    import shutil
    shutil.rmtree(dest / 'mini')
    opener = CountingOpener(b'')
    assert (untar_data('https://example.com/mini.tgz', dest=dest, opener=opener) / 'train' / 'a.txt').exists()
    assert opener.calls == 0


def test_url_without_suffix_gets_tgz(tmp_path, good_archive):
    folder = untar_data(good_archive.as_uri()[:-len('.tgz')], dest=tmp_path / 'd', progress=False)
    assert folder == tmp_path / 'd' / 'mini' and (tmp_path / 'd' / 'mini.tgz').is_file()


def test_default_data_dir_from_environment(tmp_path, monkeypatch, good_archive):
    monkeypatch.setenv('MINILEARN_DATA', str(tmp_path / 'env'))
    assert default_data_dir() == tmp_path / 'env'
    assert untar_data(good_archive.as_uri(), progress=False) == tmp_path / 'env' / 'mini'
    monkeypatch.delenv('MINILEARN_DATA')
    assert default_data_dir() == Path.home() / '.minilearn' / 'data'


@pytest.mark.parametrize('check', [{'md5': '0' * 32}, {'size': 3}])
def test_checksum_mismatch_leaves_nothing(tmp_path, good_archive, check):
    dest = tmp_path / 'data'
    with pytest.raises(ChecksumError, match='mini.tgz') as info:
        untar_data(good_archive.as_uri(), dest=dest, progress=False, **check)
    assert isinstance(info.value, OSError) and 'try again' in str(info.value)
    assert _tree(dest) == set()  # no partial download, no archive, no folder


def test_offline_gives_one_clear_error(tmp_path):
    def offline(url): raise urllib.error.URLError(OSError(-3, 'Temporary failure in name resolution'))
    target = tmp_path / 'd'
    with pytest.raises(DownloadError) as info:
        untar_data(URLs.IMAGENETTE_160, dest=target, opener=offline)
    message = str(info.value)
    assert URLs.IMAGENETTE_160 in message and 'network' in message and str(target / 'imagenette2-160.tgz') in message
    assert '\n' not in message and info.value.__suppress_context__ and info.value.__cause__ is None
    assert isinstance(info.value, OSError) and _tree(target) == set()
    with pytest.raises(DownloadError, match='missing.tgz'):
        untar_data((tmp_path / 'missing.tgz').as_uri(), dest=target)

    def not_found(url): raise urllib.error.HTTPError(url, 404, 'Not Found', {}, None)
    with pytest.raises(DownloadError, match='HTTP Error 404: Not Found'):
        untar_data('https://example.com/gone.tgz', dest=target, opener=not_found)
    assert _tree(target) == set()


def test_course_datasets_namespace_offline_gives_one_message_saying_where_to_put_the_data(tmp_path, monkeypatch):
    namespace = {}
    exec('from minilearn import *', namespace)
    datasets = namespace['datasets']
    data_dir = tmp_path / 'data'
    monkeypatch.setenv('MINILEARN_DATA', str(data_dir))

    def no_network(*args, **kwargs): raise socket.gaierror(-3, 'Temporary failure in name resolution')
    monkeypatch.setattr(socket, 'getaddrinfo', no_network)
    monkeypatch.setattr(socket.socket, 'connect', no_network)
    with pytest.raises(DownloadError) as info:
        datasets.untar_data(datasets.URLs.IMAGENETTE_160)
    message = str(info.value)
    assert message.startswith(f'could not download {URLs.IMAGENETTE_160} (') and 'name resolution' in message
    assert f"save it as {data_dir / 'imagenette2-160.tgz'}" in message
    assert f"put the extracted folder at {data_dir / 'imagenette2-160'}" in message and '$MINILEARN_DATA' in message
    assert '\n' not in message and info.value.__suppress_context__ and info.value.__cause__ is None
    assert _tree(data_dir) == set()  # no partial file left behind
    (data_dir / 'imagenette2-160' / 'train').mkdir(parents=True)  # where the message said: used, still offline
    assert datasets.untar_data(datasets.URLs.IMAGENETTE_160) == data_dir / 'imagenette2-160'


def test_incomplete_transfer_is_an_error(tmp_path):
    opener = CountingOpener(b'abc', length=10)
    with pytest.raises(DownloadError, match='3 of 10 bytes'):
        download_url('https://example.com/f.bin', tmp_path / 'f.bin', opener=opener, progress=False)
    assert _tree(tmp_path) == set()


def test_download_url_replaces_atomically(tmp_path):
    target = tmp_path / 'sub' / 'f.bin'
    assert download_url('https://e.com/f', target, md5=hashlib.md5(b'xyz').hexdigest(),
                        opener=CountingOpener(b'xyz'), progress=False) == target
    assert target.read_bytes() == b'xyz'
    with pytest.raises(ChecksumError):
        download_url('https://e.com/f', target, md5='0' * 32, opener=CountingOpener(b'new'), progress=False)
    assert target.read_bytes() == b'xyz' and _tree(tmp_path) == {'sub', 'sub/f.bin'}  # the old file is untouched


UNSAFE = {
    'parent': [_file('ok.txt'), _file('../x')],
    'nested-parent': [_file('a/../../x')],
    'absolute': [_file('/tmp/minilearn-evil')],
    'windows-absolute': [_file('C:/evil')],
    'symlink-out': [_link('evil', '../../outside')],
    'symlink-abs': [_link('evil', '/etc')],
    'hardlink-out': [_link('evil', '../outside', tarfile.LNKTYPE)],
    'through-link': [_link('d', '.'), _link('d/e', '..'), _file('d/e/x')],
    'device': [(lambda i: (setattr(i, 'type', tarfile.CHRTYPE), (i, None))[1])(tarfile.TarInfo('dev'))],
    'fifo': [(lambda i: (setattr(i, 'type', tarfile.FIFOTYPE), (i, None))[1])(tarfile.TarInfo('pipe'))],
}


@pytest.mark.parametrize('kind', sorted(UNSAFE))
def test_unsafe_archives_are_refused(tmp_path, kind):
    src = tmp_path / 'src'
    src.mkdir()
    archive = _tar(src / 'evil.tgz', UNSAFE[kind])
    box = tmp_path / 'box'
    dest = box / 'data'
    dest.mkdir(parents=True)
    before = _tree(tmp_path)
    with pytest.raises(UnsafeArchiveError, match='refusing to extract'):
        untar_data(archive.as_uri(), dest=dest, progress=False)
    assert _tree(tmp_path) - before == {'box/data/evil.tgz'}  # only the download itself; nothing extracted
    assert not Path('/tmp/minilearn-evil').exists()


def test_own_checks_without_tarfile_data_filter(tmp_path, good_archive, monkeypatch):
    monkeypatch.delattr(tarfile, 'data_filter')  # Pythons before 3.11.4 / 3.12
    assert (untar_data(good_archive.as_uri(), dest=tmp_path / 'ok', progress=False) / 'train' / 'a.txt').exists()
    archive = _tar(tmp_path / 'evil.tgz', UNSAFE['symlink-out'])
    with pytest.raises(UnsafeArchiveError, match="'evil' is a link pointing outside"):
        extract_archive(archive, tmp_path / 'out' / 'evil')
    assert not (tmp_path / 'out' / 'evil').exists() and list((tmp_path / 'out').iterdir()) == []


def test_not_an_archive(tmp_path):
    bad = tmp_path / 'bad.tgz'
    bad.write_bytes(b'not a tar')
    with pytest.raises(ValueError, match='not a readable tar archive'):
        extract_archive(bad, tmp_path / 'out')
    assert not (tmp_path / 'out').exists()


def test_known_urls_are_real_addresses():
    assert URLs.IMAGENETTE_160 == 'https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-160.tgz'
    assert URLs.IMAGEWOOF_160 == 'https://s3.amazonaws.com/fast-ai-imageclas/imagewoof2-160.tgz'
    assert URLs.CIFAR10_PYTHON == 'https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz'
    assert URLs.MNIST_IDX.startswith('https://') and len(URLs.MNIST_FILES) == 4


def test_download_mnist_checks_md5(tmp_path):
    with pytest.raises(ChecksumError, match='train-images-idx3-ubyte.gz'):
        download_mnist(tmp_path / 'mnist', opener=CountingOpener(b'fake'), progress=False)
    assert _tree(tmp_path / 'mnist') == set()


@pytest.mark.parametrize('url', ['https://example.org/a/..', 'https://example.org/.tgz'])
def test_untar_data_refuses_urls_that_name_no_folder(tmp_path, url):
    from minilearn.data.external import untar_data
    with pytest.raises(ValueError, match='cannot name a dataset folder'):
        untar_data(url, dest=tmp_path / 'data', opener=lambda u: (_ for _ in ()).throw(AssertionError('no download')))
    assert not (tmp_path / 'data').exists() or not any((tmp_path / 'data').iterdir())
