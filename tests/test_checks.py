"""minilearn.checks: which losses take class indices or compare element by element, and the pre-flight errors
on targets that cannot go with the model output (their messages name the problem and the fix)."""
import re
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from minilearn.checks import check_batch, check_dataset_targets, is_class_index_loss, is_elementwise_loss
from minilearn.data.core import Dataset


class Wrapped:
    """A loss wrapper in the MixUp style: the user's loss is `base_loss_func`."""
    def __init__(self, inner): self.base_loss_func = inner
    def __call__(self, *args): return self.base_loss_func(*args)


class Flagged:
    class_index_targets = True
    def __call__(self, pred, target): return F.cross_entropy(pred, target)


def test_which_losses_take_class_indices_and_which_compare_element_by_element():
    class_index = [F.cross_entropy, F.nll_loss, nn.CrossEntropyLoss(), nn.NLLLoss(weight=torch.ones(3)),
                   partial(F.cross_entropy, label_smoothing=0.1), Wrapped(nn.CrossEntropyLoss()), Flagged()]
    elementwise = [F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, nn.MSELoss(), nn.L1Loss(),
                   nn.SmoothL1Loss(), nn.HuberLoss(), partial(F.mse_loss, reduction='sum'), Wrapped(F.l1_loss)]
    neither = [F.binary_cross_entropy_with_logits, nn.KLDivLoss(), lambda p, t: (p - t).abs().mean()]
    assert all(is_class_index_loss(f) and not is_elementwise_loss(f) for f in class_index)
    assert all(is_elementwise_loss(f) and not is_class_index_loss(f) for f in elementwise)
    assert not any(is_class_index_loss(f) or is_elementwise_loss(f) for f in neither)
    half_flagged = Flagged()
    half_flagged.class_index_targets = 1  # only True counts
    assert not is_class_index_loss(half_flagged)


def test_targets_that_go_with_the_output_pass():
    pred = torch.randn(4, 3)
    check_batch(pred, torch.tensor([0, 2, 1, 2]), F.cross_entropy)
    check_batch(pred, torch.tensor([0, -100, 1, 2]), F.cross_entropy)  # ignore_index
    check_batch(pred, torch.tensor([0, 5, 1, 2]), nn.CrossEntropyLoss(ignore_index=5))
    check_batch(pred, pred.softmax(1), F.cross_entropy)  # per-class probabilities
    check_batch(torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 4, 5)), F.cross_entropy)  # segmentation
    check_batch(pred, torch.randn(4, 3), F.mse_loss)
    check_batch(pred, torch.tensor([7, 9, 9, 9]), F.binary_cross_entropy_with_logits)  # unknown loss: not checked
    check_batch([pred], torch.tensor([7, 9, 9, 9]), F.cross_entropy)  # not a tensor output: not checked


@pytest.mark.parametrize('yb, loss, error, message', [
    (torch.tensor([0, 7, 1, 2]), F.cross_entropy, ValueError,
     'target class index 7 is out of range for a model with 3 outputs: indices must lie in [0, 3). Give the last '
     'layer at least 8 outputs (data.c_out) or fix the labels'),
    (torch.tensor([0, -2, 1, 2]), nn.NLLLoss(ignore_index=-1), ValueError,
     'target class index -2 is negative; class indices must lie in [0, 3) (ignore_index=-1 excepted)'),
    (torch.tensor([0., 1., 2., 1.]), F.cross_entropy, TypeError,
     'float targets (dtype torch.float32, shape (4,)) given to the class-index loss cross_entropy: class indices '
     'must be integers (yb.long(), or label with a CategoryProcessor), or per-class probabilities of the '
     "output's shape (4, 3)"),
    (torch.tensor([[0], [1], [2], [1]]), nn.CrossEntropyLoss(), ValueError,
     'target shape (4, 1) does not match the model output (4, 3): CrossEntropyLoss expects class indices of shape '
     '(4,)'),
    (torch.tensor([0, 1, 2, 1]), F.mse_loss, ValueError,
     'target shape (4,) does not match the model output (4, 3): mse_loss compares them element by element, and '
     'these targets look like class indices. For classification use F.cross_entropy (or '
     'LabelSmoothingCrossEntropy); to regress on one-hot targets, give mse_loss F.one_hot(yb, 3).float()'),
    (torch.randn(12), nn.L1Loss(), ValueError,
     'target shape (12,) does not match the model output (4, 3): L1Loss compares them element by element and '
     "would broadcast them instead. Give the targets the output's shape (yb.view(-1, 3), in the dataset or a "
     'transform), or reshape the model output'),
    (torch.randn(4, 2), F.huber_loss, ValueError,
     "target shape (4, 2) does not match the model output (4, 3): huber_loss compares them element by element; "
     "give the targets the output's shape, or make the model output (2,) per item"),
])
def test_targets_that_cannot_go_with_the_output_are_named_with_the_fix(yb, loss, error, message):
    with pytest.raises(error, match=re.escape(message) + '$'):
        check_batch(torch.randn(4, 3), yb, loss)


def test_a_loss_given_as_a_partial_is_named_by_its_function():
    with pytest.raises(ValueError, match='^target shape .*: huber_loss compares them'):
        check_batch(torch.randn(4, 3), torch.randn(4, 2), partial(F.huber_loss, delta=2.))


def test_an_output_without_a_class_dimension_is_named():
    with pytest.raises(ValueError, match=re.escape('cross_entropy needs model outputs of shape (N, C, ...) with one '
                                                   'score per class; the model returned shape (4,)')):
        check_batch(torch.randn(4), torch.tensor([0, 1, 0, 1]), F.cross_entropy)


def loaders(train_y, valid_y=None, dataset=Dataset):
    """What check_dataset_targets reads: a `data` with train_dl and valid_dl over datasets of these labels."""
    dl = lambda y: None if y is None else DataLoader(dataset(torch.zeros(len(y), 2), y), batch_size=4)  # noqa: E731
    return SimpleNamespace(train_dl=dl(train_y), valid_dl=dl(valid_y))


def test_stored_labels_of_both_sets_are_checked_at_once():
    pred, yb = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    check_dataset_targets(loaders(torch.tensor([0, 1, 2] * 5), torch.tensor([2, 1])), pred, yb, F.cross_entropy)
    with pytest.raises(ValueError, match=re.escape('target class index 3 (in the training set) is out of range for a '
                                                   'model with 3 outputs')):
        check_dataset_targets(loaders(torch.tensor([0, 1, 2] * 5 + [3])), pred, yb, F.cross_entropy)
    with pytest.raises(ValueError, match=re.escape('target class index -5 (in the validation set) is negative')):
        check_dataset_targets(loaders(torch.tensor([0, 1]), torch.tensor([1, -5])), pred, yb, F.cross_entropy)


def test_stored_labels_are_left_alone_where_they_may_not_be_what_the_batches_hold():
    pred, yb, bad = torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.tensor([0, 1, 9, 2])

    class Shifted(Dataset):
        def __getitem__(self, i): return self.x[i], self.y[i] - 7

    check_dataset_targets(loaders(bad, dataset=Shifted), pred, yb, F.cross_entropy)  # its own __getitem__
    check_dataset_targets(loaders(bad), pred, yb.float(), F.cross_entropy)  # soft targets: not class indices
    check_dataset_targets(loaders(bad), pred, yb, F.mse_loss)  # not a class-index loss
    check_dataset_targets(loaders(bad), torch.randn(4, 3, 5), yb, F.cross_entropy)  # not an (N, C) output
    check_dataset_targets(SimpleNamespace(), pred, yb, F.cross_entropy)  # no loaders
