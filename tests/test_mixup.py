"""MixUp: λ draws, mixing formula for every input rank, loss mixture, loss_func restore, validation untouched."""
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Beta

from minilearn.callbacks.device import DeviceCallback
from minilearn.callbacks.metrics import AvgStatsCallback, accuracy
from minilearn.callbacks.mixup import MixUp, MixUpLoss
from minilearn.callbacks.progress import ProgressCallback
from minilearn.core import listify, unwrap_loss
from minilearn.learner import Callback, CancelTrainException, Learner
from minilearn.losses import (GeneralizedCrossEntropy, HardBootstrappingLoss, LabelSmoothingCrossEntropy, NoneReduce,
                              SoftBootstrappingLoss, SymmetricCrossEntropy, lin_comb, reduce_loss)
from helpers import forbid_host_reads, image_data, linear_data, mlp, small_cnn


def attached(mixup: MixUp, xb, yb, in_train=True):
    """MixUp attached to a minimal stand-in for the learner's batch state."""
    mixup.set_runner(SimpleNamespace(in_train=in_train, xb=xb, yb=yb, loss_func=None))
    return mixup


def mix(mixup: MixUp, xb, yb):
    attached(mixup, xb, yb).begin_batch()
    return mixup.run.xb, mixup.run.yb


# ---- λ ------------------------------------------------------------------------------------------
def test_lambda_is_one_value_per_sample_and_at_least_one_half():
    mixup = MixUp(0.4)
    lams = []
    for _ in range(200):
        mix(mixup, torch.randn(16, 3), torch.randint(0, 3, (16,)))
        assert mixup.lam.shape == (16,) and mixup.λ is mixup.lam
        lams.append(mixup.lam)
    lams = torch.stack(lams)
    assert (lams >= 0.5).all() and (lams <= 1).all()
    assert (lams.std(1) > 0).all()  # a different λ per sample in every batch
    assert lams.mean() > 0.75  # Beta(0.4, 0.4) folded onto [0.5, 1]: mean ≈ 0.85


def test_batch_lambda_variant_draws_one_plain_lambda_per_batch():
    mixup = MixUp(0.4, per_sample=False)
    lams = []
    for _ in range(200):
        mix(mixup, torch.randn(8, 3), torch.randint(0, 3, (8,)))
        assert mixup.lam.shape == (8,) and (mixup.lam == mixup.lam[0]).all()
        lams.append(mixup.lam[0])
    lams = torch.stack(lams)
    assert (lams < 0.5).any() and (lams > 0.5).any()  # the paper's λ ~ Beta(α, α), not folded
    assert abs(lams.mean() - 0.5) < 0.1


def test_seeded_draws_are_reproducible_and_follow_torch_generator():
    xb, yb = torch.randn(10, 4), torch.arange(10)
    torch.manual_seed(123)
    mixed, _ = mix(MixUp(0.4), xb, yb)
    torch.manual_seed(123)  # an independent reproduction of the draws: λ ~ Beta(α, α), folded, then a permutation
    lam = Beta(torch.tensor(0.4), torch.tensor(0.4)).sample((10,))
    lam = torch.maximum(lam, 1 - lam)
    perm = torch.randperm(10)
    torch.testing.assert_close(mixed, lam[:, None] * xb + (1 - lam[:, None]) * xb[perm])
    torch.manual_seed(123)
    again, _ = mix(MixUp(0.4), xb, yb)
    assert torch.equal(mixed, again)


def test_batch_lambda_variant_matches_mixup_data_formula():
    xb, yb = torch.randn(6, 2), torch.arange(6)
    torch.manual_seed(7)
    mixup = MixUp(1.0, per_sample=False)
    mixed, _ = mix(mixup, xb, yb)
    torch.manual_seed(7)
    lam = Beta(torch.tensor(1.0), torch.tensor(1.0)).sample()
    perm = torch.randperm(6)
    torch.testing.assert_close(mixed, lam * xb + (1 - lam) * xb[perm])
    assert torch.equal(mixup.yb1, yb[perm])


@pytest.mark.parametrize('shape', [(6, 5), (6, 3, 7), (6, 3, 4, 4), (6, 2, 3, 4, 4)], ids=['2d', '3d', '4d', '5d'])
def test_inputs_of_any_rank_are_mixed_per_sample(shape):
    xb, yb = torch.randn(shape), torch.randint(0, 3, (shape[0],))
    mixup = MixUp(0.4)
    mixed, targets = mix(mixup, xb, yb)
    lam = mixup.lam.view((-1,) + (1,) * (len(shape) - 1))
    assert mixed.shape == xb.shape
    torch.testing.assert_close(mixed, lam * xb + (1 - lam) * xb[mixup.perm])
    assert targets is yb and torch.equal(mixup.yb1, yb[mixup.perm])  # integer targets are not mixed


