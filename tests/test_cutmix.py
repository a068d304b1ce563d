"""CutMix and MixUpCutMix: the pasted box, λ equal to the pasted pixel fraction, the switch, stop_pct, restores."""
import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Beta

import minilearn
from minilearn.callbacks.device import DeviceCallback
from minilearn.callbacks.mixup import CutMix, MixHandler, MixUp, MixUpCutMix, MixUpLoss
from minilearn.core import unwrap_loss
from minilearn.data.core import DataBunch, Dataset
from minilearn.learner import Callback, CancelTrainException, Learner
from minilearn.losses import LabelSmoothingCrossEntropy
from helpers import forbid_host_reads, image_data, small_cnn


def attached(cb, xb, yb, in_train=True, loss_func=None):
    """A mixing callback attached to a minimal stand-in for the learner's batch state."""
    cb.set_runner(SimpleNamespace(in_train=in_train, xb=xb, yb=yb, loss_func=loss_func))
    return cb


def mix(cb, xb, yb):
    attached(cb, xb, yb).begin_batch()
    return cb.run.xb, cb.run.yb


def pasted_mask(xb, mixed, perm):
    """The (H, W) pixels where the mixed batch differs from the originals (xb has no ties, so they are the box);
    checks every other pixel is the original's and every pasted one the partner's, exactly, in all channels.
    None when the shuffle paired every item with itself (the box cannot be seen)."""
    differs = (mixed != xb).any(1)  # (N, H, W)
    moved = perm != torch.arange(len(perm))
    assert not differs[~moved].any()  # an item paired with itself is unchanged
    if not moved.any(): return None
    mask = differs[moved].any(0)
    assert torch.equal(mixed[..., ~mask], xb[..., ~mask])
    assert torch.equal(mixed[..., mask], xb[perm][..., mask])
    return mask


def as_rectangle(mask):
    """(top, bottom, left, right) of a mask that must be one axis-aligned rectangle (None when empty)."""
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    if len(rows) == 0: return None
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    box = torch.zeros_like(mask)
    box[top:bottom, left:right] = True
    assert torch.equal(mask, box), 'the pasted pixels are not one rectangle'
    return top, bottom, left, right


def fixed_draw(lam, cy, cx):
    return lambda xb: (torch.tensor(float(lam)), torch.tensor([cy, cx]))


# ---- the box and λ --------------------------------------------------------------------------------
@pytest.mark.parametrize('h, w', [(5, 9), (12, 4), (8, 8)])
def test_pasted_region_is_the_partners_pixels_and_lambda_its_area(h, w):
    """Over many seeded batches: one rectangle of the partner, λ = 1 − its area/(H·W), the box's sides follow
    H·√(1−λ) and W·√(1−λ) (not swapped), and boxes reach every border (clipped, λ still exact)."""
    cutmix = CutMix(1.0)
    touched = {'top': 0, 'bottom': 0, 'left': 0, 'right': 0}
    inside = 0
    for seed in range(300):
        xb, yb = torch.rand(7, 3, h, w), torch.randint(0, 4, (7,))
        torch.manual_seed(seed)
        mixed, targets = mix(cutmix, xb, yb)
        torch.manual_seed(seed)
        drawn = Beta(torch.tensor(1.0), torch.tensor(1.0)).sample()  # the batch's first draw is its λ
        assert targets is yb and torch.equal(cutmix.yb1, yb[cutmix.perm])
        mask = pasted_mask(xb, mixed, cutmix.perm)
        if mask is None: continue
        assert cutmix.lam.shape == (7,) and (cutmix.lam == cutmix.lam[0]).all()
        torch.testing.assert_close(cutmix.lam[0], torch.tensor(1 - mask.sum().item() / (h * w)), rtol=0, atol=1e-6)
        box = as_rectangle(mask)
        if box is None: continue
        top, bottom, left, right = box
        touched['top'] += top == 0
        touched['bottom'] += bottom == h
        touched['left'] += left == 0
        touched['right'] += right == w
        if 0 < top and bottom < h and 0 < left and right < w:  # not clipped: the drawn size, H and W in their places
            inside += 1
            side = math.sqrt(1 - drawn.item())
            assert abs((bottom - top) - h * side) <= 0.5 + 1e-4 and abs((right - left) - w * side) <= 0.5 + 1e-4
    assert min(touched.values()) > 10 and inside > 10, (touched, inside)


