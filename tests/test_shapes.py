"""The generated shapes dataset: deterministic, balanced, well-formed, written as an image folder, learnable."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minilearn.data.core import DataBunch
from minilearn.data.shapes import _SDFS, SHAPE_NAMES, ShapesDataset, make_shapes, save_shapes_folder, shapes_databunch


def test_shapes_dtypes_and_range():
    images, labels = make_shapes(50, size=24, n_classes=7, seed=3)
    assert images.shape == (50, 3, 24, 24) and images.dtype == torch.uint8
    assert labels.shape == (50,) and labels.dtype == torch.int64
    assert labels.min() >= 0 and labels.max() < 7
    assert images.float().std() > 20  # not blank: shapes, colours and noise use the byte range


def test_same_seed_same_bytes_other_seed_differs():
    a_images, a_labels = make_shapes(64, seed=5)
    b_images, b_labels = make_shapes(64, seed=5)
    assert torch.equal(a_images, b_images) and torch.equal(a_labels, b_labels)
    c_images, _ = make_shapes(64, seed=6)
    assert not torch.equal(a_images, c_images)
    assert (a_images.float() - c_images.float()).abs().mean() > 10  # not a near copy


def test_does_not_touch_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_shapes(20, seed=1)
    assert torch.equal(torch.rand(3), expected)


def test_classes_balanced_and_shuffled():
    _, labels = make_shapes(1003, n_classes=10, seed=0)
    counts = torch.bincount(labels, minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 1003
    assert not torch.equal(labels[:20], torch.arange(20) % 10)  # random order, not cycling


def _mask(name, angle, size=64):
    axis = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    y, x = torch.meshgrid(axis, axis, indexing='ij')
    cos, sin = math.cos(angle), math.sin(angle)
    return _SDFS[name](cos * x + sin * y, cos * y - sin * x) < 0


def test_shapes_stay_distinct_under_rotation():
    # Rotation is random, so two classes must differ at every relative angle (a plus is not a rotated
    # cross, a diamond is not a rotated square) and every shape must fit the unit disc.
    assert set(_SDFS) == set(SHAPE_NAMES)
    rotated = {name: torch.stack([_mask(name, 2 * math.pi * i / 72) for i in range(72)]) for name in SHAPE_NAMES}
    for i, a in enumerate(SHAPE_NAMES):
        reference = rotated[a][0]
        assert 0.1 < reference.float().mean() < math.pi / 4, a
        for b in SHAPE_NAMES[i + 1:]:
            iou = (reference & rotated[b]).sum((1, 2)) / (reference | rotated[b]).sum((1, 2))
            assert iou.max() < 0.85, f"{a} and {b} overlap {float(iou.max()):.2f} at some rotation"


@pytest.mark.parametrize('kwargs, message', [
    (dict(n=-1), 'n must be'), (dict(n=5, size=4), 'size must be'), (dict(n=5, n_classes=1), 'n_classes must be'),
    (dict(n=5, n_classes=len(SHAPE_NAMES) + 1), 'at most'), (dict(n=5, seed=-2), 'seed must be'),
    (dict(n=2.5), 'n must be')])
def test_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_shapes(**kwargs)


def test_databunch():
    data = shapes_databunch(60, 20, bs=16, n_classes=5, seed=1)
    assert isinstance(data, DataBunch)
    assert data.c_in == 3 and data.c_out == 5 and data.vocab == list(SHAPE_NAMES[:5])
    assert isinstance(data.train_ds, ShapesDataset) and len(data.train_ds) == 60 and len(data.valid_ds) == 20
    xb, yb = next(iter(data.train_dl))
    assert xb.shape == (16, 3, 32, 32) and xb.dtype == torch.float32
    assert 0 <= xb.min() and xb.max() <= 1
    assert yb.dtype == torch.int64
    vx, _ = next(iter(data.valid_dl))
    assert vx.shape[0] == 20  # valid batches are 2*bs
    # training and validation images are drawn independently
    assert not torch.equal(data.train_ds.x[:20], data.valid_ds.x)
    # same arguments, same data
    again = shapes_databunch(60, 20, bs=16, n_classes=5, seed=1)
    assert torch.equal(again.train_ds.x, data.train_ds.x) and torch.equal(again.valid_ds.y, data.valid_ds.y)


def test_dataset_item_is_float_view_of_bytes():
    images, labels = make_shapes(4, seed=0)
    ds = ShapesDataset(images, labels)
    x, y = ds[2]
    assert torch.allclose(x * 255, images[2].float()) and y == labels[2]
    assert torch.equal(ds.x, images)  # reading an item does not alter the stored bytes


def test_save_folder(tmp_path):
    from PIL import Image
    root = save_shapes_folder(tmp_path / 'shapes', n_per_class=3, n_valid_per_class=2, n_classes=4, size=16, seed=2)
    assert root == tmp_path / 'shapes'
    for split, n in (('train', 3), ('val', 2)):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(SHAPE_NAMES[:4])
        for name in SHAPE_NAMES[:4]:
            files = sorted((root / split / name).glob('*.png'))
            assert len(files) == n
    im = Image.open(next((root / 'train' / 'circle').glob('*.png')))
    assert im.size == (16, 16) and im.mode == 'RGB'
    # the files hold exactly the generated bytes
    data = shapes_databunch(12, 8, bs=4, size=16, n_classes=4, seed=2)
    first_circle = data.train_ds.x[(data.train_ds.y == 0).nonzero()[0, 0]]
    saved = torch.from_numpy(np.array(Image.open(root / 'train' / 'circle' / '00000.png')))
    assert torch.equal(saved.permute(2, 0, 1), first_circle)


def test_learnable_by_a_tiny_cnn():
    # Learnable (well above chance after a few epochs) but not trivial (far from perfect so early).
    torch.manual_seed(0)
    data = shapes_databunch(2400, 300, bs=32, n_classes=4, seed=0, generator=torch.Generator().manual_seed(0))
    model = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(5):
        model.train()
        for xb, yb in data.train_dl:
            F.cross_entropy(model(xb - 0.5), yb).backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    with torch.no_grad():
        correct = sum((model(xb - 0.5).argmax(1) == yb).sum().item() for xb, yb in data.valid_dl)
    accuracy = correct / len(data.valid_ds)
    assert 0.25 + 0.2 < accuracy < 0.95, f"accuracy {accuracy:.3f} (chance 0.25)"
