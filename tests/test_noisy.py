"""Label noise: exact counts, masks, untouched inputs, reproducibility; noisy datasets; out-of-fold probabilities;
confident learning against cleanlab; LabelIssues.show; clean and retrain."""
import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Subset

from minilearn.callbacks.device import DeviceCallback
from minilearn.data.core import DataBunch, Dataset
from minilearn.data.items import CategoryProcessor, ImageList, ItemList, LabeledData, SplitData, parent_labeler
from minilearn.learner import Learner
from minilearn.losses import LabelSmoothingCrossEntropy
from minilearn.noisy import (ASYMMETRIC_MAPPINGS, LabelIssues, NoisyLabels, RelabeledDataset, add_label_noise,
                             check_noise_kind, clean_dataset, dataset_labels, find_label_issues, inject_label_noise,
                             out_of_fold_probs, stratified_folds)
from helpers import mlp


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


# ---- pair and asymmetric noise ------------------------------------------------------------------
@pytest.mark.parametrize('ratio', [0., 0.2, 0.45, 1.])
def test_pair_noise_moves_exactly_round_n_ratio_labels_to_the_next_class(ratio):
    labels = torch.randint(0, 10, (997,), generator=gen(3))
    noisy, changed = inject_label_noise(labels, ratio, n_classes=10, generator=gen(7), kind='pair')
    n = round(997 * ratio)
    positions = torch.randperm(997, generator=gen(7))[:n]  # reproduced by hand: the same draw, then y -> y+1 mod C
    expected = labels.clone()
    expected[positions] = (labels[positions] + 1) % 10
    assert torch.equal(noisy, expected) and int(changed.sum()) == n and torch.equal(changed, noisy != labels)
    assert torch.equal(noisy[changed], (labels[changed] + 1) % 10)  # 9 wraps to 0


def test_asymmetric_noise_flips_exactly_round_nc_ratio_of_each_mapped_class_and_nothing_else():
    labels = torch.arange(10).repeat_interleave(torch.tensor([50, 61, 47, 33, 20, 58, 45, 71, 39, 25]))
    mapping = {7: 1, 2: 7, 5: 6, 6: 5, 3: 8}  # MNIST's: 5 and 6 swap, 2 -> 7 while 7 -> 1
    noisy, changed = inject_label_noise(labels, 0.4, generator=gen(), kind='asymmetric', mapping=mapping)
    assert torch.equal(changed, noisy != labels)
    for c in range(10):
        members = labels == c
        if c in mapping:
            assert int(changed[members].sum()) == round(int(members.sum()) * 0.4), c
            assert (noisy[members & changed] == mapping[c]).all()
        else:
            assert not changed[members].any(), c
    # the flips are chosen among the original labels, class by class in sorted order: reproduced by hand
    expected, g = labels.clone(), gen()
    for c in sorted(mapping):
        members = (labels == c).nonzero().squeeze(1)
        expected[members[torch.randperm(len(members), generator=g)[:round(len(members) * 0.4)]]] = mapping[c]
    assert torch.equal(noisy, expected)
    assert torch.equal(inject_label_noise(labels, 0.4, generator=gen(), kind='asymmetric',
                                          mapping=dict(reversed(list(mapping.items())))).labels, noisy)
    everything = inject_label_noise(labels, 1., kind='asymmetric', mapping=mapping).labels
    assert torch.equal(everything, torch.tensor([mapping.get(c, c) for c in labels.tolist()]))


