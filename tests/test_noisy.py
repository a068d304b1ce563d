"""Label noise: exact counts, masks, untouched inputs, reproducibility; noisy datasets; finding label issues."""
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from minilearn.callbacks.device import DeviceCallback
from minilearn.data.core import DataBunch, Dataset
from minilearn.data.items import CategoryProcessor, ItemList, LabeledData, SplitData
from minilearn.learner import Learner
from minilearn.losses import LabelSmoothingCrossEntropy
from minilearn.noisy import LabelIssues, NoisyLabels, add_label_noise, find_label_issues, inject_label_noise
from tests.helpers import mlp


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- inject_label_noise -------------------------------------------------------------------------
@pytest.mark.parametrize('ratio', [0., 0.1, 0.25, 0.5, 1.])
def test_exact_number_of_labels_changed_with_exclude_true(ratio):
    labels = torch.randint(0, 4, (203,))
    noisy, changed = inject_label_noise(labels, ratio, n_classes=4, exclude_true=True, generator=gen())
    assert int(changed.sum()) == round(203 * ratio)
    assert torch.equal(changed, noisy != labels)
    assert noisy.dtype == labels.dtype and noisy.min() >= 0 and noisy.max() < 4


def test_default_redraws_exactly_round_n_ratio_positions_which_may_keep_their_class():
    labels = torch.randint(0, 3, (1000,))
    noisy, changed = inject_label_noise(labels, 0.3, n_classes=3, generator=gen(5))
    redrawn = torch.randperm(1000, generator=gen(5))[:300]  # the positions drawn, reproduced independently
    outside = torch.ones(1000, dtype=torch.bool)
    outside[redrawn] = False
    assert torch.equal(noisy[outside], labels[outside])
    assert torch.equal(changed, noisy != labels)
    assert 150 < int(changed.sum()) < 250  # about 300·(1 − 1/3) actually change


def test_input_is_untouched_for_tensors_lists_and_arrays():
    labels = torch.tensor([0, 1, 2, 3] * 10)
    copy = labels.clone()
    noisy, _ = inject_label_noise(labels, 0.5, exclude_true=True, generator=gen())
    assert torch.equal(labels, copy) and noisy is not labels
    as_list, as_array = copy.tolist(), copy.numpy().copy()
    result = inject_label_noise(as_list, 0.5, exclude_true=True, generator=gen())
    assert as_list == copy.tolist() and isinstance(result, NoisyLabels) and torch.equal(result.labels, noisy)
    inject_label_noise(as_array, 0.5, generator=gen())
    assert np.array_equal(as_array, copy.numpy())


def test_reproducible_with_a_generator_and_global_rng_untouched():
    labels = torch.randint(0, 10, (500,))
    state = torch.get_rng_state()
    a = inject_label_noise(labels, 0.2, generator=gen(1))
    b = inject_label_noise(labels, 0.2, generator=gen(1))
    c = inject_label_noise(labels, 0.2, generator=gen(2))
    assert torch.equal(state, torch.get_rng_state())
    assert torch.equal(a.labels, b.labels) and torch.equal(a.changed, b.changed)
    assert not torch.equal(a.labels, c.labels)


def test_exclude_true_draws_every_other_class():
    labels = torch.zeros(4000, dtype=torch.long)
    noisy, changed = inject_label_noise(labels, 1., n_classes=5, exclude_true=True, generator=gen())
    assert changed.all()
    counts = torch.bincount(noisy, minlength=5)
    assert counts[0] == 0 and (counts[1:] - 1000).abs().max() < 120  # uniform over the 4 others


def test_bad_arguments_are_clear_errors():
    labels = torch.tensor([0, 1, 2])
    for bad in (-0.1, 1.5, float('nan')):
        with pytest.raises(ValueError, match=r'noise_ratio must be a number in \[0, 1\]'):
            inject_label_noise(labels, bad)
    with pytest.raises(TypeError, match='integer class indices'):
        inject_label_noise(torch.tensor([0.5, 1.]), 0.1)
    with pytest.raises(ValueError, match=r'labels must lie in \[0, n_classes=2\)'):
        inject_label_noise(labels, 0.1, n_classes=2)
    with pytest.raises(ValueError, match='at least 2 classes'):
        inject_label_noise(torch.zeros(3, dtype=torch.long), 0.5, exclude_true=True)


