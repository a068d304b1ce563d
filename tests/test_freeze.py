"""freeze / freeze_to / unfreeze (fastai's train_bn), slice learning rates (fastai's lr_range), fine_tune's two
phases, and a fine-tuned learner through lr_find, checkpoints with exact resume, and export."""
import math

import pytest
import torch
import torchvision
from torch import nn

from helpers import image_data, same_weights, weights
from minilearn import (AvgStatsCallback, Callback, CheckpointCallback, ChannelsLast, Learner, accuracy, load_predictor,
                       lr_range, vision_learner)


def body_head() -> nn.Sequential:
    body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1, bias=True), nn.BatchNorm2d(8), nn.ReLU())
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    return nn.Sequential(body, head)


def three_groups(m):
    return [list(m[0][:3].parameters()), list(m[0][3:].parameters()), list(m[1].parameters())]


def learner(**kwargs) -> Learner:
    torch.manual_seed(0)
    kwargs.setdefault('opt_func', torch.optim.AdamW)
    kwargs.setdefault('lr', 1e-2)
    learn = Learner(body_head(), image_data(n_train=64, n_valid=32, bs=16), torch.nn.functional.cross_entropy,
                    splitter=three_groups, **kwargs)
    learn.logger = lambda *a: None
    return learn


class LRs(Callback):
    """Every training batch's learning rate per group, per fit."""

    def __init__(self):
        self.fits = []

    def begin_fit(self):
        self.fits.append([])
        self.trainable = [p.requires_grad for p in self.run.model.parameters()]

    def after_step(self):
        self.fits[-1].append([g['lr'] for g in self.run.opt.param_groups])


# ---- lr_range ------------------------------------------------------------------------------------------
def test_lr_range_is_fastais_rule():
    lo, hi = 1e-5, 1e-3
    assert lr_range(slice(lo, hi), 3) == pytest.approx([1e-5, 1e-4, 1e-3], rel=1e-12)  # even_mults
    assert lr_range(slice(lo, hi), 5) == pytest.approx([lo * (hi / lo) ** (i / 4) for i in range(5)], rel=1e-12)
    assert lr_range(slice(hi), 3) == [hi / 10, hi / 10, hi]
    assert lr_range(slice(lo, hi), 1) == [hi] and lr_range(0.1, 2) == [0.1, 0.1] and lr_range([1, 2], 2) == [1, 2]
    with pytest.raises(ValueError, match=r"lr \(the slice's start\) must be a positive"):
        lr_range(slice(0, hi), 2)
    with pytest.raises(ValueError, match='takes no step'):
        lr_range(slice(lo, hi, 2), 2)
    with pytest.raises(ValueError, match='lr has 3 values for 2 param groups'):
        lr_range([1, 2, 3], 2)


# ---- freezing ------------------------------------------------------------------------------------------
def test_frozen_parameters_are_bit_identical_while_batchnorm_and_the_head_train():
    learn = learner(opt_func=lambda p, lr: torch.optim.AdamW(p, lr=lr, weight_decay=0.1))
    learn.freeze()  # before the first fit: builds the optimizer from the groups
    assert learn.opt is not None and learn.frozen_idx == 2
    body, head = learn.model
    convs = [body[0].weight, body[0].bias, body[3].weight, body[3].bias]
    bns = [body[1].weight, body[1].bias, body[4].weight, body[4].bias]
    assert not any(p.requires_grad for p in convs) and all(p.requires_grad for p in bns)
    before = weights(learn.model)
    learn.fit(2)
    after = weights(learn.model)
    for name in ('0.0.weight', '0.0.bias', '0.3.weight', '0.3.bias'):
        assert torch.equal(before[name], after[name]), name  # no update, no weight decay
    for name in ('0.1.weight', '0.4.bias', '1.2.weight', '1.2.bias'):
        assert not torch.equal(before[name], after[name]), name
    assert not torch.equal(before['0.1.running_mean'], after['0.1.running_mean'])
    assert not any(id(p) in {id(q) for q in learn.opt.state} for p in convs)  # no optimizer state
    learn.unfreeze()
    assert all(p.requires_grad for p in learn.model.parameters()) and learn.frozen_idx == 0
    assert len(learn.opt.state) == 0  # fastai's clear_state
    learn.fit(1)
    assert not torch.equal(after['0.0.weight'], learn.model[0][0].weight)