def test_exact_area_false_keeps_the_drawn_lambda():
    xb, yb = torch.rand(6, 3, 5, 9), torch.arange(6)
    cutmix = CutMix(1.0, exact_area=False)
    clipped = 0
    for seed in range(50):
        torch.manual_seed(seed)
        mixed, _ = mix(cutmix, xb, yb)
        torch.manual_seed(seed)
        drawn = Beta(torch.tensor(1.0), torch.tensor(1.0)).sample()
        assert torch.equal(cutmix.lam, drawn.expand(6))
        mask = pasted_mask(xb, mixed, cutmix.perm)
        clipped += mask is not None and abs(mask.float().mean() - (1 - drawn)) > 0.1
    assert clipped > 0  # clipped boxes exist, and their λ is not their area


def test_lambda_one_pastes_nothing_and_lambda_zero_everything():
    xb, yb = torch.rand(5, 2, 5, 9), torch.arange(5)
    cutmix = attached(CutMix(), xb, yb)
    cutmix.draw = fixed_draw(1.0, 3, 7)  # λ = 1: an empty box
    cutmix.begin_batch()
    assert torch.equal(cutmix.run.xb, xb) and torch.equal(cutmix.lam, torch.ones(5))
    cutmix.run.xb = xb
    cutmix.draw = fixed_draw(0.0, 2, 4)  # λ = 0 at the centre: the whole partner
    cutmix.begin_batch()
    assert torch.equal(cutmix.run.xb, xb[cutmix.perm]) and torch.equal(cutmix.lam, torch.zeros(5))


def test_a_box_clipped_at_the_corner_gives_the_clipped_area():
    xb, yb = torch.rand(4, 1, 5, 9), torch.arange(4)
    for exact_area, expected in ((True, 1 - 15 / 45), (False, 0.0)):
        cutmix = attached(CutMix(exact_area=exact_area), xb, yb)
        # λ = 0 centred on the top-left pixel: rows -2..2 and columns -4..4, clipped to 3 rows by 5 columns
        cutmix.draw = fixed_draw(0.0, 0, 0)
        cutmix.begin_batch()
        expected_mixed = xb.clone()
        expected_mixed[..., :3, :5] = xb[cutmix.perm][..., :3, :5]
        assert torch.equal(cutmix.run.xb, expected_mixed)
        torch.testing.assert_close(cutmix.lam, torch.full((4,), expected))


def test_loss_weights_are_the_pasted_pixel_fractions():
    xb, yb = torch.rand(7, 3, 6, 10), torch.randint(0, 3, (7,))
    cutmix = attached(CutMix(1.0), xb, yb, loss_func=F.cross_entropy)
    cutmix.begin_fit()
    cutmix.draw = fixed_draw(0.5, 5, 9)  # a box at the bottom-right corner, clipped
    cutmix.begin_batch()
    fraction = pasted_mask(xb, cutmix.run.xb, cutmix.perm).float().mean()
    assert 0 < fraction < 0.5
    pred = torch.randn(7, 3)
    expected = ((1 - fraction) * F.cross_entropy(pred, yb, reduction='none')
                + fraction * F.cross_entropy(pred, yb[cutmix.perm], reduction='none')).mean()
    torch.testing.assert_close(cutmix.run.loss_func(pred, yb), expected)


def test_soft_targets_are_mixed_by_the_pasted_fraction():
    xb, yb = torch.rand(6, 3, 8, 8), torch.randn(6, 4).softmax(1)
    cutmix = attached(CutMix(1.0), xb, yb, loss_func=F.cross_entropy)
    cutmix.begin_fit()
    cutmix.begin_batch()
    keep = 1 - pasted_mask(xb, cutmix.run.xb, cutmix.perm).float().mean()
    torch.testing.assert_close(cutmix.run.yb, keep * yb + (1 - keep) * yb[cutmix.perm])
    pred = torch.randn(6, 4)
    torch.testing.assert_close(cutmix.run.loss_func(pred, cutmix.run.yb), F.cross_entropy(pred, cutmix.run.yb))


def test_seeded_cutmix_follows_torch_generator():
    xb, yb = torch.rand(7, 3, 6, 10), torch.arange(7)
    torch.manual_seed(5)
    first, _ = mix(CutMix(), xb, yb)
    torch.manual_seed(5)
    again, _ = mix(CutMix(), xb, yb)
    assert torch.equal(first, again) and not torch.equal(first, xb)


def test_inputs_that_are_not_image_batches_are_refused_clearly():
    for cls in (CutMix, MixUpCutMix):
        for shape in ((4, 8), (4, 3, 8), (4, 2, 3, 8, 8)):
            with pytest.raises(ValueError, match=r'image batches of shape \(N, C, H, W\).*or use MixUp'):
                mix(cls(), torch.rand(shape), torch.arange(4))
        with pytest.raises(TypeError, match='integer inputs'):
            mix(cls(), torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.arange(4))


