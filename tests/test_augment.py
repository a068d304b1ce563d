"""minilearn.callbacks.augment: RandomCropPad, RandomFlip and RandomResizedCrop against per-item references,
their draws, training batches only, and their argument checks."""
import pytest
import torch
import torch.nn.functional as F

from helpers import BatchLog, images, quiet_fit, small_cnn
from minilearn.callbacks.augment import RandomCropPad, RandomFlip, RandomResizedCrop
from minilearn.callbacks.transforms import BatchTransformXCallback
from minilearn.data.core import DataBunch
from minilearn.data.normalize import Normalize
from minilearn.learner import Learner


FORMATS = [torch.contiguous_format, torch.channels_last]


def batch(fmt, n=6, c=3, h=7, w=9):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, c, h, w, generator=g).contiguous(memory_format=fmt)


@pytest.mark.parametrize('mode', ['zeros', 'reflect'])
@pytest.mark.parametrize('fmt', FORMATS)
def test_random_crop_pad_equals_a_per_item_reference(mode, fmt):
    xb, cb = batch(fmt), RandomCropPad(pad=3, mode=mode)
    top, left = cb.draw(xb)
    out = cb.apply(xb, (top, left))
    assert out.shape == xb.shape and out.is_contiguous(memory_format=fmt)
    for i in range(len(xb)):
        padded = F.pad(xb[i:i + 1], (3,) * 4, mode='constant' if mode == 'zeros' else 'reflect')[0]
        assert torch.equal(out[i], padded[:, top[i]:top[i] + 7, left[i]:left[i] + 9])
    assert 0 <= int(top.min()) and int(top.max()) <= 6 and len(set(top.tolist())) > 1


@pytest.mark.parametrize('fmt', FORMATS)
def test_random_flip_equals_a_per_item_reference(fmt):
    xb, cb = batch(fmt, n=40), RandomFlip(p=0.5)
    flip = cb.draw(xb)
    out = cb.apply(xb, flip)
    assert out.is_contiguous(memory_format=fmt) and 0 < int(flip.sum()) < 40
    for i in range(len(xb)):
        assert torch.equal(out[i], xb[i].flip(-1) if flip[i] else xb[i])
    assert not RandomFlip(p=0.).draw(xb).any() and RandomFlip(p=1.).draw(xb).all()


@pytest.mark.parametrize('fmt', FORMATS)
def test_crop_and_flip_together_flip_within_the_crop_with_the_same_draws(fmt):
    xb = batch(fmt, n=16)
    learn = Learner(small_cnn(), DataBunch.from_tensors(xb, torch.zeros(16, dtype=torch.long), bs=16, seed=0),
                    F.cross_entropy)
    crop, flip = RandomCropPad(2), RandomFlip()
    learn.add_cbs([crop, flip])
    crop.begin_fit(), flip.begin_fit()
    learn.xb, learn.in_train = xb, True
    torch.manual_seed(0)
    crop.begin_batch()
    flip.begin_batch()  # done by the crop: nothing more here
    torch.manual_seed(0)
    offsets, flips = crop.draw(xb), flip.draw(xb)
    expected = flip.apply(crop.apply(xb, offsets), flips)  # the two applied one after the other
    assert torch.equal(learn.xb, expected) and learn.xb.is_contiguous(memory_format=fmt) and 0 < int(flips.sum()) < 16
    crop.after_fit(), flip.after_fit()
    learn.xb = xb
    torch.manual_seed(0)
    flip.begin_batch()  # outside a fit with the crop it flips on its own
    torch.manual_seed(0)
    assert torch.equal(learn.xb, flip.apply(xb, flip.draw(xb)))


def bilinear_reference(img, top, left, bh, bw, size):
    """One image's box resized to `size` by hand: source pixel of output (i, j) at top + (i + 0.5)·bh/H' - 0.5."""
    c, h, w = img.shape
    out = torch.empty(c, *size, dtype=torch.float64)
    img = img.double()
    for i in range(size[0]):
        for j in range(size[1]):
            sy = min(max(top + (i + 0.5) * bh / size[0] - 0.5, 0.), h - 1.)
            sx = min(max(left + (j + 0.5) * bw / size[1] - 0.5, 0.), w - 1.)
            y0, x0 = int(sy), int(sx)
            y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
            dy, dx = sy - y0, sx - x0
            out[:, i, j] = ((1 - dy) * (1 - dx) * img[:, y0, x0] + (1 - dy) * dx * img[:, y0, x1]
                            + dy * (1 - dx) * img[:, y1, x0] + dy * dx * img[:, y1, x1])
    return out