def test_freeze_to_counts_groups_from_the_front_or_the_back():
    learn = learner()
    learn.freeze_to(1)
    trainable = [all(p.requires_grad for p in g['params'] if p.ndim > 1) for g in learn.opt.param_groups]
    assert trainable == [False, True, True] and learn.frozen_idx == 1
    learn.freeze_to(-1)
    assert learn.frozen_idx == 2
    with pytest.warns(UserWarning, match='whole model is frozen'):
        learn.freeze_to(3)
    with pytest.raises(ValueError, match='pass -3 to 3'):
        learn.freeze_to(-4)
    one_group = Learner(body_head(), image_data(), torch.nn.functional.cross_entropy)
    with pytest.raises(ValueError, match='at least two parameter groups'):
        one_group.freeze()


# ---- discriminative learning rates -------------------------------------------------------------------
def test_one_cycle_with_a_slice_spreads_the_groups_geometrically_at_every_step():
    learn = learner()
    rec = LRs()
    learn.fit_one_cycle(2, slice(1e-4, 1e-2), cbs=[rec])
    expected = lr_range(slice(1e-4, 1e-2), 3)
    assert expected == pytest.approx([1e-4, 1e-3, 1e-2])
    for lrs in rec.fits[0]:
        assert [lr / lrs[-1] for lr in lrs] == pytest.approx([e / expected[-1] for e in expected], rel=1e-9)
    peak = max(rec.fits[0], key=lambda lrs: lrs[-1])
    assert peak == pytest.approx(expected, rel=0.05)  # the one-cycle peak (a batch near pct_start)
    assert rec.fits[0][0] == pytest.approx([e / 25 for e in expected], rel=1e-9)  # first step: max_lr / div
    learn.fit_one_cycle(1, slice(1e-2), cbs=[rec])
    assert rec.fits[1][0] == pytest.approx([1e-3 / 25, 1e-3 / 25, 1e-2 / 25], rel=1e-9)  # slice(hi): hi/10 but last


def test_fit_lr_slice_holds_each_group_for_that_fit_and_learner_lr_slice_builds_the_groups():
    learn = learner(lr=slice(1e-3))
    rec = LRs()
    learn.fit(1, cbs=[rec])
    assert all(lrs == pytest.approx([1e-4, 1e-4, 1e-3]) for lrs in rec.fits[0])
    learn.fit(1, lr=slice(1e-5, 1e-3), cbs=[rec])
    assert all(lrs == pytest.approx([1e-5, 1e-4, 1e-3]) for lrs in rec.fits[1])
    assert [g['lr'] for g in learn.opt.param_groups] == pytest.approx([1e-4, 1e-4, 1e-3])  # put back after the fit
    with pytest.raises(ValueError, match='lr has 2 values for 3 param groups'):
        learn.fit(1, lr=[1e-3, 1e-2])
    with pytest.raises(ValueError, match='lr must be one positive number or a slice'):
        Learner(body_head(), image_data(), torch.nn.functional.cross_entropy, lr=[0.1, 0.2])


# ---- fine_tune --------------------------------------------------------------------------------------------
def test_fine_tune_is_fastais_recipe_phase_by_phase():
    learn = learner(cbs=[AvgStatsCallback(accuracy)])
    rec = LRs()
    learn.add_cb(rec)
    before = weights(learn.model)
    learn.fine_tune(2, base_lr=2e-3, freeze_epochs=1)
    frozen, unfrozen = rec.fits
    # phase 1: the head alone (BatchNorm too), slice(base_lr): groups at base_lr/10 but the last, pct_start 0.99
    assert frozen[0] == pytest.approx([2e-4 / 25, 2e-4 / 25, 2e-3 / 25], rel=1e-9)
    for i, lrs in enumerate(frozen):  # the cosine warm-up to base_lr over 99 % of the phase (by hand)
        w = (1 + math.cos(math.pi * (1 - i / len(frozen) / 0.99))) / 2
        assert lrs[-1] == pytest.approx(2e-3 / 25 * (1 - w) + 2e-3 * w, rel=1e-9)
    # phase 2: everything, slice(base_lr/2/lr_mult, base_lr/2), div 5
    spread = lr_range(slice(1e-3 / 100, 1e-3), 3)
    assert unfrozen[0] == pytest.approx([v / 5 for v in spread], rel=1e-9)
    assert max(unfrozen, key=lambda lrs: lrs[-1]) == pytest.approx(spread, rel=0.05)
    assert all(rec.trainable) and learn.frozen_idx == 0
    assert len(learn.avg_stats.history) == 3  # both phases' epochs
    assert not same_weights(before, weights(learn.model))


