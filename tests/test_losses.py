"""Loss helpers and losses against independent references (F.cross_entropy, hand-written formulas)."""
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minilearn.callbacks.device import DeviceCallback
from minilearn.checks import is_class_index_loss
from minilearn.data.core import DataBunch, Dataset
from minilearn.learner import Learner
from minilearn.losses import (REDUCTIONS, GeneralizedCrossEntropy, HardBootstrappingLoss, LabelSmoothingCrossEntropy,
                              NoneReduce, SoftBootstrappingLoss, SoftTargetCrossEntropy, SymmetricCrossEntropy,
                              lin_comb, loss_reduction, reduce_loss, smooth_one_hot)
from helpers import mlp, same_weights, weights

N_CLASSES = 5


def class_targets(shape, ignore_index=-100, n_ignored_every=3):
    t = torch.randint(0, N_CLASSES, shape)
    if n_ignored_every: t.view(-1)[::n_ignored_every] = ignore_index
    return t


# ---- lin_comb, reduce_loss, NoneReduce -----------------------------------------------------------
def test_lin_comb_is_t_a_plus_one_minus_t_b():
    a, b, t = torch.tensor([1., 2.]), torch.tensor([10., 20.]), torch.tensor([0.25, 1.])
    assert torch.equal(lin_comb(a, b, t), torch.tensor([0.25 * 1 + 0.75 * 10, 2.]))
    assert lin_comb(3., 5., 0.5) == 4.


def test_reduce_loss_and_unknown_reduction():
    loss = torch.tensor([1., 2., 6.])
    assert reduce_loss(loss) == 3. and reduce_loss(loss, 'sum') == 9. and reduce_loss(loss, 'none') is loss
    with pytest.raises(ValueError, match=r"'batchmean'.*'mean', 'sum', 'none'"):
        reduce_loss(loss, 'batchmean')


def test_loss_reduction_of_modules_partials_and_functions():
    assert loss_reduction(nn.CrossEntropyLoss(reduction='sum')) == 'sum'
    assert loss_reduction(partial(F.cross_entropy, reduction='sum')) == 'sum'
    assert loss_reduction(partial(F.cross_entropy, label_smoothing=0.1)) == 'mean'
    assert loss_reduction(F.cross_entropy) == 'mean'


def test_none_reduce_sets_and_restores_reduction_even_on_error():
    loss = LabelSmoothingCrossEntropy(reduction='sum')
    x, y = torch.randn(4, N_CLASSES), torch.randint(0, N_CLASSES, (4,))
    with NoneReduce(loss) as per_item:
        assert per_item is loss and loss.reduction == 'none'
        assert per_item(x, y).shape == (4,)
    assert loss.reduction == 'sum'
    with pytest.raises(RuntimeError, match='boom'):
        with NoneReduce(loss):
            raise RuntimeError('boom')
    assert loss.reduction == 'sum'
    nested = NoneReduce(loss)
    with nested, nested: assert loss.reduction == 'none'
    assert loss.reduction == 'sum'


def test_none_reduce_wraps_a_plain_function_in_a_partial():
    x, y = torch.randn(4, N_CLASSES), torch.randint(0, N_CLASSES, (4,))
    with NoneReduce(F.cross_entropy) as per_item:
        assert isinstance(per_item, partial)
        torch.testing.assert_close(per_item(x, y), F.cross_entropy(x, y, reduction='none'))
    with NoneReduce(partial(F.cross_entropy, reduction='sum')) as per_item:
        assert per_item(x, y).shape == (4,)


