"""ELR and AreaUnderMargin (issue 21, items 2 and 4): against hand-written reference loops fed the batches the
learner read (`learn.idx`), the authors' `elr_loss`, the `aum` package, a mid-epoch resume, and bad input."""
from functools import partial

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from aum import AUMCalculator
from torch import nn
from torch.utils.data import DataLoader

from helpers import forbid_host_reads, mlp, same_weights, weights
from minilearn import AreaUnderMargin, ELR, ELRLoss
from minilearn.callbacks.checkpoint import CheckpointCallback, TerminateOnNaNCallback
from minilearn.callbacks.metrics import AvgStatsCallback
from minilearn.callbacks.mixup import CutMix, MixUp
from minilearn.data.core import DataBunch, Dataset
from minilearn.learner import Callback, Learner
from minilearn.losses import LabelSmoothingCrossEntropy

N_TRAIN, N_VALID, N_CLASSES = 60, 20, 3


def tensors(seed=0, noise=0.3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN + N_VALID, 8, generator=g)
    y = (x @ torch.randn(8, N_CLASSES, generator=g)).argmax(1)
    flip = torch.rand(len(y), generator=g) < noise  # some wrong labels, so ELR and AUM have work to do
    return x, torch.where(flip, (y + 1) % N_CLASSES, y), flip


def tensor_data(bs=8, seed=3, drop_last=False):
    x, y, _ = tensors()
    return DataBunch.from_tensors(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], bs=bs, seed=seed,
                                  drop_last=drop_last)


def dataset_data(bs=8, seed=3):
    x, y, _ = tensors()
    return DataBunch.from_datasets(Dataset(x[:N_TRAIN], y[:N_TRAIN]), Dataset(x[N_TRAIN:], y[N_TRAIN:]), bs=bs,
                                   seed=seed)


OPT = partial(torch.optim.SGD, momentum=0.9)


def learner(data, cbs=(), loss=F.cross_entropy, seed=0):
    torch.manual_seed(seed)
    learn = Learner(mlp(n_classes=N_CLASSES), data, loss, opt_func=OPT, lr=0.1, cbs=list(cbs))
    learn.logger = lambda *a: None
    return learn


class Batches(Callback):
    """The training batches as the model saw them: idx, and at after_loss the logits and targets."""
    _order = 50

    def __init__(self): self.idx, self.preds, self.targets = [], [], []

    def after_loss(self):
        if not self.run.in_train: return
        self.idx.append(self.run.idx.clone())
        self.preds.append(self.run.pred.detach().clone())
        self.targets.append(self.run.yb.clone())


# ---- the authors' elr_loss (shengliu66/ELR, ELR/model/loss.py), the config's lambda made an argument ---------
class elr_loss(nn.Module):
    def __init__(self, num_examp, num_classes=10, beta=0.3, lam=3.0):
        super().__init__()
        self.num_classes = num_classes
        self.target = torch.zeros(num_examp, self.num_classes)
        self.beta, self.lam = beta, lam

    def forward(self, index, output, label):
        y_pred = F.softmax(output, dim=1)
        y_pred = torch.clamp(y_pred, 1e-4, 1.0 - 1e-4)
        y_pred_ = y_pred.data.detach()
        self.target[index] = self.beta * self.target[index] + (1 - self.beta) * ((y_pred_) / (y_pred_).sum(dim=1, keepdim=True))
        ce_loss = F.cross_entropy(output, label)
        elr_reg = ((1 - (self.target[index] * y_pred).sum(dim=1)).log()).mean()
        final_loss = ce_loss + self.lam * elr_reg
        return final_loss