def test_parameter_validation():
    for bad in (0, -1., float('nan'), True):
        with pytest.raises(ValueError, match='CutMix alpha must be a positive finite number'):
            CutMix(bad)
        with pytest.raises(ValueError, match='MixUpCutMix cutmix_alpha must be a positive'):
            MixUpCutMix(cutmix_alpha=bad)
        with pytest.raises(ValueError, match='MixUpCutMix mixup_alpha must be a positive'):
            MixUpCutMix(mixup_alpha=bad)
    for bad in (-0.1, 1.5, float('nan'), True):
        with pytest.raises(ValueError, match=r'switch_prob must be a number in \[0, 1\]'):
            MixUpCutMix(switch_prob=bad)
    for cls in (MixUp, CutMix, MixUpCutMix):
        for bad in (1, 1.0, -0.2, float('inf'), '0.1'):
            with pytest.raises(ValueError, match=rf'{cls.__name__} stop_pct must be a number in \[0, 1\)'):
                cls(stop_pct=bad)
    with pytest.raises(TypeError, match='exact_area must be True or False'):
        CutMix(exact_area=1)


def test_exported_at_top_level():
    for name in ('CutMix', 'MixUpCutMix', 'MixHandler', 'MixUp', 'MixUpLoss'):
        assert name in minilearn.__all__ and getattr(minilearn, name) is getattr(minilearn.callbacks.mixup, name)
    assert issubclass(CutMix, MixHandler) and issubclass(MixUp, MixHandler) and issubclass(MixUpCutMix, MixHandler)


# ---- the switch -----------------------------------------------------------------------------------
def check_one_kind(cb, xb, mixed):
    """The batch is exactly a CutMix batch or exactly a MixUp batch, as `use_cutmix` says."""
    perm, lam = cb.perm, cb.lam
    if cb.use_cutmix:
        mask = pasted_mask(xb, mixed, perm)
        if mask is not None: torch.testing.assert_close(lam, torch.full_like(lam, 1 - mask.float().mean().item()))
    else:
        assert (lam >= 0.5).all()
        view = lam.view(-1, 1, 1, 1)
        torch.testing.assert_close(mixed, view * xb + (1 - view) * xb[perm])


@pytest.mark.parametrize('switch_prob', [0.3, 0.0, 1.0])
def test_switch_picks_cutmix_with_the_given_probability(switch_prob):
    cb = MixUpCutMix(0.4, 1.0, switch_prob=switch_prob)
    n_batches, picks = 300, 0
    torch.manual_seed(11)
    for _ in range(n_batches):
        xb = torch.rand(5, 3, 6, 7)
        mixed, _ = mix(cb, xb, torch.arange(5))
        check_one_kind(cb, xb, mixed)
        picks += bool(cb.use_cutmix)
    sd = math.sqrt(switch_prob * (1 - switch_prob) / n_batches)
    assert abs(picks / n_batches - switch_prob) <= 4 * sd + 1e-12, picks


def test_switch_is_reproducible_from_the_seed():
    xb = torch.rand(5, 3, 6, 7)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        cb = MixUpCutMix(switch_prob=0.5)
        runs.append([(mix(cb, xb, torch.arange(5))[0], bool(cb.use_cutmix)) for _ in range(20)])
    assert all(torch.equal(a, b) and ka == kb for (a, ka), (b, kb) in zip(*runs))
    assert {k for _, k in runs[0]} == {True, False}


# ---- in a learner ---------------------------------------------------------------------------------
class Record(Callback):
    """Records each training batch before (order 50) and after (order 95) the mixing callback."""
    _order = 95

    def __init__(self, mixer_name):
        self.mixer_name, self.rows = mixer_name, []

    def after_loss(self):
        if not self.run.in_train: return
        mixer = getattr(self.run, self.mixer_name)
        self.rows.append(SimpleNamespace(raw=self.run.raw.xb, raw_y=self.run.raw.yb, xb=self.run.xb,
                                         yb=self.run.yb, lam=mixer.lam, perm=mixer.perm, pred=self.run.pred,
                                         loss=self.run.loss.detach(), loss_func=self.run.loss_func))


class Raw(Callback):
    _order = 50

    def begin_batch(self): self.xb, self.yb = self.run.xb, self.run.yb


MIXERS = {'CutMix': (CutMix, 'cut_mix'), 'MixUpCutMix': (MixUpCutMix, 'mix_up_cut_mix'), 'MixUp': (MixUp, 'mix_up')}