# ---- LabelSmoothingCrossEntropy against F.cross_entropy -------------------------------------------
@pytest.mark.parametrize('reduction', REDUCTIONS)
@pytest.mark.parametrize('with_weight', [False, True])
@pytest.mark.parametrize('shape', [(8, N_CLASSES), (3, N_CLASSES, 4, 2)], ids=['2d', '4d'])
@pytest.mark.parametrize('ignore_index', [-100, 2])
def test_label_smoothing_matches_torch_values_and_gradients(reduction, with_weight, shape, ignore_index):
    eps = 0.15
    x = torch.randn(shape, requires_grad=True)
    y = class_targets((shape[0],) + shape[2:], ignore_index)
    weight = torch.rand(N_CLASSES) + 0.1 if with_weight else None
    ours = LabelSmoothingCrossEntropy(eps, reduction=reduction, ignore_index=ignore_index, weight=weight)(x, y)
    (grad_ours,) = torch.autograd.grad(ours.sum(), x)
    ref = F.cross_entropy(x, y, weight=weight, ignore_index=ignore_index, label_smoothing=eps, reduction=reduction)
    (grad_ref,) = torch.autograd.grad(ref.sum(), x)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad_ours, grad_ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('reduction', REDUCTIONS)
def test_label_smoothing_matches_torch_in_float64_to_rounding(reduction):
    x = torch.randn(2, N_CLASSES, 3, 3, dtype=torch.float64)
    y, weight = class_targets((2, 3, 3)), torch.rand(N_CLASSES, dtype=torch.float64)
    ours = LabelSmoothingCrossEntropy(0.3, reduction=reduction, weight=weight)(x, y)
    ref = F.cross_entropy(x, y, weight=weight, label_smoothing=0.3, reduction=reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-12, atol=1e-12)


def test_label_smoothing_unbatched_input_and_all_ignored_batch_match_torch():
    x = torch.randn(N_CLASSES)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(LabelSmoothingCrossEntropy(0.2, reduction=reduction)(x, torch.tensor(3)),
                                   F.cross_entropy(x, torch.tensor(3), label_smoothing=0.2, reduction=reduction))
    all_ignored = torch.full((4,), -100)
    assert LabelSmoothingCrossEntropy()(torch.randn(4, N_CLASSES), all_ignored).isnan()  # 0/0 like torch
    assert F.cross_entropy(torch.randn(4, N_CLASSES), all_ignored, label_smoothing=0.1).isnan()


def test_label_smoothing_zero_eps_is_plain_cross_entropy_even_with_masked_classes():
    x, y = torch.randn(6, N_CLASSES), torch.randint(0, 3, (6,))
    x[:, 4] = float('-inf')  # a masked class would turn the smoothing term into 0·inf = nan
    torch.testing.assert_close(LabelSmoothingCrossEntropy(0.)(x, y), F.cross_entropy(x, y))


def test_label_smoothing_probability_targets_match_torch():
    x, p, w = torch.randn(6, N_CLASSES), torch.randn(6, N_CLASSES).softmax(1), torch.rand(N_CLASSES)
    for reduction in REDUCTIONS:
        torch.testing.assert_close(LabelSmoothingCrossEntropy(0.3, reduction=reduction, weight=w)(x, p),
                                   F.cross_entropy(x, p, weight=w, label_smoothing=0.3, reduction=reduction))


def test_reduction_changed_after_construction_is_honoured():
    loss = LabelSmoothingCrossEntropy(0.1)
    x, y = torch.randn(6, N_CLASSES), torch.randint(0, N_CLASSES, (6,))
    loss.reduction = 'sum'
    torch.testing.assert_close(loss(x, y), F.cross_entropy(x, y, label_smoothing=0.1, reduction='sum'))
    loss.reduction = 'none'
    assert loss(x, y).shape == (6,)
    loss.reduction = 'avg'
    with pytest.raises(ValueError, match="unknown reduction 'avg'"):
        loss(x, y)


def test_course_epsilon_spelling_and_eps_validation():
    loss = LabelSmoothingCrossEntropy(ε=0.2)
    assert loss.eps == 0.2 and loss.ε == 0.2
    assert LabelSmoothingCrossEntropy(0.3).ε == 0.3  # the course passes ε positionally
    with pytest.raises(TypeError, match='not both'):
        LabelSmoothingCrossEntropy(eps=0.3, ε=0.2)
    for bad in (1., -0.1, float('nan'), True):
        with pytest.raises(ValueError, match=r'eps \(label smoothing\) must be a number in \[0, 1\)'):
            LabelSmoothingCrossEntropy(bad)
    with pytest.raises(ValueError, match='eps'):
        loss.eps = 1.5
    assert loss.eps == 0.2
    with pytest.raises(AttributeError):
        loss.ε = 0.5