def reference_elr(batches, x, y, beta, lam, seed=0):
    """A plain PyTorch loop over the batches the learner read (same initial weights, same optimizer)."""
    torch.manual_seed(seed)
    model = mlp(n_classes=N_CLASSES)
    opt = OPT(model.parameters(), lr=0.1)
    criterion = elr_loss(N_TRAIN, N_CLASSES, beta=beta, lam=lam)
    for idx in batches:
        loss = criterion(idx, model(x[idx]), y[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model, criterion.target


@pytest.mark.parametrize('make_data,beta,lam', [(tensor_data, 0.7, 3.0), (dataset_data, 0.9, 1.0)])
def test_elr_trains_as_the_authors_loss_on_the_same_batches(make_data, beta, lam):
    data = make_data()
    seen = Batches()
    learn = learner(data, [ELR(beta, lam), seen])
    learn.fit(3)
    assert len(seen.idx) == 3 * 8
    model, target = reference_elr(seen.idx, data.train_ds.x, data.train_ds.y, beta, lam)
    assert same_weights(weights(learn.model), weights(model))
    assert torch.equal(learn.elr.targets, target)
    assert learn.loss_func is F.cross_entropy


class LossProbe(Callback):
    """The loss of every validation batch, and get_preds' per-item losses called inside the fit."""
    _order = 50

    def __init__(self): self.valid, self.preds = [], []

    def after_loss(self):
        if not self.run.in_train: self.valid.append((self.run.loss.detach(), self.run.pred.detach(), self.run.yb))

    def after_epoch(self):
        assert isinstance(self.run.loss_func, ELRLoss)
        self.preds.append(self.run.get_preds(with_loss=True))


def test_elr_validation_and_get_preds_use_the_plain_loss_and_do_not_move_the_targets():
    probe = LossProbe()
    learn = learner(tensor_data(), [ELR(), probe])
    learn.fit(2)
    assert len(probe.valid) == 2 * 2
    for loss, pred, yb in probe.valid:
        assert torch.equal(loss, F.cross_entropy(pred, yb))
    for preds, targets, losses in probe.preds:
        assert torch.allclose(losses, F.cross_entropy(preds.log(), targets, reduction='none'), atol=1e-5)
    before = learn.elr.targets.clone()
    learn.get_preds(with_loss=True)
    assert torch.equal(learn.elr.targets, before) and learn.loss_func is F.cross_entropy


def test_elr_with_a_loss_object_and_the_lr_finder():
    loss = LabelSmoothingCrossEntropy(0.1)
    learn = learner(tensor_data(), [ELR()], loss=loss)
    learn.lr_find(max_iter=5)
    assert learn.elr.targets is None and learn.loss_func is loss  # ELR stood aside during the sweep
    learn.fit(1)
    assert learn.loss_func is loss and loss.reduction == 'mean' and learn.elr.targets.shape == (N_TRAIN, N_CLASSES)
    assert (learn.elr.targets.sum(1) > 0).all()  # every item trained on once: its target moved
    first = learn.elr.targets.clone()
    learn.fit(1)  # a new fit starts the targets from zero again
    assert torch.allclose(learn.elr.targets.sum(1), first.sum(1))  # (1 − β)·1 per item after one epoch


class FailAt(Callback):
    def __init__(self, epoch, it): self.at = (epoch, it)

    def after_pred(self):
        if self.run.in_train and (self.run.epoch, self.run.iter) == self.at: raise RuntimeError('node lost')


def test_elr_puts_the_loss_back_however_the_fit_ends():
    learn = learner(tensor_data(), [ELR()])
    with pytest.raises(RuntimeError, match='node lost'):
        learn.fit(2, cbs=[FailAt(1, 2)])
    assert learn.loss_func is F.cross_entropy

    class Stop(Callback):
        def after_step(self): raise __import__('minilearn').CancelTrainException()

    learn.fit(1, cbs=[Stop()])
    assert learn.loss_func is F.cross_entropy


@pytest.mark.parametrize('cb', [lambda: ELR(), lambda: AreaUnderMargin()])
def test_refused_before_any_step_mixers_and_a_plain_dataloader(cb):
    for mixer in (MixUp(0.4), CutMix()):
        learn = learner(tensor_data(), [cb(), mixer])
        before = weights(learn.model)
        with pytest.raises(ValueError, match=f"cannot train with {type(mixer).__name__}.*remove one"):
            learn.fit(1)
        assert learn.loss_func is F.cross_entropy and same_weights(weights(learn.model), before)
    x, y, _ = tensors()
    plain = DataBunch(DataLoader(Dataset(x, y), batch_size=8, shuffle=True), None)
    learn = learner(plain, [cb()])
    with pytest.raises(ValueError, match=r"learn\.idx.*DataLoader.*DataBunch\.from_tensors or DataBunch\.from_datasets"):
        learn.fit(1)
    assert learn.loss_func is F.cross_entropy and learn.opt is None  # as before the fit


def test_bad_arguments_and_states_are_named():
    for beta in (1.0, -0.1, 'x', True):
        with pytest.raises(ValueError, match='ELR beta'): ELR(beta=beta)
    for lam in (0, -1, float('nan')):
        with pytest.raises(ValueError, match='ELR lam'): ELR(lam=lam)
    learn = learner(tensor_data(), [ELR(), AreaUnderMargin()])
    with pytest.raises(ValueError, match='has recorded nothing yet'): learn.area_under_margin.scores
    with pytest.raises(ValueError, match='holds 5 items, the training set has 60'):
        learn.elr.load_state_dict({'targets': torch.zeros(5, 3)})
    with pytest.raises(KeyError, match='sums'): learn.area_under_margin.load_state_dict({'counts': None})
    with pytest.raises(ValueError, match='both'):
        learn.area_under_margin.load_state_dict({'sums': torch.zeros(N_TRAIN), 'counts': None})


class SoftTargets(Callback):
    def begin_batch(self): self.run.yb = F.one_hot(self.run.yb, N_CLASSES).float()


def test_aum_needs_class_indices_and_logits():
    learn = learner(tensor_data(), [AreaUnderMargin(), SoftTargets()])
    with pytest.raises(TypeError, match='AreaUnderMargin needs class-index targets of shape \\(8,\\)'):
        learn.fit(1)
    flat = learner(tensor_data(), [ELR()])
    with pytest.raises(ValueError, match=r'ELR needs model outputs of shape \(N, C\), one logit per class; got \(8,\)'):
        flat.elr.regularizer(torch.randn(8))  # (the learner's preflight names a 1-D output for cross entropy first)


# ---- AUM against the aum package ---------------------------------------------------------------------------
def aum_package(seen, tmp_path):
    calc = AUMCalculator(str(tmp_path), compressed=True)
    for idx, pred, yb in zip(seen.idx, seen.preds, seen.targets):
        calc.update(pred, yb, idx.tolist())
    calc.finalize()
    df = pd.read_csv(tmp_path / 'aum_values.csv')
    return dict(zip(df.sample_id.tolist(), df.aum.tolist()))


@pytest.mark.parametrize('make_data', [partial(tensor_data, drop_last=True), dataset_data])
def test_aum_agrees_with_the_aum_package(make_data, tmp_path):
    learn = learner(make_data(), [AreaUnderMargin()])
    learn.fit(1)
    seen = Batches()
    dropping = learn.data.train_dl.drop_last  # one epoch then: the 4 items its last partial batch drops are NaN
    learn.fit(1 if dropping else 2, cbs=[seen])  # a new fit starts from nothing
    scores = learn.area_under_margin.scores
    assert scores.shape == (N_TRAIN,) and scores.dtype == torch.float64
    expected = aum_package(seen, tmp_path)
    trained = torch.cat(seen.idx).unique().tolist()
    assert sorted(expected) == trained
    for i in range(N_TRAIN):
        if i in expected: assert scores[i].item() == expected[i], i  # the same float64 sums and division
        else: assert scores[i].isnan()
    assert len(trained) == (N_TRAIN - 4 if dropping else N_TRAIN)


class Terminate(Callback):
    """NaN loss on one training batch: TerminateOnNaN cancels it before AUM (after_loss) records it."""
    def after_pred(self):
        if self.run.in_train and self.run.iter == 2: self.run.pred = self.run.pred * float('nan')


def test_a_batch_cancelled_at_after_loss_is_not_recorded():
    seen = Batches()
    learn = learner(tensor_data(), [AreaUnderMargin(), seen, Terminate(), TerminateOnNaNCallback()])
    with pytest.warns(UserWarning, match='non-finite loss'):
        learn.fit(1)
    counts = learn.area_under_margin.counts
    assert int(counts.sum()) == 2 * 8  # the two batches before it (TerminateOnNaN stops the fit)
    assert not learn.area_under_margin.scores.isnan()[torch.cat(seen.idx[:2])].any()


# ---- the per-batch path reads nothing back ------------------------------------------------------------------
class NoReads(Callback):
    """Host reads raise from after_pred to after_batch on training batches after the first (the preflight reads)."""
    def __init__(self, monkeypatch): self.monkeypatch, self.armed = monkeypatch, 0
    _order = 1000

    def after_pred(self):
        if self.run.in_train and self.run.n_iter > 0:
            forbid_host_reads(self.monkeypatch)
            self.armed += 1

    def after_batch(self): self.monkeypatch.undo()


def test_no_host_read_per_batch(monkeypatch):
    guard = NoReads(monkeypatch)
    learn = learner(tensor_data(), [ELR(), AreaUnderMargin(), guard])
    learn.fit(2)
    assert guard.armed == 2 * 8 - 1


# ---- exact resume inside an epoch ---------------------------------------------------------------------------
@pytest.mark.parametrize('make_data', [tensor_data, dataset_data])
def test_mid_epoch_resume_is_exact(make_data, tmp_path):
    straight = learner(make_data(), [ELR(), AreaUnderMargin()])
    straight.fit(3)
    ckpt = CheckpointCallback(tmp_path / 'ckpt', every_n_batches=3, signals=None)
    crashed = learner(make_data(), [ELR(), AreaUnderMargin(), ckpt])
    with pytest.raises(RuntimeError, match='node lost'):
        crashed.fit(3, cbs=[FailAt(1, 5)])
    resumed = learner(make_data(seed=11), [ELR(), AreaUnderMargin()], seed=5)
    resumed.fit(3, resume=ckpt.path)
    assert (resumed.start_epoch, resumed.start_iter) == (1, 4)  # checkpoint after 12 of the 8-batch epochs' batches
    assert same_weights(weights(resumed.model), weights(straight.model))
    assert torch.equal(resumed.elr.targets, straight.elr.targets)
    assert torch.equal(resumed.area_under_margin.scores, straight.area_under_margin.scores)
    assert torch.equal(resumed.area_under_margin.counts, straight.area_under_margin.counts)


# ---- AUM as a detector: find_label_issues(aum=...) ----------------------------------------------------------
def test_find_label_issues_ranks_by_aum_with_a_count_given_or_confident_learnings():
    from cleanlab.count import num_label_issues
    from minilearn import find_label_issues
    scores = torch.tensor([0.5, -1.0, float('nan'), -2.0, 3.0, -1.0, 0.1], dtype=torch.float64)
    assert find_label_issues(aum=scores, n_issues=3).tolist() == [3, 1, 5]  # lowest first, ties in dataset order
    assert find_label_issues(aum=scores, n_issues=0).tolist() == []
    assert find_label_issues(aum=scores, n_issues=10).tolist() == [3, 1, 5, 6, 0, 4]  # never trained on: left out
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (7,), generator=g)
    probs = torch.softmax(torch.randn(7, 3, generator=g), 1)
    count = num_label_issues(labels=labels.numpy(), pred_probs=probs.double().numpy())
    assert count > 0
    found = find_label_issues(aum=scores, labels=labels, pred_probs=probs)
    assert found.tolist() == [3, 1, 5, 6, 0, 4][:count]


def test_aum_detector_end_to_end_beats_chance():
    from minilearn import find_label_issues
    _, _, flip = tensors()
    learn = learner(tensor_data(), [AreaUnderMargin()])
    learn.fit(8)
    flipped = flip[:N_TRAIN]
    found = find_label_issues(aum=learn.area_under_margin.scores, n_issues=int(flipped.sum()))
    precision = flipped[found].float().mean().item()
    assert flipped.float().mean().item() < 0.34 and precision >= 0.55  # chance would be a third


def test_aum_detector_bad_input_is_named():
    from minilearn import find_label_issues
    scores = torch.zeros(5, dtype=torch.float64)
    with pytest.raises(TypeError, match='needs the number of issues: n_issues'): find_label_issues(aum=scores)
    with pytest.raises(ValueError, match='n_issues must be an int >= 0'): find_label_issues(aum=scores, n_issues=-1)
    with pytest.raises(TypeError, match='1-D float tensor'): find_label_issues(aum=torch.zeros(5, 2), n_issues=1)
    with pytest.raises(TypeError, match='not both'):
        find_label_issues(aum=scores, n_issues=1, labels=[0] * 5, pred_probs=torch.ones(5, 2) / 2)
    with pytest.raises(ValueError, match='aum has 5 scores but there are 4 labels'):
        find_label_issues(aum=scores, labels=[0, 1, 0, 1], pred_probs=torch.ones(4, 2) / 2)
    with pytest.raises(TypeError, match='n_issues=... goes with aum'):
        find_label_issues(labels=[0, 1], pred_probs=torch.ones(2, 2) / 2, n_issues=1)
    learn = learner(tensor_data(), [])
    with pytest.raises(TypeError, match='learner .* or aum'): find_label_issues(learn, aum=scores, n_issues=1)
