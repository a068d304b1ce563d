"""The readers of the standard formats (MNIST idx, CIFAR-10 python batches and image folders), on files written here."""
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

from minilearn.data.formats import (CIFAR10_CLASSES, cifar10_data, cifar10_databunch, mnist_data, mnist_databunch,
                                    read_cifar10, read_idx, read_mnist)


# ---- MNIST idx ---------------------------------------------------------------------------------

def _idx(path: Path, arr: np.ndarray, gz: bool = True) -> Path:
    code = {np.uint8: 0x08, np.int32: 0x0C}[arr.dtype.type]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f'>{arr.ndim}I', *arr.shape)
    data = header + arr.astype(arr.dtype.newbyteorder('>')).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.fixture
def mnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / 'mnist'
    for prefix, n in (('train', 40), ('t10k', 20)):
        _idx(folder / f'{prefix}-images-idx3-ubyte.gz', rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _idx(folder / f'{prefix}-labels-idx1-ubyte.gz', (np.arange(n) % 10).astype(np.uint8))
    return folder


def test_read_idx_round_trip(tmp_path):
    arr = np.arange(24, dtype=np.int32).reshape(2, 3, 4) * 1000
    assert torch.equal(read_idx(_idx(tmp_path / 'a.gz', arr)), torch.from_numpy(arr))
    u8 = np.arange(6, dtype=np.uint8).reshape(2, 3)
    assert torch.equal(read_idx(_idx(tmp_path / 'b', u8, gz=False)), torch.from_numpy(u8))


def test_read_idx_errors_name_the_file(tmp_path):
    good = _idx(tmp_path / 'c', np.zeros((4, 5), np.uint8), gz=False)
    good.write_bytes(good.read_bytes()[:-3])
    with pytest.raises(ValueError, match=r"'.*c' is truncated"):
        read_idx(good)
    (tmp_path / 'd').write_bytes(b'\x01\x02\x03\x04rest')
    with pytest.raises(ValueError, match='not an idx file'):
        read_idx(tmp_path / 'd')
    (tmp_path / 'e.gz').write_bytes(b'not gzip')
    with pytest.raises(OSError, match='e.gz'):
        read_idx(tmp_path / 'e.gz')


def test_read_mnist_and_databunch(mnist_dir):
    x, y = read_mnist(mnist_dir, 'train')
    assert x.shape == (40, 28, 28) and x.dtype == torch.uint8 and y.dtype == torch.int64
    assert y.tolist() == [i % 10 for i in range(40)]
    data = mnist_databunch(mnist_dir, bs=8)
    assert data.vocab == [str(i) for i in range(10)] and (data.c_in, data.c_out) == (1, 10)
    xb, yb = next(iter(data.valid_dl))
    assert xb.shape == (16, 1, 28, 28) and xb.dtype == torch.float32
    expected = read_mnist(mnist_dir, 'test')[0][:16].float().div(255).unsqueeze(1)
    torch.testing.assert_close(xb, expected)
    assert yb.tolist() == [i % 10 for i in range(16)]


def test_mnist_n_per_class_and_split_test(mnist_dir):
    sd = mnist_data(mnist_dir, n_per_class=2)
    assert sd.train.y.items == list(range(10)) * 2 and len(sd.valid) == 20
    sd = mnist_data(mnist_dir, split_test=0.25)
    assert (len(sd.train), len(sd.valid)) == (15, 5)
    test_x, _ = read_mnist(mnist_dir, 'test')
    assert torch.equal(sd.valid.x.items[:, 0], test_x[15:])
    for name in ('train-images-idx3-ubyte.gz', 'train-labels-idx1-ubyte.gz'): (mnist_dir / name).unlink()
    assert len(mnist_data(mnist_dir, split_test=0.5).train) == 10  # the test files alone suffice
    with pytest.raises(FileNotFoundError, match='train-images-idx3-ubyte'):
        mnist_data(mnist_dir)


# ---- CIFAR-10 ----------------------------------------------------------------------------------

def _cifar_batches(folder: Path, n_per_batch: int = 6) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']
    for b, name in enumerate(names):
        batch = {b'batch_label': name.encode(), b'labels': [(b + i) % 10 for i in range(n_per_batch)],
                 b'data': rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
                 b'filenames': [f'{name}_{i}.png'.encode() for i in range(n_per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b'label_names': [c.encode() for c in CIFAR10_CLASSES], b'num_cases_per_batch': n_per_batch,
            b'num_vis': 3072}
    (folder / 'batches.meta').write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def test_read_cifar10_python_batches(tmp_path):
    folder = _cifar_batches(tmp_path / 'cifar-10-batches-py')
    x, y, classes = read_cifar10(tmp_path, 'train')  # the parent folder is found too
    assert x.shape == (30, 3, 32, 32) and x.dtype == torch.uint8 and classes == list(CIFAR10_CLASSES)
    first = pickle.loads((folder / 'data_batch_1').read_bytes())
    row = first[b'data'][2]
    assert x[2, 0, 0, 0] == row[0] and x[2, 1, 0, 0] == row[1024] and x[2, 2, 31, 31] == row[3071]
    assert x[2, 0, 1, 5] == row[32 + 5]  # channel-major, then row-major
    assert y[:6].tolist() == first[b'labels']
    xt, yt, _ = read_cifar10(folder, 'test')
    assert xt.shape == (6, 3, 32, 32) and yt.tolist() == [(5 + i) % 10 for i in range(6)]


def test_cifar10_databunch_from_batches(tmp_path):
    _cifar_batches(tmp_path / 'c')
    sd = cifar10_data(tmp_path / 'c', n_per_class=2)
    train_y = read_cifar10(tmp_path / 'c')[1]
    expected = [i for i in range(30) if (train_y[:i] == train_y[i]).sum() < 2]
    assert sd.train.y.items == train_y[expected].tolist()
    data = cifar10_databunch(tmp_path / 'c', bs=4)
    assert data.vocab == list(CIFAR10_CLASSES) and (data.c_in, data.c_out) == (3, 10)
    xb, yb = next(iter(data.valid_dl))
    assert xb.shape == (6, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert 0 <= xb.min() and xb.max() <= 1


def test_cifar_batches_never_run_code(tmp_path):
    folder = _cifar_batches(tmp_path / 'c')

    class Evil:
        def __reduce__(self):
            return (os.system, (f'touch {tmp_path / "pwned"}',))
    (folder / 'data_batch_3').write_bytes(pickle.dumps({b'data': Evil()}, protocol=2))
    with pytest.raises(OSError, match='data_batch_3'):
        read_cifar10(folder)
    assert not (tmp_path / 'pwned').exists()


def test_cifar10_image_folder_layout(tmp_path):
    root = tmp_path / 'cifar10'
    for split, n in (('train', 3), ('test', 2)):
        for c, cls in enumerate(CIFAR10_CLASSES[:4]):
            for i in range(n):
                (root / split / cls).mkdir(parents=True, exist_ok=True)
                PIL.Image.new('RGB', (32, 32), (c * 60, i * 40, 0)).save(root / split / cls / f'{i:04d}.jpg')
    sd = cifar10_data(root, n_per_class=2)
    assert len(sd.train) == 8 and len(sd.valid) == 8
    assert sd.train.proc_y.vocab == list(CIFAR10_CLASSES[:4])
    assert [f.name for f in sd.train.x.items[:2]] == ['0000.jpg', '0001.jpg']
    data = cifar10_databunch(root, bs=4)
    xb, yb = next(iter(data.valid_dl))
    assert xb.shape == (8, 3, 32, 32) and yb.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    with pytest.raises(FileNotFoundError, match='neither CIFAR-10 python batches'):
        cifar10_data(tmp_path)