def test_label_smoothing_bad_targets_raise_before_any_math():
    loss = LabelSmoothingCrossEntropy()
    x = torch.randn(4, N_CLASSES)
    with pytest.raises(ValueError, match=r'target class index 7 is out of range for 5 classes.*\[0, 5\)'):
        loss(x, torch.tensor([0, 1, 7, 2]))
    with pytest.raises(ValueError, match='target class index -3'):
        loss(x, torch.tensor([0, -3, 1, 2]))
    loss(x, torch.tensor([0, -100, 1, 2]))  # ignore_index is allowed
    with pytest.raises(ValueError, match=r'target shape \(3,\) does not match the input shape \(4, 5\)'):
        loss(x, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r'must have shape \(2, 3\)'):
        loss(torch.randn(2, N_CLASSES, 3), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="float targets are per-class probabilities"):
        loss(x, torch.zeros(4))
    with pytest.raises(ValueError, match='weight has 3 entries but the input has 5 classes'):
        LabelSmoothingCrossEntropy(weight=torch.ones(3))(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match='unknown reduction'):
        LabelSmoothingCrossEntropy(reduction='batchmean')


def test_label_smoothing_reads_no_values_off_a_non_cpu_device():
    # On an accelerator the range check would cost a device sync each batch, so it is skipped there:
    # meta tensors have no values, any host read would raise.
    x = torch.empty(4, N_CLASSES, 3, device='meta')
    y = torch.empty(4, 3, dtype=torch.long, device='meta')
    for reduction in REDUCTIONS:
        out = LabelSmoothingCrossEntropy(0.1, reduction=reduction, weight=torch.ones(N_CLASSES))(x, y)
        assert out.device.type == 'meta' and out.shape == ((4, 3) if reduction == 'none' else ())


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_label_smoothing_on_cuda_does_not_synchronise():
    x = torch.randn(64, N_CLASSES, device='cuda', requires_grad=True)
    y = torch.randint(0, N_CLASSES, (64,), device='cuda')
    loss = LabelSmoothingCrossEntropy(0.1, weight=torch.rand(N_CLASSES))
    torch.cuda.set_sync_debug_mode('error')
    try:
        out = loss(x, y)
        out.backward()
    finally:
        torch.cuda.set_sync_debug_mode('default')
    torch.testing.assert_close(out, F.cross_entropy(x, y, weight=loss.weight.cuda(), label_smoothing=0.1))


def test_class_index_losses_are_known_to_the_preflight_check():
    for loss in (LabelSmoothingCrossEntropy(), SoftBootstrappingLoss(), HardBootstrappingLoss()):
        assert loss.class_index_targets is True and is_class_index_loss(loss) and loss.ignore_index == -100
    assert not is_class_index_loss(SoftTargetCrossEntropy())


def _learner(loss_func, y):
    x = torch.randn(len(y), 8)
    data = DataBunch.from_datasets(Dataset(x, y), Dataset(x, y), bs=8, c_in=8, c_out=3)
    return Learner(mlp(), data, loss_func, cbs=[DeviceCallback('cpu')])


def test_learner_preflight_rejects_out_of_range_targets_before_any_step():
    learn = _learner(LabelSmoothingCrossEntropy(), torch.tensor([0, 1, 2, 5] * 4))
    before = weights(learn.model)
    with pytest.raises(ValueError, match=r'target class index 5.*out of range for a model with 3 outputs'):
        learn.fit(1)
    assert same_weights(before, weights(learn.model))


def test_learner_fit_with_ignore_index_targets():
    learn = _learner(LabelSmoothingCrossEntropy(ignore_index=255), torch.tensor([0, 1, 2, 255] * 4))
    learn.fit(1)
    assert torch.isfinite(learn.loss)