# ---- add_label_noise on datasets ------------------------------------------------------------------
class FolderLike:
    """torchvision ImageFolder's label storage: `targets`, `classes`, and `samples` aliased as `imgs`."""

    def __init__(self, n):
        self.classes = ['a', 'b', 'c']
        self.targets = [i % 3 for i in range(n)]
        self.samples = [(f'{i}.png', t) for i, t in enumerate(self.targets)]
        self.imgs = self.samples


def test_add_label_noise_to_a_torchvision_style_dataset_keeps_clean_targets():
    ds = FolderLike(30)
    clean = list(ds.targets)
    noisy, changed = add_label_noise(ds, 0.4, exclude_true=True, generator=gen())
    assert isinstance(ds.targets, list) and ds.targets == noisy.tolist()
    assert ds.clean_targets == clean and torch.equal(ds.noise_mask, changed) and int(changed.sum()) == 12
    assert [t for _, t in ds.samples] == ds.targets and ds.imgs is ds.samples
    add_label_noise(ds, 0.1, exclude_true=True, generator=gen())  # again: from the clean labels
    assert ds.clean_targets == clean and sum(a != b for a, b in zip(ds.targets, clean)) == 3


def test_add_label_noise_to_labeled_data_and_datasets():
    x = ItemList(list(range(20)))
    ll = LabeledData(x, ItemList(['cat', 'dog', 'emu', 'dog'] * 5), proc_y=CategoryProcessor())
    clean = list(ll.y.items)
    _, changed = add_label_noise(ll, 0.5, exclude_true=True, generator=gen())
    assert ll.clean_targets == clean and int(changed.sum()) == 10
    assert [ll[i][1] for i in range(20)] == ll.y.items and all(0 <= t < 3 for t in ll.y.items)
    ds = Dataset(torch.randn(10, 2), torch.tensor([0, 1] * 5))
    _, changed = add_label_noise(ds, 0.3, exclude_true=True, generator=gen())
    assert torch.equal(ds.y != ds.clean_targets, changed) and int(changed.sum()) == 3
    with pytest.raises(TypeError, match=r'add_label_noise\(ll.train'):
        add_label_noise(SplitData(ll, ll), 0.1)
    with pytest.raises(TypeError, match='exposes no labels'):
        add_label_noise(object(), 0.1)


# ---- find_label_issues --------------------------------------------------------------------------
def test_find_label_issues_ranks_noisy_labels_first():
    g = gen(3)
    x = torch.randn(600, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(1)
    train = Dataset(x[:480], y[:480].clone())
    _, noisy_mask = add_label_noise(train, 0.2, n_classes=3, exclude_true=True, generator=g)
    data = DataBunch.from_datasets(train, Dataset(x[480:], y[480:]), bs=32, c_in=8, c_out=3)
    learn = Learner(mlp(), data, LabelSmoothingCrossEntropy(), lr=0.3, cbs=[DeviceCallback('cpu')])
    learn.fit(4)
    issues = find_label_issues(learn, DataLoader(train, batch_size=64, shuffle=True))
    assert isinstance(issues, LabelIssues)
    assert (issues.losses[:-1] >= issues.losses[1:]).all()
    assert torch.equal(issues.labels, train.y[issues.indices])  # dataset order, even from a shuffled loader
    assert sorted(issues.indices.tolist()) == list(range(480))
    n_noisy = int(noisy_mask.sum())
    precision = noisy_mask[issues.indices[:n_noisy]].float().mean()
    assert precision > 0.6  # vs 0.2 for a random ranking
    assert learn.loss_func.reduction == 'mean'