@pytest.mark.parametrize('fmt', FORMATS)
def test_random_resized_crop_equals_a_per_item_reference(fmt):
    xb, cb = batch(fmt, n=4), RandomResizedCrop((5, 6), scale=(0.3, 1.))
    boxes = cb.draw(xb)
    top, left, bh, bw = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= 7 + 1e-5).all() and (left + bw <= 9 + 1e-5).all()
    area = bh * bw / 63
    assert (area >= 0.3 - 1e-5).all() and (area <= 1 + 1e-5).all()
    out = cb.apply(xb, boxes)
    assert out.shape == (4, 3, 5, 6) and out.is_contiguous(memory_format=fmt)
    for i in range(4):
        ref = bilinear_reference(xb[i], *boxes[i].tolist(), (5, 6))
        torch.testing.assert_close(out[i].double(), ref, rtol=1e-4, atol=1e-4)


def test_augmentation_draws_come_from_torch_generator():
    xb = batch(torch.contiguous_format)
    for cb in (RandomCropPad(), RandomFlip(), RandomResizedCrop(7)):
        torch.manual_seed(5)
        a = cb.apply(xb, cb.draw(xb))
        torch.manual_seed(5)
        assert torch.equal(a, cb.apply(xb, cb.draw(xb)))


def test_augmentation_applies_to_training_batches_only_and_not_to_predictions():
    x, y = images(16)
    norm = Normalize([0.5] * 3, [0.25] * 3)
    torch.manual_seed(0)
    learn = Learner(small_cnn(), DataBunch.from_tensors(x, y, x, y, bs=8, seed=0), F.cross_entropy,
                    cbs=[BatchTransformXCallback(norm)])
    plain_preds, _ = learn.get_preds()
    log = BatchLog(train_only=False)
    order = learn.data.train_dl.order(0)
    quiet_fit(learn, 1, cbs=[RandomFlip(1.), log])
    train = [b for b in log.batches if b[0]]
    valid = [b for b in log.batches if not b[0]]
    assert torch.equal(train[0][1], norm(x[order[:8]].float() / 255).flip(-1))  # after normalization, flipped
    assert torch.equal(torch.cat([b[1] for b in valid]), norm(x.float() / 255))  # identity in validation
    learn.add_cbs([RandomCropPad(2), RandomFlip(1.), RandomResizedCrop(8)])  # attached: predictions see plain inputs
    model_preds, _ = learn.get_preds()
    with torch.no_grad(): expected = learn.model(norm(x.float() / 255)).softmax(1)
    torch.testing.assert_close(model_preds, expected)
    assert plain_preds.shape == model_preds.shape


def test_augmentation_arguments_are_checked():
    with pytest.raises(ValueError, match="'zeros' or 'reflect'"): RandomCropPad(mode='edge')
    with pytest.raises(ValueError, match='pad must be an int'): RandomCropPad(pad=-1)
    with pytest.raises(ValueError, match='probability'): RandomFlip(p=2)
    with pytest.raises(ValueError, match='scale'): RandomResizedCrop(8, scale=(0.5, 0.2))
    with pytest.raises(ValueError, match='reflect padding needs pad < image size'):
        cb = RandomCropPad(pad=8, mode='reflect')
        xb = torch.zeros(2, 1, 4, 4)
        cb.apply(xb, cb.draw(xb))
    with pytest.raises(ValueError, match='image batches'): RandomFlip().draw(torch.zeros(4, 10))


def test_random_resized_crop_names_a_bad_scale_or_ratio():
    for kwargs in ({'scale': 0.5}, {'scale': (0.9, 0.2)}, {'ratio': 1.0}):
        with pytest.raises(ValueError, match=r'must be \(low, high\)'):
            RandomResizedCrop(8, **kwargs)


def test_a_whole_image_box_equals_bilinear_interpolation_and_no_padding_is_the_identity():
    xb = batch(torch.contiguous_format, n=3, h=8, w=8)
    cb = RandomResizedCrop((5, 6), scale=(1., 1.), ratio=(1., 1.))
    boxes = cb.draw(xb)
    torch.testing.assert_close(boxes, torch.tensor([[0., 0., 8., 8.]] * 3))
    expected = F.interpolate(xb, size=(5, 6), mode='bilinear', align_corners=False, antialias=False)
    torch.testing.assert_close(cb.apply(xb, boxes), expected, rtol=1e-5, atol=1e-5)
    crop = RandomCropPad(pad=0)
    assert torch.equal(crop.apply(xb, crop.draw(xb)), xb)