# ---- smooth_one_hot and SoftTargetCrossEntropy -----------------------------------------------------
def test_smooth_one_hot_both_conventions():
    t = torch.tensor([0, 2, 1])
    default = smooth_one_hot(t, 4, 0.2)
    assert torch.allclose(default[0], torch.tensor([0.85, 0.05, 0.05, 0.05]))
    excl = smooth_one_hot(t, 4, 0.3, exclude_true=True)
    assert torch.allclose(excl[1], torch.tensor([0.1, 0.1, 0.7, 0.1]))
    for d in (default, excl): torch.testing.assert_close(d.sum(1), torch.ones(3))
    assert torch.equal(smooth_one_hot(t, 4, 0.), F.one_hot(t, 4).float())
    assert smooth_one_hot(torch.zeros(2, 3, dtype=torch.long), 4, 0.1).shape == (2, 3, 4)


def test_smooth_one_hot_errors():
    with pytest.raises(ValueError, match='out of range for 3 classes'):
        smooth_one_hot(torch.tensor([0, 3]), 3, 0.1)
    with pytest.raises(ValueError, match='needs n_classes >= 2'):
        smooth_one_hot(torch.tensor([0]), 1, 0.1, exclude_true=True)
    with pytest.raises(ValueError, match='eps'):
        smooth_one_hot(torch.tensor([0]), 3, 1.0)
    with pytest.raises(TypeError, match='integer class indices'):
        smooth_one_hot(torch.tensor([0.]), 3, 0.1)


@pytest.mark.parametrize('reduction', REDUCTIONS)
def test_soft_target_cross_entropy_matches_torch_and_label_smoothing(reduction):
    x, t = torch.randn(6, N_CLASSES), torch.randint(0, N_CLASSES, (6,))
    soft = smooth_one_hot(t, N_CLASSES, 0.1)
    loss = SoftTargetCrossEntropy(reduction)
    torch.testing.assert_close(loss(x, soft), F.cross_entropy(x, soft, reduction=reduction))
    torch.testing.assert_close(loss(x, soft), F.cross_entropy(x, t, label_smoothing=0.1, reduction=reduction))