def test_named_asymmetric_mappings_are_the_papers():
    assert dict(ASYMMETRIC_MAPPINGS['mnist']) == {7: 1, 2: 7, 5: 6, 6: 5, 3: 8}
    names = ['airplane', 'automobile', 'bird', 'cat', 'deer', 'dog', 'frog', 'horse', 'ship', 'truck']
    assert {names[s]: names[t] for s, t in ASYMMETRIC_MAPPINGS['cifar10'].items()} == \
        {'truck': 'automobile', 'bird': 'airplane', 'deer': 'horse', 'cat': 'dog', 'dog': 'cat'}
    labels = torch.arange(10).repeat(20)
    by_name = inject_label_noise(labels, 0.3, generator=gen(), kind='asymmetric', mapping='cifar10')
    by_dict = inject_label_noise(labels, 0.3, generator=gen(), kind='asymmetric',
                                 mapping={9: 1, 2: 0, 4: 7, 3: 5, 5: 3})
    assert torch.equal(by_name.labels, by_dict.labels) and int(by_name.changed.sum()) == 5 * 6


@pytest.mark.parametrize('kind, mapping', [('pair', None), ('asymmetric', 'mnist')])
def test_pair_and_asymmetric_are_seeded_and_leave_input_and_global_rng_alone(kind, mapping):
    labels = torch.randint(0, 10, (400,), generator=gen(1)).int()
    copy, state = labels.clone(), torch.get_rng_state()
    a = inject_label_noise(labels, 0.3, generator=gen(4), kind=kind, mapping=mapping)
    b = inject_label_noise(labels, 0.3, generator=gen(4), kind=kind, mapping=mapping)
    c = inject_label_noise(labels, 0.3, generator=gen(5), kind=kind, mapping=mapping)
    assert torch.equal(labels, copy) and torch.equal(state, torch.get_rng_state())
    assert torch.equal(a.labels, b.labels) and not torch.equal(a.labels, c.labels) and a.labels.dtype == torch.int32


def test_symmetric_stays_the_default():
    labels = torch.randint(0, 10, (300,), generator=gen(2))
    for exclude in (False, True):
        default = inject_label_noise(labels, 0.5, generator=gen(9), exclude_true=exclude)
        named = inject_label_noise(labels, 0.5, generator=gen(9), exclude_true=exclude, kind='symmetric')
        assert torch.equal(default.labels, named.labels)


def test_noise_kind_errors_name_the_problem():
    labels = torch.arange(10).repeat(3)
    with pytest.raises(ValueError, match="kind must be one of 'symmetric', 'pair', 'asymmetric', got 'flip'"):
        inject_label_noise(labels, 0.1, kind='flip')
    for kind in ('symmetric', 'pair'):
        with pytest.raises(ValueError, match=f"kind='{kind}' .* ignores a mapping"):
            inject_label_noise(labels, 0.1, kind=kind, mapping={1: 2})
    with pytest.raises(ValueError, match="kind='asymmetric' needs mapping="):
        inject_label_noise(labels, 0.1, kind='asymmetric')
    with pytest.raises(ValueError, match="no asymmetric mapping named 'svhn'; known: 'mnist', 'cifar10'"):
        inject_label_noise(labels, 0.1, kind='asymmetric', mapping='svhn')
    with pytest.raises(ValueError, match=r'mapping names class 12, not a class of the labels: .* \[0, 10\)'):
        inject_label_noise(labels, 0.1, kind='asymmetric', mapping={3: 12})
    with pytest.raises(ValueError, match='mapping names class -1'):
        inject_label_noise(labels, 0.1, kind='asymmetric', mapping={-1: 3})
    with pytest.raises(ValueError, match='flips class 4 to itself'):
        inject_label_noise(labels, 0.1, kind='asymmetric', mapping={3: 5, 4: 4})
    with pytest.raises(ValueError, match='int class indices'):
        inject_label_noise(labels, 0.1, kind='asymmetric', mapping={'cat': 'dog'})
    with pytest.raises(ValueError, match='non-empty dict'):
        inject_label_noise(labels, 0.1, kind='asymmetric', mapping={})
    for kind, mapping in (('pair', None), ('asymmetric', 'mnist')):
        for bad in (-0.1, 1.01, float('inf')):
            with pytest.raises(ValueError, match=r'noise_ratio must be a number in \[0, 1\]'):
                inject_label_noise(labels, bad, kind=kind, mapping=mapping)
    with pytest.raises(ValueError, match="exclude_true applies to kind='symmetric' only"):
        inject_label_noise(labels, 0.1, kind='pair', exclude_true=True)
    with pytest.raises(ValueError, match='pair noise needs at least 2 classes'):
        inject_label_noise(torch.zeros(4, dtype=torch.long), 0.5, kind='pair')
    # the validator a command line calls before reading any data
    assert check_noise_kind('pair') is None
    assert check_noise_kind('asymmetric', 'mnist') == {7: 1, 2: 7, 5: 6, 6: 5, 3: 8}
    with pytest.raises(ValueError, match='mapping names class 9'):
        check_noise_kind('asymmetric', 'cifar10', n_classes=5)


