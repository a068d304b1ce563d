"""Item transforms, their order, and showing images and batches."""
import numpy as np
import PIL.Image
import pytest
import torch

from minilearn.callbacks.transforms import Normalize
from minilearn.data.transforms import (MakeRGB, ResizeFixed, compose, make_rgb, order_tfms, show_batch, show_image,
                                       to_byte_tensor, to_float_tensor)


def _rgb(w=5, h=4, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return PIL.Image.fromarray(arr, 'RGB'), arr


def test_course_orders():
    tfms = (make_rgb, ResizeFixed(3), to_byte_tensor, to_float_tensor)
    assert [t._order for t in tfms] == [0, 10, 20, 30]


@pytest.mark.parametrize('mode', ['L', 'RGBA', 'P', 'CMYK'])
def test_make_rgb_converts(mode):
    im = PIL.Image.new(mode, (3, 2))
    out = make_rgb(im)
    assert out.mode == 'RGB' and out.size == (3, 2)
    assert MakeRGB()(im).mode == 'RGB'


def test_make_rgb_keeps_rgb_and_rejects_tensors():
    im, _ = _rgb()
    assert make_rgb(im) is im
    with pytest.raises(TypeError, match='PIL image'):
        make_rgb(torch.zeros(3, 2, 2))


def test_resize_fixed():
    im, _ = _rgb(7, 5)
    assert ResizeFixed(4)(im).size == (4, 4)
    assert ResizeFixed((6, 3))(im).size == (6, 3)
    assert ResizeFixed((7, 5))(im) is im
    assert 'size=(4, 4)' in repr(ResizeFixed(4))
    for bad in (0, -2, (3,), 2.5, 'a', True):
        with pytest.raises(ValueError, match='ResizeFixed size'):
            ResizeFixed(bad)
    with pytest.raises(TypeError, match='before to_byte_tensor'):
        ResizeFixed(4)(torch.zeros(3, 5, 5, dtype=torch.uint8))


def test_to_byte_tensor_matches_pixels():
    im, arr = _rgb(5, 4)
    t = to_byte_tensor(im)
    assert t.dtype == torch.uint8 and t.shape == (3, 4, 5)
    assert torch.equal(t, torch.from_numpy(arr).permute(2, 0, 1))
    gray = PIL.Image.fromarray(arr[..., 0], 'L')
    g = to_byte_tensor(gray)
    assert g.shape == (1, 4, 5) and torch.equal(g[0], torch.from_numpy(arr[..., 0]))


def test_to_byte_tensor_rejects_wide_modes():
    with pytest.raises(TypeError, match="PIL mode 'I'"):
        to_byte_tensor(PIL.Image.new('I', (2, 2)))


def test_to_float_tensor():
    t = torch.tensor([[[0, 51, 255]]], dtype=torch.uint8)
    out = to_float_tensor(t)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, torch.tensor([[[0., 0.2, 1.]]]))
    assert t[0, 0, 1] == 51  # the input is not modified
    with pytest.raises(TypeError, match='uint8 tensor'):
        to_float_tensor(out)


def test_compose_sorts_by_order():
    im, arr = _rgb(6, 6)
    scrambled = [to_float_tensor, ResizeFixed(3), to_byte_tensor, make_rgb]
    out = compose(im, scrambled)
    expected = torch.from_numpy(np.array(im.resize((3, 3), PIL.Image.Resampling.BILINEAR))).permute(2, 0, 1) / 255.
    torch.testing.assert_close(out, expected)


def test_unordered_callables_run_where_they_stand():
    def a(x): return x
    def b(x): return x
    def c(x): return x
    resize = ResizeFixed(3)
    # a is first (0, ahead of make_rgb by list position); b follows to_byte_tensor (20); c follows make_rgb (0)
    ordered = order_tfms([a, to_float_tensor, to_byte_tensor, b, resize, make_rgb, c])
    assert ordered == [a, make_rgb, c, resize, to_byte_tensor, b, to_float_tensor]
    with pytest.raises(TypeError, match='position 1'):
        order_tfms([make_rgb, 3])


def test_torchvision_v1_and_v2_transforms():
    pytest.importorskip('torchvision')
    from torchvision import transforms as T
    from torchvision.transforms import v2
    im, _ = _rgb(10, 8)
    v1_out = compose(im, [make_rgb, T.Resize((4, 4)), T.ToTensor(), T.Normalize([0.5] * 3, [0.5] * 3)])
    v2_out = compose(im, [make_rgb, v2.Resize((4, 4)), v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
                          v2.Normalize([0.5] * 3, [0.5] * 3)])
    assert v1_out.shape == v2_out.shape == (3, 4, 4)
    # a torchvision op mixed with the course transforms runs after the ordered transform it follows
    flipped = compose(im, [make_rgb, to_byte_tensor, to_float_tensor, v2.RandomHorizontalFlip(p=1.0)])
    torch.testing.assert_close(flipped, compose(im, [make_rgb, to_byte_tensor, to_float_tensor]).flip(-1))


def test_show_image_returns_figure():
    import matplotlib.figure
    fig = show_image(torch.rand(3, 4, 5), title='x')
    assert isinstance(fig, matplotlib.figure.Figure)
    ax = fig.axes[0]
    assert ax.get_title() == 'x' and ax.images[0].get_array().shape == (4, 5, 3)
    gray = show_image(torch.rand(1, 4, 5)).axes[0].images[0]
    assert gray.get_array().shape == (4, 5) and gray.get_cmap().name == 'gray'
    pil_im, arr = _rgb()
    assert np.array_equal(show_image(pil_im).axes[0].images[0].get_array(), arr)


def test_show_batch_denormalizes_and_titles():
    mean, std = torch.tensor([0.5, 0.4, 0.3]), torch.tensor([0.2, 0.1, 0.3])
    raw = torch.rand(5, 3, 4, 4)
    normed = (raw - mean[:, None, None]) / std[:, None, None]
    fig = show_batch(normed, torch.tensor([2, 0, 1, 1, 0]), vocab=['cat', 'dog', 'bird'], n=4,
                     norm=Normalize(mean, std))
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 4
    assert [ax.get_title() for ax in shown] == ['bird', 'cat', 'dog', 'dog']
    for i, ax in enumerate(shown):
        np.testing.assert_allclose(ax.images[0].get_array(), raw[i].permute(1, 2, 0).numpy(), atol=1e-5)
    with pytest.raises(ValueError, match='at least one'):
        show_batch(normed[:0])