def test_soft_target_cross_entropy_errors():
    with pytest.raises(TypeError, match='float per-class probabilities'):
        SoftTargetCrossEntropy()(torch.randn(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"input's shape \(2, 3\)"):
        SoftTargetCrossEntropy()(torch.randn(2, 3), torch.rand(2, 4))


# ---- bootstrapping ------------------------------------------------------------------------------
def _soft_reference(x, y, beta, q):
    logp = x.log_softmax(1)
    return beta * F.nll_loss(logp, y, reduction='none') - (1 - beta) * (q * logp).sum(1)


@pytest.mark.parametrize('reduction', REDUCTIONS)
def test_soft_bootstrapping_formula_and_reduction(reduction):
    x, y = torch.randn(7, N_CLASSES), torch.randint(0, N_CLASSES, (7,))
    expected = reduce_loss(_soft_reference(x, y, 0.9, x.softmax(1)), reduction)
    torch.testing.assert_close(SoftBootstrappingLoss(0.9, reduction=reduction)(x, y), expected)


@pytest.mark.parametrize('reduction', REDUCTIONS)
def test_hard_bootstrapping_formula_and_reduction(reduction):
    x, y = torch.randn(7, N_CLASSES), torch.randint(0, N_CLASSES, (7,))
    per_item = 0.7 * F.cross_entropy(x, y, reduction='none') + 0.3 * F.cross_entropy(x, x.argmax(1), reduction='none')
    torch.testing.assert_close(HardBootstrappingLoss(0.7, reduction=reduction)(x, y), reduce_loss(per_item, reduction))


def test_bootstrapping_defaults_and_beta_one_is_cross_entropy():
    assert SoftBootstrappingLoss().beta == 0.95 and HardBootstrappingLoss().beta == 0.8
    x, y = torch.randn(5, N_CLASSES), torch.randint(0, N_CLASSES, (5,))
    for cls in (SoftBootstrappingLoss, HardBootstrappingLoss):
        torch.testing.assert_close(cls(1.0)(x, y), F.cross_entropy(x, y))
        with pytest.raises(ValueError, match=r'beta must be a number in \[0, 1\]'):
            cls(1.5)


def test_soft_bootstrapping_gradient_does_not_flow_through_the_target_term():
    x, y = torch.randn(6, N_CLASSES, requires_grad=True), torch.randint(0, N_CLASSES, (6,))
    (grad,) = torch.autograd.grad(SoftBootstrappingLoss(0.6)(x, y), x)
    q = x.detach().softmax(1)  # the target as a constant
    (grad_const,) = torch.autograd.grad(_soft_reference(x, y, 0.6, q).mean(), x)
    (grad_through,) = torch.autograd.grad(_soft_reference(x, y, 0.6, x.softmax(1)).mean(), x)
    torch.testing.assert_close(grad, grad_const)
    assert not torch.allclose(grad, grad_through, atol=1e-4)


def test_hard_bootstrapping_gradient_treats_the_predicted_class_as_a_constant_target():
    x, y = torch.randn(6, N_CLASSES, requires_grad=True), torch.randint(0, N_CLASSES, (6,))
    (grad,) = torch.autograd.grad(HardBootstrappingLoss(0.6)(x, y), x)
    hard = x.detach().argmax(1)
    (grad_ref,) = torch.autograd.grad(0.6 * F.cross_entropy(x, y) + 0.4 * F.cross_entropy(x, hard), x)
    torch.testing.assert_close(grad, grad_ref)


def test_bootstrapping_ignores_ignore_index_in_both_terms_and_the_mean():
    x, y = torch.randn(6, N_CLASSES, 2), torch.randint(0, N_CLASSES, (6, 2))
    y[0, 0] = y[3, 1] = -100
    kept = y != -100
    for loss in (SoftBootstrappingLoss(0.7), HardBootstrappingLoss(0.7)):
        per_item = type(loss)(0.7, reduction='none')(x, y)
        assert (per_item[~kept] == 0).all() and (per_item[kept] > 0).all()
        torch.testing.assert_close(loss(x, y), per_item[kept].mean())
    with pytest.raises(ValueError, match='out of range'):
        HardBootstrappingLoss()(torch.randn(2, 3), torch.tensor([0, 3]))


# ---- generalized and symmetric cross entropy -------------------------------------------------------
def _gce_reference(x, y, q):
    p_y = x.softmax(1).gather(1, y.unsqueeze(1)).squeeze(1)
    return (1 - p_y ** q) / q


def _sce_reference(x, y, alpha, beta, A=-4.):
    p = x.softmax(1)
    one_hot = F.one_hot(y, x.shape[1]).to(x.dtype)
    log_q = torch.where(one_hot > 0, torch.zeros_like(p), torch.full_like(p, A))  # log 0 clipped to A
    return alpha * F.cross_entropy(x, y, reduction='none') - beta * (p * log_q).sum(1)


@pytest.mark.parametrize('reduction', REDUCTIONS)
def test_generalized_cross_entropy_values_and_gradients_match_the_formula(reduction):
    x, y = torch.randn(9, N_CLASSES, dtype=torch.float64, requires_grad=True), torch.randint(0, N_CLASSES, (9,))
    loss = GeneralizedCrossEntropy(0.7, reduction=reduction)(x, y)
    expected = reduce_loss(_gce_reference(x, y, 0.7), reduction)
    torch.testing.assert_close(loss, expected)
    (g,) = torch.autograd.grad(loss.sum(), x)
    (g_ref,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(g, g_ref)


def test_generalized_cross_entropy_limits_and_hand_value():
    x, y = torch.randn(6, N_CLASSES, dtype=torch.float64), torch.randint(0, N_CLASSES, (6,))
    torch.testing.assert_close(GeneralizedCrossEntropy(1e-6)(x, y), F.cross_entropy(x, y), rtol=1e-5, atol=1e-5)
    p_y = x.softmax(1)[torch.arange(6), y]
    torch.testing.assert_close(GeneralizedCrossEntropy(1.)(x, y), (1 - p_y).mean())  # MAE / 2 on the simplex
    # two classes, logits (0, log 3): p = (1/4, 3/4); target 1, q = 1/2: (1 − √(3/4)) / (1/2)
    value = GeneralizedCrossEntropy(0.5)(torch.tensor([[0., float(np.log(3))]]), torch.tensor([1]))
    assert abs(float(value) - 2 * (1 - 0.75 ** 0.5)) < 1e-6
    for bad in (0, -0.1, 1.5, float('nan'), True):
        with pytest.raises(ValueError, match=r'q must be a number in \(0, 1\]'):
            GeneralizedCrossEntropy(bad)


@pytest.mark.parametrize('reduction', REDUCTIONS)
def test_symmetric_cross_entropy_values_and_gradients_match_the_formula(reduction):
    x, y = torch.randn(9, N_CLASSES, dtype=torch.float64, requires_grad=True), torch.randint(0, N_CLASSES, (9,))
    loss = SymmetricCrossEntropy(0.3, 1.5, reduction=reduction)(x, y)
    expected = reduce_loss(_sce_reference(x, y, 0.3, 1.5), reduction)
    torch.testing.assert_close(loss, expected)
    (g,) = torch.autograd.grad(loss.sum(), x)
    (g_ref,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(g, g_ref)


def test_symmetric_cross_entropy_defaults_hand_value_and_errors():
    sce = SymmetricCrossEntropy()
    assert (sce.alpha, sce.beta, sce.A) == (0.1, 1.0, -4.0)
    # p = (1/4, 3/4), target 1: 0.1·(−log 3/4) + 1·4·(1 − 3/4)
    value = sce(torch.tensor([[0., float(np.log(3))]]), torch.tensor([1]))
    assert abs(float(value) - (0.1 * -np.log(0.75) + 1.0)) < 1e-6
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 2, 0])
    torch.testing.assert_close(SymmetricCrossEntropy(1., 0.)(x, y), F.cross_entropy(x, y))
    with pytest.raises(ValueError, match='beta must be a non-negative number'):
        SymmetricCrossEntropy(beta=-1)
    with pytest.raises(ValueError, match='A .* must be a negative number'):
        SymmetricCrossEntropy(A=0.)


@pytest.mark.parametrize('make', [lambda **kw: GeneralizedCrossEntropy(0.7, **kw),
                                  lambda **kw: SymmetricCrossEntropy(0.1, 1.0, **kw)])
def test_robust_losses_ignore_index_and_weight_follow_cross_entropy_conventions(make):
    x, y = torch.randn(6, N_CLASSES, 3), torch.randint(0, N_CLASSES, (6, 3))
    y[0, 0] = y[4, 2] = -100
    kept = y != -100
    per_item = make(reduction='none')(x, y)
    assert per_item.shape == (6, 3) and (per_item[~kept] == 0).all() and (per_item[kept] > 0).all()
    torch.testing.assert_close(make()(x, y), per_item[kept].mean())
    torch.testing.assert_close(make(reduction='sum')(x, y), per_item.sum())
    w = torch.rand(N_CLASSES) + 0.5
    w_item = w[y.clamp_min(0)] * kept
    torch.testing.assert_close(make(weight=w)(x, y), (per_item * w_item).sum() / w_item.sum())
    torch.testing.assert_close(make(weight=w, reduction='none')(x, y), per_item * w_item)
    torch.testing.assert_close(make()(x[0, :, 1], y[0, 1]), per_item[0, 1])  # unbatched
    with pytest.raises(ValueError, match='weight has 2 entries'):
        make(weight=torch.ones(2))(x, y)
    with pytest.raises(ValueError, match='out of range'):
        make()(torch.randn(2, 3), torch.tensor([0, 3]))
    assert is_class_index_loss(make())


def test_robust_losses_train_under_mixup_with_per_item_losses():
    from minilearn.callbacks.mixup import MixUp
    for loss in (GeneralizedCrossEntropy(), SymmetricCrossEntropy()):
        data = DataBunch.from_datasets(Dataset(torch.randn(64, 8), torch.randint(0, 3, (64,))), None, bs=16,
                                       c_in=8, c_out=3)
        learn = Learner(mlp(), data, loss, lr=0.1, cbs=[DeviceCallback('cpu'), MixUp(0.4)])
        before = weights(learn.model)
        learn.fit(1)
        assert not same_weights(before, weights(learn.model)) and loss.reduction == 'mean'