def test_add_label_noise_passes_the_kind_through():
    ds = Dataset(torch.randn(100, 2), torch.arange(10).repeat(10))
    _, changed = add_label_noise(ds, 0.5, generator=gen(), kind='asymmetric', mapping='mnist')
    assert int(changed.sum()) == 5 * 5 and set(ds.y[changed].tolist()) <= {1, 7, 6, 5, 8}
    assert torch.equal(ds.y[~changed], ds.clean_targets[~changed])
    _, changed = add_label_noise(ds, 0.2, generator=gen(), kind='pair')  # again from the clean labels
    assert int(changed.sum()) == 20 and torch.equal(ds.y[changed], (ds.clean_targets[changed] + 1) % 10)


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
    assert isinstance(issues.dataset, Dataset) and issues.probs.shape == (480, 3)
    torch.testing.assert_close(issues.probs.argmax(1), issues.predicted)


# ---- stratified folds and out-of-fold probabilities ----------------------------------------------
def test_stratified_folds_balance_every_class_and_are_seeded():
    labels = torch.tensor([0] * 23 + [1] * 10 + [2] * 7)[torch.randperm(40, generator=gen(1))]
    folds = stratified_folds(labels, 5, seed=3)
    sizes = torch.bincount(folds, minlength=5)
    assert sizes.max() - sizes.min() <= 1
    for c in range(3):
        per_fold = torch.bincount(folds[labels == c], minlength=5)
        assert per_fold.max() - per_fold.min() <= 1
    assert torch.equal(folds, stratified_folds(labels, 5, seed=3))
    assert not torch.equal(folds, stratified_folds(labels, 5, seed=4))


def memorising_learner(data):
    """One weight column per item (inputs are one-hot item ids) from zero: items never trained on keep logits 0."""
    model = nn.Linear(data.c_in, data.c_out, bias=False)
    nn.init.zeros_(model.weight)
    return Learner(model, data, F.cross_entropy, lr=30., cbs=[DeviceCallback('cpu')])


def one_hot_ids(n=60, n_classes=3, seed=0):
    labels = torch.arange(n) % n_classes
    return Dataset(torch.eye(n), labels[torch.randperm(n, generator=gen(seed))])


def test_out_of_fold_rows_come_from_models_that_never_saw_the_item():
    data = one_hot_ids()
    in_sample = memorising_learner(DataBunch.from_datasets(data, None, bs=16, c_in=60, c_out=3))
    in_sample.fit(10)
    probs, _ = in_sample.get_preds(dl=DataLoader(data, batch_size=64))
    assert probs[torch.arange(60), data.y].min() > 0.9  # memorised: confident on every given (random) label
    oof = out_of_fold_probs(memorising_learner, data, k=3, epochs=10, bs=16, progress=False)
    assert oof.shape == (60, 3)
    torch.testing.assert_close(oof, torch.full((60, 3), 1 / 3))  # no information: no fold model saw the item