def test_parameter_validation_and_course_alpha_spelling():
    assert MixUp(α=0.2).alpha == 0.2
    for bad in (0, -1., float('inf'), True):
        with pytest.raises(ValueError, match='alpha must be a positive finite number'):
            MixUp(bad)
    with pytest.raises(TypeError, match='not both'):
        MixUp(0.3, α=0.2)
    with pytest.raises(TypeError, match='integer inputs'):
        mix(MixUp(), torch.arange(8).view(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match='one entry per item'):
        mix(MixUp(), torch.randn(4, 2), [0, 1, 2, 3])


# ---- the loss -----------------------------------------------------------------------------------
@pytest.mark.parametrize('loss_func, reduction', [
    (F.cross_entropy, 'mean'),
    (partial(F.cross_entropy, reduction='sum'), 'sum'),
    (LabelSmoothingCrossEntropy(0.1, reduction='sum'), 'sum'),
    (LabelSmoothingCrossEntropy(0.1), 'mean'),
    (SoftBootstrappingLoss(0.9), 'mean'),
    (HardBootstrappingLoss(0.8, reduction='none'), 'none'),
    (GeneralizedCrossEntropy(0.7), 'mean'),
    (SymmetricCrossEntropy(0.1, 1.0, reduction='sum'), 'sum'),
])
def test_loss_is_the_lambda_mixture_of_per_item_losses(loss_func, reduction):
    xb, yb = torch.randn(8, 4), torch.randint(0, 3, (8,))
    mixup = attached(MixUp(0.4), xb, yb)
    mixup.run.loss_func = loss_func
    mixup.begin_fit()
    wrapper = mixup.run.loss_func
    assert isinstance(wrapper, MixUpLoss) and wrapper.base_loss_func is loss_func and unwrap_loss(wrapper) is loss_func
    assert wrapper.reduction == reduction
    mixup.begin_batch()
    pred = torch.randn(8, 3)
    per_item = partial(F.cross_entropy, reduction='none')
    if isinstance(loss_func, LabelSmoothingCrossEntropy):
        per_item = partial(F.cross_entropy, reduction='none', label_smoothing=0.1)
    if isinstance(loss_func, (SoftBootstrappingLoss, HardBootstrappingLoss)):
        per_item = type(loss_func)(loss_func.beta, reduction='none')
    if isinstance(loss_func, GeneralizedCrossEntropy):  # (1 − p_y^q)/q by hand
        per_item = lambda p, y: (1 - p.softmax(1).gather(1, y[:, None])[:, 0] ** 0.7) / 0.7  # noqa: E731
    if isinstance(loss_func, SymmetricCrossEntropy):  # 0.1·CE + 1·(−A)(1 − p_y), A = −4
        per_item = lambda p, y: (0.1 * F.cross_entropy(p, y, reduction='none')  # noqa: E731
                                 + 4 * (1 - p.softmax(1).gather(1, y[:, None])[:, 0]))
    lam = mixup.lam
    expected = reduce_loss(lam * per_item(pred, yb) + (1 - lam) * per_item(pred, yb[mixup.perm]), reduction)
    torch.testing.assert_close(wrapper(pred, yb), expected)
    assert loss_reduction_of(loss_func) == reduction  # the user's loss was put back to its own reduction
    mixup.after_fit()
    assert mixup.run.loss_func is loss_func


def loss_reduction_of(loss_func):
    return getattr(loss_func, 'reduction', getattr(loss_func, 'keywords', {}).get('reduction', 'mean'))


def test_per_item_losses_of_segmentation_are_mixed_per_sample():
    xb, yb = torch.randn(4, 3, 5, 5), torch.randint(0, 3, (4, 5, 5))
    mixup = attached(MixUp(0.4), xb, yb)
    mixup.run.loss_func = F.cross_entropy
    mixup.begin_fit()
    mixup.begin_batch()
    pred = torch.randn(4, 3, 5, 5)
    lam = mixup.lam.view(4, 1, 1)
    expected = (lam * F.cross_entropy(pred, yb, reduction='none')
                + (1 - lam) * F.cross_entropy(pred, yb[mixup.perm], reduction='none')).mean()
    torch.testing.assert_close(mixup.run.loss_func(pred, yb), expected)


def test_soft_targets_are_mixed_as_targets():
    xb, yb = torch.randn(6, 4), torch.randn(6, 3).softmax(1)
    mixup = attached(MixUp(0.4), xb, yb)
    mixup.run.loss_func = F.cross_entropy
    mixup.begin_fit()
    mixup.begin_batch()
    lam = mixup.lam[:, None]
    mixed_targets = lam * yb + (1 - lam) * yb[mixup.perm]
    torch.testing.assert_close(mixup.run.yb, mixed_targets)
    torch.testing.assert_close(mixup.run.yb.sum(1), torch.ones(6))
    pred = torch.randn(6, 3)
    torch.testing.assert_close(mixup.run.loss_func(pred, mixup.run.yb), F.cross_entropy(pred, mixed_targets))


def test_reduction_proxy_reads_and_writes_the_users_loss():
    loss = LabelSmoothingCrossEntropy()
    wrapper = MixUpLoss(loss, MixUp())
    wrapper.reduction = 'sum'
    assert loss.reduction == 'sum' and wrapper.reduction == 'sum'
    plain = MixUpLoss(F.cross_entropy, MixUp())
    assert plain.reduction == 'mean'
    plain.reduction = 'none'
    assert plain.reduction == 'none'


def test_no_host_reads_on_the_batch_path(monkeypatch):
    xb, yb = torch.randn(8, 4), torch.randint(0, 3, (8,))
    mixup = attached(MixUp(0.4), xb, yb)
    mixup.run.loss_func = F.cross_entropy
    mixup.begin_fit()
    mixup.begin_batch()  # builds the distribution on the first batch

    forbid_host_reads(monkeypatch)
    mixup.run.xb = xb
    mixup.begin_batch()
    loss = mixup.run.loss_func(torch.randn(8, 3, requires_grad=True), yb)
    loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_sampling_happens_on_the_cuda_device_without_synchronising():
    xb, yb = torch.randn(32, 3, 8, 8, device='cuda'), torch.randint(0, 3, (32,), device='cuda')
    mixup = attached(MixUp(0.4), xb, yb)
    mixup.run.loss_func = LabelSmoothingCrossEntropy()
    mixup.begin_fit()
    pred = torch.randn(32, 3, device='cuda', requires_grad=True)
    torch.cuda.set_sync_debug_mode('error')
    try:
        mixup.begin_batch()
        mixup.run.loss_func(pred, yb).backward()
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert mixup.lam.device.type == 'cuda' and mixup.perm.device.type == 'cuda'
    assert (mixup.lam >= 0.5).all()


# ---- in a learner -------------------------------------------------------------------------------
class RawInputs(Callback):
    """Keeps the training batch as it is before MixUp (order 50 < 90)."""
    _order = 50

    def begin_batch(self): self.xb = self.run.xb


class Recorder(Callback):
    """Records each batch after MixUp (order 95) with the raw batch and MixUp's λ and permutation."""
    _order = 95

    def __init__(self): self.train, self.valid_xb, self.valid_loss_ok = [], [], []

    def after_loss(self):
        if self.run.in_train:
            self.train.append((self.run.raw_inputs.xb, self.run.xb, self.run.mix_up.lam, self.run.mix_up.perm))
        else:
            self.valid_xb.append(self.run.xb)
            self.valid_loss_ok.append(torch.equal(self.run.loss, F.cross_entropy(self.run.pred, self.run.yb)))


def make_learner(loss_func=F.cross_entropy, cbs=()):
    return Learner(mlp(), linear_data(n_train=48, n_valid=32), loss_func, lr=0.1,
                   cbs=[DeviceCallback('cpu'), MixUp(0.4), *cbs])


def test_training_batches_are_mixed_and_validation_batches_untouched():
    recorder = Recorder()
    learn = make_learner(cbs=[RawInputs(), recorder])
    learn.fit(1)
    valid_x = learn.data.valid_ds.x
    assert torch.equal(torch.cat(recorder.valid_xb), valid_x)
    assert all(recorder.valid_loss_ok)
    assert len(recorder.train) == 3
    for raw, mixed, lam, perm in recorder.train:
        assert not torch.equal(raw, mixed)
        torch.testing.assert_close(mixed, lam[:, None] * raw + (1 - lam[:, None]) * raw[perm])


def test_no_global_rng_draws_at_begin_fit():
    learn = make_learner()
    learn.opt = learn.opt_func(learn.model.parameters(), lr=learn.lr)
    state = torch.get_rng_state()
    learn.mix_up.begin_fit()
    assert torch.equal(state, torch.get_rng_state())
    learn.mix_up.after_fit()


@pytest.mark.parametrize('ending', ['normal', 'keyboard_interrupt', 'error_in_other_callback', 'cancel_train'])
def test_loss_func_restored_after_fit(ending):
    loss = LabelSmoothingCrossEntropy()

    class Stop(Callback):
        _order = 100

        def after_loss(self):
            assert isinstance(self.run.loss_func, MixUpLoss) and unwrap_loss(self.run.loss_func) is loss
            if self.run.in_train and self.run.iter == 1:
                if ending == 'keyboard_interrupt': raise KeyboardInterrupt
                if ending == 'error_in_other_callback': raise RuntimeError('boom')
                if ending == 'cancel_train': raise CancelTrainException

    learn = make_learner(loss, cbs=[Stop()])
    expected = {'keyboard_interrupt': KeyboardInterrupt, 'error_in_other_callback': RuntimeError}.get(ending)
    if expected is None:
        learn.fit(2)
    else:
        with pytest.raises(expected):
            learn.fit(2)
    assert learn.loss_func is loss and loss.reduction == 'mean'


def test_loss_without_reduction_is_refused_and_left_in_place():
    def my_loss(pred, yb): return F.cross_entropy(pred, yb)
    learn = make_learner(my_loss)
    with pytest.raises(TypeError, match="no `reduction` attribute or keyword"):
        learn.fit(1)
    assert learn.loss_func is my_loss


def test_preflight_sees_the_users_loss_through_mixup():
    learn = make_learner(LabelSmoothingCrossEntropy())
    learn.data.train_ds.y[3] = 7
    loss = learn.loss_func
    with pytest.raises(ValueError, match='target class index 7.*out of range'):
        learn.fit(1)
    assert learn.loss_func is loss


def test_end_to_end_fit_with_mixup_label_smoothing_stats_and_progress(capsys):
    loss = LabelSmoothingCrossEntropy()
    stats = AvgStatsCallback([accuracy])
    learn = Learner(mlp(), linear_data(n_train=192, n_valid=96), loss, lr=0.3,
                    cbs=[DeviceCallback('cpu'), MixUp(0.4), stats, ProgressCallback(interactive=False)])
    learn.fit(4)
    assert learn.loss_func.reduction == 'mean'
    assert learn.loss_func is loss
    assert len(stats.history) == 4
    assert stats.history[-1]['valid_accuracy'] > 0.6  # 3 balanced-ish classes: chance is about 0.33
    assert stats.history[-1]['train_loss'] < stats.history[0]['train_loss']
    assert 'valid_accuracy' in capsys.readouterr().out


# ---- the course's own MixUp (course-v3 nb 10b), unchanged, on the library's helpers ------------------


def unsqueeze(input, dims):
    for dim in listify(dims): input = torch.unsqueeze(input, dim)
    return input


class CourseMixUp(Callback):
    _order = 90  # Runs after normalization and cuda

    def __init__(self, α: float = 0.4): self.distrib = Beta(torch.tensor([α]), torch.tensor([α]))

    def begin_fit(self): self.old_loss_func, self.run.loss_func = self.run.loss_func, self.loss_func

    def begin_batch(self):
        if not self.in_train: return  # Only mixup things during training
        λ = self.distrib.sample((self.yb.size(0),)).squeeze().to(self.xb.device)
        λ = torch.stack([λ, 1 - λ], 1)
        self.λ = unsqueeze(λ.max(1)[0], (1, 2, 3))
        shuffle = torch.randperm(self.yb.size(0)).to(self.xb.device)
        xb1, self.yb1 = self.xb[shuffle], self.yb[shuffle]
        self.run.xb = lin_comb(self.xb, xb1, self.λ)

    def after_fit(self): self.run.loss_func = self.old_loss_func

    def loss_func(self, pred, yb):
        if not self.in_train: return self.old_loss_func(pred, yb)
        with NoneReduce(self.old_loss_func) as loss_func:
            loss1 = loss_func(pred, yb)
            loss2 = loss_func(pred, self.yb1)
        loss = lin_comb(loss1, loss2, self.λ)
        return reduce_loss(loss, getattr(self.old_loss_func, 'reduction', 'mean'))


def test_course_mixup_runs_on_the_library_helpers():
    loss = LabelSmoothingCrossEntropy()
    learn = Learner(small_cnn(), image_data(n_train=64, n_valid=32), loss, lr=0.1,
                    cbs=[DeviceCallback('cpu'), CourseMixUp()])
    learn.fit(1)
    assert learn.loss_func is loss and loss.reduction == 'mean'
    assert learn.course_mix_up.λ.shape == (32, 1, 1, 1) and torch.isfinite(learn.loss)
