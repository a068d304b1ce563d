"""minilearn.data.normalize: per-channel normalization (normalize_chan, Normalize), its statistics
(channel_stats) and reading them back (tfm_stats, norm_stats)."""
import functools
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from helpers import image_data, linear_data, mlp
from minilearn.callbacks.transforms import BatchTransformXCallback
from minilearn.data.core import Dataset
from minilearn.data.normalize import Normalize, channel_stats, norm_stats, normalize_chan, tfm_stats
from minilearn.learner import Learner


def test_normalize_chan_gives_zero_mean_unit_std_per_channel_any_rank():
    for shape in [(64, 3, 8, 8), (64, 2, 20), (16, 3, 4, 4, 4)]:
        x = torch.randn(*shape) * torch.tensor([2., 5., 0.5][:shape[1]]).reshape((1, -1) + (1,) * (len(shape) - 2)) + 3
        mean, std = channel_stats([(x, None)])
        for fn in (functools.partial(normalize_chan, mean=mean, std=std), Normalize(mean, std)):
            out = fn(x).transpose(0, 1).reshape(shape[1], -1)
            assert torch.allclose(out.mean(1), torch.zeros(shape[1]), atol=1e-4)
            assert torch.allclose(out.std(1, unbiased=False), torch.ones(shape[1]), atol=1e-4)


def test_normalization_follows_the_batch_dtype():
    x = torch.rand(4, 3, 2, 2, dtype=torch.float64)
    assert normalize_chan(x, [0.5] * 3, [0.2] * 3).dtype == torch.float64
    assert Normalize([0.5] * 3, [0.2] * 3)(x.half()).dtype == torch.float16


def test_channel_stats_over_a_dataloader():
    data = image_data(n_train=64, n_valid=32)
    mean, std = channel_stats(data.train_dl)
    x = torch.stack([data.train_ds[i][0] for i in range(len(data.train_ds))])
    assert torch.allclose(mean, x.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(std, x.std((0, 2, 3), unbiased=False), atol=1e-5)


def test_norm_stats_reads_every_way_of_giving_normalization():
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.6, 0.7]
    expected = (torch.tensor(mean), torch.tensor(std))
    for source in ((mean, std), Normalize(mean, std), functools.partial(normalize_chan, mean=mean, std=std),
                   BatchTransformXCallback(Normalize(mean, std))):
        got = norm_stats(source)
        assert torch.allclose(got[0], expected[0]) and torch.allclose(got[1], expected[1])
    learn = Learner(mlp(), linear_data(), F.cross_entropy,
                    cbs=[BatchTransformXCallback(functools.partial(normalize_chan, mean=mean, std=std))])
    assert torch.allclose(norm_stats(learn)[1], expected[1])
    assert norm_stats(Learner(mlp(), linear_data(), F.cross_entropy)) is None and norm_stats(None) is None
    with pytest.raises(TypeError, match='cannot read normalization stats'):
        norm_stats(lambda x: x)


def test_norm_stats_sources():
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.6, 0.7]
    for source in ((mean, std), Normalize(mean, std),
                   BatchTransformXCallback(partial(normalize_chan, mean=torch.tensor(mean), std=torch.tensor(std))),
                   BatchTransformXCallback(Normalize(mean, std))):
        m, s = norm_stats(source)
        torch.testing.assert_close(m, torch.tensor(mean))
        torch.testing.assert_close(s, torch.tensor(std))
    assert norm_stats(None) is None
    with pytest.raises(TypeError, match='normalization stats'):
        norm_stats(object())


def test_normalize_gives_the_same_values_for_channels_last_batches():
    norm = Normalize([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])
    xb = torch.randn(6, 3, 7, 9, generator=torch.Generator().manual_seed(1))
    expected = (xb - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    out = norm(xb.contiguous(memory_format=torch.channels_last))
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(norm(xb), expected, rtol=0, atol=0)


def test_bad_stats_and_batches_are_named():
    with pytest.raises(ValueError, match=r'std must be positive in every channel, got \[0.5, 0.0\]'):
        Normalize([0.1, 0.2], [0.5, 0.])
    with pytest.raises(ValueError, match=r'normalize_chan expects an \(N, C, ...\) batch, got shape \(5,\)'):
        normalize_chan(torch.zeros(5), [0.], [1.])
    with pytest.raises(ValueError, match='channel_stats: the DataLoader gave no batches'):
        channel_stats(DataLoader(Dataset(torch.zeros(0, 3, 2, 2), torch.zeros(0)), batch_size=4))


def test_normalize_equals_torchvision_normalize_per_image():
    from torchvision.transforms import v2
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    x = torch.rand(5, 3, 6, 7)
    expected = torch.stack([v2.Normalize(mean, std)(img) for img in x])
    torch.testing.assert_close(Normalize(mean, std)(x), expected)
    torch.testing.assert_close(normalize_chan(x, mean, std), expected)


def test_channel_stats_of_the_first_batches_equal_torch_over_those_items():
    x = torch.rand(40, 3, 4, 4) * torch.tensor([1., 2., 3.]).view(1, 3, 1, 1)
    dl = DataLoader(Dataset(x, torch.zeros(40)), batch_size=8)
    mean, std = channel_stats(dl, n_batches=2)
    first = x[:16].double()
    torch.testing.assert_close(mean, first.mean((0, 2, 3)).float())
    torch.testing.assert_close(std, first.std((0, 2, 3), unbiased=False).float())


def test_tfm_stats_reads_normalizing_transforms_only():
    from torchvision.transforms import v2
    mean, std = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([0.5, 0.6, 0.7])
    for tfm in (Normalize(mean, std), v2.Normalize(mean.tolist(), std.tolist()),
                partial(normalize_chan, mean=mean, std=std)):
        m, s = tfm_stats(tfm)
        torch.testing.assert_close(m, mean)
        torch.testing.assert_close(s, std)
    assert tfm_stats(partial(normalize_chan, mean=mean)) is None  # std given at call time: unknown here
    assert tfm_stats(lambda x: x * 2) is None and tfm_stats(torch.nn.Identity()) is None