def test_out_of_fold_probs_keep_dataset_order_and_are_deterministic():
    g = gen(2)
    x = torch.randn(150, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(1)
    data = Dataset(x, y)
    make = lambda d: Learner(mlp(), d, F.cross_entropy, lr=0.3, cbs=[DeviceCallback('cpu')])  # noqa: E731
    state = torch.get_rng_state()
    oof = out_of_fold_probs(make, data, k=3, epochs=4, bs=16, seed=1, progress=False)
    assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is left alone
    torch.testing.assert_close(oof.sum(1), torch.ones(150))
    assert (oof.argmax(1) == y).float().mean() > 0.8  # rows in dataset order (a permutation would give ~1/3)
    assert torch.equal(oof, out_of_fold_probs(make, data, k=3, epochs=4, bs=16, seed=1, progress=False))
    assert not torch.equal(oof, out_of_fold_probs(make, data, k=3, epochs=4, bs=16, seed=2, progress=False))


def test_out_of_fold_folds_train_on_the_other_folds_with_the_fold_as_validation():
    data = one_hot_ids(36)
    seen = []

    def make(bunch):
        seen.append((set(bunch.train_ds.indices), set(bunch.valid_ds.indices), bunch.c_in, bunch.c_out))
        return memorising_learner(bunch)
    out_of_fold_probs(make, data, k=3, epochs=1, bs=8, progress=False)
    assert len(seen) == 3
    assert set().union(*(v for _, v, _, _ in seen)) == set(range(36))
    for train, valid, c_in, c_out in seen:
        assert not train & valid and len(train | valid) == 36 and (c_in, c_out) == (36, 3)
        assert torch.bincount(data.y[sorted(valid)], minlength=3).tolist() == [4, 4, 4]  # stratified


def test_out_of_fold_probs_on_labeled_data_and_subsets():
    x = ItemList([torch.eye(12)[i] for i in range(12)])
    ll = LabeledData(x, ItemList(['a', 'b', 'c', 'a'] * 3), proc_y=CategoryProcessor())
    assert dataset_labels(ll).tolist() == ll.y.items
    assert dataset_labels(Subset(ll, [3, 1])).tolist() == [ll.y.items[3], ll.y.items[1]]
    oof = out_of_fold_probs(memorising_learner, ll, k=3, epochs=2, bs=4, progress=False)
    torch.testing.assert_close(oof, torch.full((12, 3), 1 / 3))


def test_out_of_fold_errors_come_before_any_training():
    data = one_hot_ids(30)
    calls = []

    def make(bunch):
        calls.append(bunch)
        return memorising_learner(bunch)
    with pytest.raises(ValueError, match='at least 2'):
        out_of_fold_probs(make, data, k=1)
    with pytest.raises(ValueError, match=r'class 0 has only 10: use k <= 10'):
        out_of_fold_probs(make, data, k=11)
    with pytest.raises(ValueError, match='epochs must be a positive int'):
        out_of_fold_probs(make, data, epochs=0)
    assert calls == []  # no learner was built for these
    with pytest.raises(TypeError, match='must return a minilearn Learner'):
        out_of_fold_probs(lambda d: nn.Linear(30, 3), data, k=3, progress=False)
    built = []

    def wrong(d):
        built.append(Learner(nn.Linear(30, 2), d, F.cross_entropy, cbs=[DeviceCallback('cpu')]))
        built.append(built[-1].model.weight.detach().clone())
        return built[0]
    before = torch.get_rng_state()
    with pytest.raises(ValueError, match='data has 3 classes: its last layer needs 3 outputs'):
        out_of_fold_probs(wrong, data, k=3, progress=False)
    assert torch.equal(before, torch.get_rng_state())
    assert len(built) == 2 and torch.equal(built[0].model.weight, built[1])  # one learner built, never trained


# ---- confident learning, against cleanlab ----------------------------------------------------------
cleanlab_filter = pytest.importorskip('cleanlab.filter', reason='cleanlab is in the [dev] extra')


def noisy_probs(n=400, n_classes=4, seed=0):
    g = np.random.default_rng(seed)
    true = np.arange(n) % n_classes
    logits = g.normal(size=(n, n_classes)) + 3 * np.eye(n_classes)[true]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = true.copy()
    flip = g.random(n) < 0.25
    labels[flip] = g.integers(0, n_classes, flip.sum())
    return labels, probs, labels != true


@pytest.mark.parametrize('filter_by', ['prune_by_noise_rate', 'prune_by_class', 'both', 'confident_learning',
                                       'predicted_neq_given'])
def test_confident_learning_mask_agrees_with_cleanlab(filter_by):
    labels, probs, flipped = noisy_probs()
    mask = find_label_issues(labels=torch.from_numpy(labels), pred_probs=torch.from_numpy(probs).float(),
                             filter_by=filter_by)
    expected = cleanlab_filter.find_label_issues(labels=labels, pred_probs=probs.astype(np.float32).astype(np.float64),
                                                 filter_by=filter_by)
    assert mask.dtype == torch.bool and np.array_equal(mask.numpy(), expected)
    assert flipped[mask.numpy()].mean() > 0.6  # the flagged items are mostly the flipped ones


@pytest.mark.parametrize('ranked_by', ['self_confidence', 'normalized_margin', 'confidence_weighted_entropy'])
def test_confident_learning_ranked_indices_agree_with_cleanlab(ranked_by):
    labels, probs, _ = noisy_probs(seed=1)
    ranked = find_label_issues(labels=labels.tolist(), pred_probs=probs, return_indices_ranked_by=ranked_by,
                               frac_noise=0.5)
    expected = cleanlab_filter.find_label_issues(labels=labels, pred_probs=probs, return_indices_ranked_by=ranked_by,
                                                 frac_noise=0.5)
    assert ranked.dtype == torch.int64 and np.array_equal(ranked.numpy(), expected)


def test_confident_learning_argument_errors():
    labels, probs, _ = noisy_probs(40)
    with pytest.raises(TypeError, match='both labels=... and pred_probs=...'):
        find_label_issues(labels=labels)
    with pytest.raises(ValueError, match=r'shape \(N, C\) with one row per label'):
        find_label_issues(labels=labels[:30], pred_probs=probs)
    with pytest.raises(ValueError, match=r'labels must lie in \[0, C=4\)'):
        find_label_issues(labels=labels + 4, pred_probs=probs)
    with pytest.raises(TypeError, match='not both'):
        find_label_issues(object(), labels=labels, pred_probs=probs)


def test_confident_learning_without_cleanlab_names_the_extra(monkeypatch):
    import sys
    for name in ('cleanlab', 'cleanlab.filter'): monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    labels, probs, _ = noisy_probs(40)
    with pytest.raises(ImportError, match=r"pip install 'minilearn\[cleanlab\]'"):
        find_label_issues(labels=labels, pred_probs=probs)


# ---- LabelIssues.show, headless -------------------------------------------------------------------
def image_folder(tmp_path, n_per_class=4):
    for c, color in (('cat', (200, 30, 30)), ('dog', (30, 30, 200))):
        (tmp_path / c).mkdir()
        for i in range(n_per_class):
            Image.new('RGB', (8, 8), color).save(tmp_path / c / f'{c}{i}.png')
    return LabeledData.label_by_func(ImageList.from_files(tmp_path), parent_labeler, proc_y=CategoryProcessor())


def test_label_issues_show_renders_headless_with_labels_probabilities_and_file_names(tmp_path):
    assert matplotlib.get_backend().lower() == 'agg'
    ll = image_folder(tmp_path)
    labels = dataset_labels(ll)
    probs = F.one_hot(1 - labels, 2).float() * 0.8 + 0.1  # every item predicted as the other class
    issues = LabelIssues.from_probs(probs, labels, dataset=ll, mask=torch.arange(8) < 3)
    assert issues.indices.tolist() == [0, 1, 2] and issues.predicted.tolist() == (1 - labels[:3]).tolist()
    fig = issues.show(2)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 2 and len(fig.axes[0].images) == 1
    given = ll.proc_y.vocab[int(labels[0])]
    assert titles[0].startswith(f'given {given}\npred {ll.proc_y.vocab[1 - int(labels[0])]} (0.90; given 0.10)')
    assert titles[0].endswith(ll.x.items[0].name)
    matplotlib.pyplot.close(fig)


def test_label_issues_show_from_a_learner_and_errors():
    data = image_data_small()
    learn = Learner(nn.Sequential(nn.Flatten(), nn.Linear(3 * 6 * 6, 2)), data, F.cross_entropy,
                    cbs=[DeviceCallback('cpu')])
    issues = find_label_issues(learn, DataLoader(data.train_ds, batch_size=8))
    fig = issues.show(4)
    assert sum(1 for ax in fig.axes if ax.images) == 4
    assert all(ax.get_title().startswith('given ') for ax in fig.axes if ax.images)
    matplotlib.pyplot.close(fig)
    with pytest.raises(ValueError, match='carry no dataset'):
        LabelIssues(issues.indices, issues.losses, issues.labels, issues.predicted).show()
    with pytest.raises(ValueError, match='n must be a positive int'):
        issues.show(0)
    indices, losses, labels, predicted = issues  # still a 4-tuple
    assert torch.equal(indices, issues.indices)


def image_data_small():
    x, y = torch.rand(12, 3, 6, 6, generator=gen()), torch.tensor([0, 1] * 6)
    return DataBunch.from_datasets(Dataset(x, y), Dataset(x, y), bs=4, c_in=3, c_out=2)


# ---- clean and retrain ----------------------------------------------------------------------------
def test_clean_dataset_drops_or_relabels_only_the_flagged_items():
    data = Dataset(torch.arange(6.).view(6, 1), torch.tensor([0, 1, 2, 0, 1, 2]))
    mask = torch.tensor([False, True, False, False, True, False])
    probs = F.one_hot(torch.tensor([2, 2, 2, 2, 0, 2]), 3).float()
    dropped = clean_dataset(data, mask)
    assert [int(dropped[i][0]) for i in range(len(dropped))] == [0, 2, 3, 5]
    relabeled = clean_dataset(data, mask, action='relabel', pred_probs=probs)
    assert isinstance(relabeled, RelabeledDataset)
    assert [int(relabeled[i][1]) for i in range(6)] == [0, 2, 2, 0, 0, 2]
    assert data.y.tolist() == [0, 1, 2, 0, 1, 2]  # untouched
    with pytest.raises(ValueError, match='boolean mask with one entry per item'):
        clean_dataset(data, torch.tensor([1, 4]))
    with pytest.raises(ValueError, match='needs pred_probs'):
        clean_dataset(data, mask, action='relabel')
    with pytest.raises(ValueError, match="'drop' or 'relabel'"):
        clean_dataset(data, mask, action='fix')


def test_clean_and_retrain_recipe_removes_mostly_noisy_labels():
    g = gen(4)
    x = torch.randn(600, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(1)
    train = Dataset(x[:450], y[:450].clone())
    _, flipped = add_label_noise(train, 0.3, n_classes=3, exclude_true=True, generator=g)
    make = lambda d: Learner(mlp(), d, F.cross_entropy, lr=0.3, cbs=[DeviceCallback('cpu')])  # noqa: E731
    oof = out_of_fold_probs(make, train, k=3, epochs=5, bs=32, progress=False)
    is_issue = find_label_issues(labels=dataset_labels(train), pred_probs=oof)
    precision = flipped[is_issue].float().mean()
    recall = is_issue[flipped].float().mean()
    assert precision > 0.7 and recall > 0.6
    clean = clean_dataset(train, is_issue)
    clean_noise = flipped[torch.tensor(clean.indices)].float().mean()
    assert clean_noise < flipped.float().mean() / 2
    learn = make(DataBunch.from_datasets(clean, Dataset(x[450:], y[450:]), bs=32, c_in=8, c_out=3))
    learn.fit(5)
    preds, targets = learn.get_preds()
    assert (preds.argmax(1) == targets).float().mean() > 0.8