def image_learner(mixer, loss_func=F.cross_entropy, n_train=64, bs=16, cbs=(), y=None):
    data = image_data(n_train=n_train, n_valid=16, size=8, bs=bs)
    if y is not None:  # multi-label targets instead of the classes
        data = DataBunch.from_datasets(Dataset(data.train_ds.x, y[:n_train]), Dataset(data.valid_ds.x, y[n_train:]),
                                       bs=bs, c_in=3, c_out=4)
    return Learner(small_cnn(), data, loss_func, lr=0.1, cbs=[DeviceCallback('cpu'), mixer, Raw(), *cbs])


@pytest.mark.parametrize('epochs, n_train, stop_pct, n_mixed', [
    (2, 64, 0.25, 6),  # 2 epochs of 4 batches: the last 2 of 8 unmixed
    (1, 160, 0.3, 7),  # 10 batches: 1 − 7/10 is 0.30000000000000004 in floats, and batch 7 is already unmixed
], ids=['epochs', 'rounding'])
@pytest.mark.parametrize('name', list(MIXERS))
def test_stop_pct_stops_mixing_at_the_right_batch(name, epochs, n_train, stop_pct, n_mixed):
    cls, attr = MIXERS[name]
    record = Record(attr)
    learn = image_learner(cls(stop_pct=stop_pct), n_train=n_train, cbs=[record])
    learn.fit(epochs)
    n_batches = epochs * n_train // 16
    assert [r.lam is not None for r in record.rows] == [True] * n_mixed + [False] * (n_batches - n_mixed)
    for r in record.rows[n_mixed:]:
        assert r.perm is None and r.xb is r.raw and torch.equal(r.loss, F.cross_entropy(r.pred, r.raw_y))
    assert all(not torch.equal(r.xb, r.raw) for r in record.rows[:n_mixed])
    if name == 'MixUpCutMix': assert learn.mix_up_cut_mix.use_cutmix is None


def test_stop_pct_counts_the_batches_of_a_resumed_fit():
    record = Record('cut_mix')
    learn = image_learner(CutMix(stop_pct=0.5), cbs=[record])  # epochs 1 to 3 of 4: epoch 1 mixed, 2 and 3 not
    learn.fit(4, start_epoch=1)
    assert [r.lam is not None for r in record.rows] == [True] * 4 + [False] * 8


@pytest.mark.parametrize('name', ['CutMix', 'MixUpCutMix'])
@pytest.mark.parametrize('bs', [1, 7])
def test_batch_sizes_one_and_odd_and_the_last_short_batch_train(name, bs):
    cls, attr = MIXERS[name]
    record = Record(attr)
    learn = image_learner(cls(), n_train=15, bs=bs, cbs=[record])
    learn.fit(1)
    sizes = [len(r.raw) for r in record.rows]
    assert sizes == ([1] * 15 if bs == 1 else [7, 7, 1])
    for r in record.rows:
        assert r.lam.shape == (len(r.raw),) and torch.isfinite(r.loss)
        if len(r.raw) == 1: assert torch.equal(r.xb, r.raw)  # paired with itself
    assert learn.loss_func is F.cross_entropy


@pytest.mark.parametrize('name', ['CutMix', 'MixUpCutMix'])
def test_training_loss_is_the_lambda_mixture_of_per_item_losses(name):
    cls, attr = MIXERS[name]
    record = Record(attr)
    learn = image_learner(cls(), loss_func=LabelSmoothingCrossEntropy(0.1, reduction='sum'), cbs=[record])
    learn.fit(1)
    per_item = partial(F.cross_entropy, reduction='none', label_smoothing=0.1)
    for r in record.rows:
        expected = (r.lam * per_item(r.pred, r.raw_y) + (1 - r.lam) * per_item(r.pred, r.raw_y[r.perm])).sum()
        torch.testing.assert_close(r.loss, expected)
    assert learn.loss_func.reduction == 'sum'


@pytest.mark.parametrize('name', ['CutMix', 'MixUpCutMix'])
@pytest.mark.parametrize('ending', ['normal', 'keyboard_interrupt', 'error_in_other_callback', 'cancel_train'])
def test_loss_func_and_reduction_restored_after_fit(name, ending):
    cls, attr = MIXERS[name]
    loss = LabelSmoothingCrossEntropy(reduction='sum')

    class Stop(Callback):
        _order = 100

        def after_loss(self):
            assert isinstance(self.run.loss_func, MixUpLoss) and unwrap_loss(self.run.loss_func) is loss
            if self.run.in_train and self.run.iter == 1:
                if ending == 'keyboard_interrupt': raise KeyboardInterrupt
                if ending == 'error_in_other_callback': raise RuntimeError('boom')
                if ending == 'cancel_train': raise CancelTrainException

    learn = image_learner(cls(), loss_func=loss, cbs=[Stop()])
    expected = {'keyboard_interrupt': KeyboardInterrupt, 'error_in_other_callback': RuntimeError}.get(ending)
    if expected is None:
        learn.fit(2)
    else:
        with pytest.raises(expected):
            learn.fit(2)
    assert learn.loss_func is loss and loss.reduction == 'sum'