def test_fine_tuned_vision_learner_lr_find_resume_and_export(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / 'r18.pth')
    def build():
        torch.manual_seed(1)
        data = image_data(n_train=48, n_valid=16, size=32, bs=16)  # a loader of its own: it keeps its position
        learn = vision_learner(data, 'resnet18', pretrained=tmp_path / 'r18.pth', path=tmp_path,
                               cbs=[ChannelsLast()])
        learn.logger = lambda *a: None
        return learn

    learn = build()
    frozen_before = learn.model[0][0].weight.detach().clone()
    learn.lr_find(max_iter=5)
    assert torch.equal(learn.model[0][0].weight, frozen_before) and learn.frozen_idx == 2
    # exact resume of the frozen phase, the freeze state included
    learn.fit_one_cycle(3, slice(1e-3))
    straight = weights(learn.model)

    class Crash(Callback):
        def begin_epoch(self):
            if self.run.epoch == 2: raise RuntimeError('crash')

    crashed = build()
    with pytest.raises(RuntimeError, match='crash'):
        crashed.fit_one_cycle(3, slice(1e-3), cbs=[CheckpointCallback('ck', signals=None), Crash()])
    fresh = build()
    fresh.unfreeze()  # the checkpoint's freeze state wins
    fresh.fit_one_cycle(3, slice(1e-3), resume='ck')
    assert fresh.frozen_idx == 2 and not fresh.model[0][0].weight.requires_grad
    assert same_weights(straight, weights(fresh.model))
    # export of a fine-tuned learner predicts what the learner predicts
    learn.fine_tune(1)
    learn.export(tmp_path / 'model.pt2')
    predictor = load_predictor(tmp_path / 'model.pt2')
    xb = learn.data.valid_dl.dataset.x[:4]
    learn.model.eval()
    mean, std = learn.norm_stats()
    with torch.no_grad(): expected = torch.softmax(learn.model((xb - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)), 1)
    assert torch.allclose(predictor.predict_batch(xb), expected, atol=1e-5)


class CrashInFit(Callback):
    """Dies at training batch `at` = (epoch, iter) of the learner's `fit`-th fit (fine_tune: 1 frozen, 2 unfrozen)."""

    def __init__(self, fit, at):
        self.fit, self.at, self.fits = fit, at, 0

    def begin_fit(self):
        self.fits += 1

    def after_pred(self):
        if self.fits == self.fit and self.run.in_train and (self.run.epoch, self.run.iter) == self.at:
            raise RuntimeError('node lost')


@pytest.mark.parametrize('phase, at', [(1, (0, 3)), (2, (1, 2))])
def test_fine_tune_resume_auto_continues_either_phase_bit_for_bit(tmp_path, phase, at):
    def build(folder, *cbs):
        learn = learner(path=tmp_path / folder, cbs=[AvgStatsCallback(accuracy),
                                                      CheckpointCallback('ckpt', every_n_batches=2), *cbs])
        return learn

    whole = build('whole')
    whole.fine_tune(2, freeze_epochs=1)
    crashed = build('crashed', CrashInFit(phase, at))
    with pytest.raises(RuntimeError, match='node lost'):
        crashed.fine_tune(2, freeze_epochs=1, resume='auto')  # nothing there yet: starts from scratch
    restarted = build('crashed')  # a fresh process: the same learner built again
    restarted.fine_tune(2, freeze_epochs=1, resume='auto')
    assert same_weights(weights(restarted.model), weights(whole.model))
    assert [p.requires_grad for p in restarted.model.parameters()] == [p.requires_grad for p in whole.model.parameters()]
    def rows(learn): return [{k: v for k, v in row.items() if k != 'time'} for row in learn.avg_stats.history]
    assert rows(restarted) == (rows(whole) if phase == 1 else rows(whole)[1:])  # a resumed unfrozen phase: its own