def test_a_refused_batch_leaves_the_learner_as_it_was():
    loss = LabelSmoothingCrossEntropy()
    ds = Dataset(torch.rand(8, 8), torch.arange(8) % 3)
    learn = Learner(nn.Linear(8, 3), DataBunch.from_datasets(ds, ds, bs=4), loss, cbs=[CutMix()])
    with pytest.raises(ValueError, match=r'image batches of shape \(N, C, H, W\), got inputs of shape \(4, 8\)'):
        learn.fit(1)
    assert learn.loss_func is loss and loss.reduction == 'mean'


def test_two_mixing_callbacks_are_refused():
    loss = LabelSmoothingCrossEntropy()
    learn = image_learner(CutMix(), loss_func=loss, cbs=[MixUp()])
    with pytest.raises(ValueError, match=r'already mixed by .*MixUpCutMix picks MixUp or CutMix per batch'):
        learn.fit(1)
    assert learn.loss_func is loss


@pytest.mark.parametrize('name', ['CutMix', 'MixUpCutMix'])
def test_multi_label_float_targets_with_bce_are_mixed_as_targets(name):
    cls, attr = MIXERS[name]
    g = torch.Generator().manual_seed(1)
    y = (torch.rand(64 + 16, 4, generator=g) < 0.4).float()  # several labels per image
    record = Record(attr)
    loss = nn.BCEWithLogitsLoss()
    learn = image_learner(cls(), loss_func=loss, cbs=[record], y=y)
    learn.fit(2)
    for r in record.rows:
        lam = r.lam[:, None]
        torch.testing.assert_close(r.yb, lam * r.raw_y + (1 - lam) * r.raw_y[r.perm])
        torch.testing.assert_close(r.loss, F.binary_cross_entropy_with_logits(r.pred, r.yb))
    assert any(((r.yb > 0) & (r.yb < 1)).any() for r in record.rows)
    assert learn.loss_func is loss and loss.reduction == 'mean'


# ---- no host reads ------------------------------------------------------------------------------
@pytest.mark.parametrize('name', ['CutMix', 'MixUpCutMix'])
def test_no_host_reads_on_the_batch_path(monkeypatch, name):
    xb, yb = torch.rand(8, 3, 6, 10), torch.randint(0, 3, (8,))
    cb = attached(MIXERS[name][0](stop_pct=0.2), xb, yb, loss_func=F.cross_entropy)
    cb.run.n_epochs, cb.run.epochs = 0.5, 2
    cb.begin_fit()
    cb.begin_batch()  # builds the distributions on the first batch

    forbid_host_reads(monkeypatch)
    cb.run.xb = xb
    cb.begin_batch()
    loss = cb.run.loss_func(torch.randn(8, 3, requires_grad=True), yb)
    loss.backward()
    monkeypatch.undo()
    assert torch.isfinite(loss) and not torch.equal(cb.run.xb, xb)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('name', ['CutMix', 'MixUpCutMix'])
def test_mixing_happens_on_the_cuda_device_without_synchronising(name):
    xb, yb = torch.rand(31, 3, 9, 13, device='cuda'), torch.randint(0, 3, (31,), device='cuda')
    cb = attached(MIXERS[name][0](), xb, yb, loss_func=LabelSmoothingCrossEntropy())
    cb.begin_fit()
    pred = torch.randn(31, 3, device='cuda', requires_grad=True)
    torch.cuda.set_sync_debug_mode('error')
    try:
        cb.begin_batch()
        cb.run.loss_func(pred, yb).backward()
    finally:
        torch.cuda.set_sync_debug_mode('default')
    assert cb.lam.device.type == 'cuda' and cb.perm.device.type == 'cuda' and cb.lam.shape == (31,)
    if name == 'CutMix':
        mask = pasted_mask(xb.cpu(), cb.run.xb.cpu(), cb.perm.cpu())
        torch.testing.assert_close(cb.lam.cpu(), torch.full((31,), 1 - mask.float().mean().item()))
