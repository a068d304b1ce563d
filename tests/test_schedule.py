"""Schedules, ParamScheduler, one-cycle and the LR finder (issue 5)."""
import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import linear_data, mlp, same_weights, weights

from minilearn.callbacks.recorder import Recorder
from minilearn.callbacks.schedule import (LR_Find, ParamScheduler, annealer, combine_scheds, cos_1cycle_anneal,
                                          create_phases, fit_one_cycle, lr_find, sched_cos, sched_exp, sched_lin,
                                          sched_no)
from minilearn.learner import Callback, Learner


def two_groups(m):
    return [m[0].parameters(), m[2].parameters()]


class Probe(Callback):
    """Reads the optimizer's hyper-parameters after the schedulers ran, and checks the step used them."""
    _order = 5

    def __init__(self, keys=('lr',)):
        self.keys, self.seen, self.positions, self.valid_batches = keys, [], [], 0

    def begin_batch(self):
        if not self.in_train:
            self.valid_batches += 1
            return
        self.positions.append(self.n_epochs / self.epochs)
        self.seen.append([{k: pg[k] for k in self.keys} for pg in self.opt.param_groups])


# ---- annealers -----------------------------------------------------------------------------------
def test_annealers_follow_the_course_formulas():
    for pos in (0., 0.25, 0.5, 0.8, 1.):
        assert sched_lin(2., 6.)(pos) == pytest.approx(2 + 4 * pos)
        assert sched_cos(2., 6.)(pos) == pytest.approx(2 + (1 + math.cos(math.pi * (1 - pos))) * 4 / 2)
        assert sched_no(2., 6.)(pos) == 2.
        assert sched_exp(1e-3, 1e-1)(pos) == pytest.approx(10 ** (-3 + 2 * pos))
    assert sched_cos(2., 6.)(0.) == 2. and sched_cos(2., 6.)(1.) == 6. and sched_cos(2., 6.)(0.5) == pytest.approx(4.)

    @annealer
    def sched_square(start, end, pos): return start + pos ** 2 * (end - start)
    assert sched_square(1., 3.)(0.5) == pytest.approx(1.5)


def test_sched_exp_rejects_zero_or_sign_change():
    for start, end in ((0., 1.), (1., 0.), (-1., 1.)):
        with pytest.raises(ValueError, match='non-zero and of the same sign'):
            sched_exp(start, end)


def test_combine_scheds_hits_exact_values_at_phase_boundaries():
    one_cycle = combine_scheds([0.3, 0.7], cos_1cycle_anneal(0.1, 1., 0.01))
    assert one_cycle(0.) == 0.1 and one_cycle(0.3) == 1. and one_cycle(1.) == 0.01
    assert one_cycle(0.15) == pytest.approx(0.55)  # halfway up the first cosine
    three = combine_scheds([0.25, 0.25, 0.5], [sched_lin(0., 1.), sched_no(1., 1.), sched_lin(1., -1.)])
    assert [three(p) for p in (0., 0.125, 0.25, 0.4, 0.5, 0.75, 1.)] == [0., 0.5, 1., 1., 1., 0., -1.]
    # sums that round (0.1 * 10): still exact at both ends
    tenths = combine_scheds([0.1] * 10, [sched_lin(i, i + 1) for i in range(10)])
    assert tenths(0.) == 0. and tenths(1.) == 10. and tenths(0.5) == pytest.approx(5.)


def test_combine_scheds_is_continuous():
    sched = combine_scheds([0.3, 0.7], cos_1cycle_anneal(0.04, 1., 1e-5))
    for boundary in (0.3,):
        assert sched(boundary - 1e-9) == pytest.approx(sched(boundary + 1e-9), abs=1e-6)
    grid = np.linspace(0, 1, 10001)
    values = np.array([sched(p) for p in grid])
    # a cosine from a to b has slope at most pi/2 * |b - a| / phase length
    assert np.abs(np.diff(values)).max() <= math.pi / 2 * 1. / 0.3 * 1e-4 * 1.01


def test_combine_scheds_handles_empty_phases_and_clamps_pos():
    warm_only = combine_scheds([1., 0.], [sched_lin(0., 2.), sched_lin(5., 9.)])
    assert warm_only(1.) == 2. and warm_only(0.5) == 1.
    no_warm = combine_scheds([0., 1.], [sched_lin(5., 9.), sched_lin(0., 2.)])
    assert no_warm(0.) == 0. and no_warm(1.) == 2.
    assert no_warm(-0.5) == 0. and no_warm(1.5) == 2.


def test_combine_scheds_rejects_bad_fractions():
    with pytest.raises(ValueError, match=r'must sum to 1.*create_phases'):
        combine_scheds([0.3, 0.6], [sched_lin(0, 1), sched_lin(1, 0)])
    with pytest.raises(ValueError, match='one fraction per schedule'):
        combine_scheds([0.3, 0.7], [sched_lin(0, 1)])
    with pytest.raises(ValueError, match='>= 0'):
        combine_scheds([-0.5, 1.5], [sched_lin(0, 1), sched_lin(1, 0)])
    with pytest.raises(TypeError, match='callables'):
        combine_scheds([0.5, 0.5], [sched_lin(0, 1), 3.])
    assert create_phases(0.3) == pytest.approx([0.3, 0.7])
    assert create_phases([0.2, 0.3]) == pytest.approx([0.2, 0.3, 0.5])


# ---- ParamScheduler --------------------------------------------------------------------------------
def test_param_scheduler_sets_every_group_each_step_and_the_step_uses_it():
    data = linear_data(n_train=64, bs=16)  # 4 batches per epoch
    scheds = [sched_lin(0.1, 0.2), sched_cos(1e-3, 1e-2)]
    learn = Learner(mlp(), data, F.cross_entropy, lr=0.5, splitter=two_groups)
    probe = Probe()

    class CheckStep(Callback):  # plain SGD: w_new = w - lr * grad, with the scheduled lr of each group
        _order = 6
        def after_backward(self):
            self.before = [(p.detach().clone(), p.grad.clone(), pg['lr']) for pg in self.opt.param_groups
                           for p in pg['params']]
        def after_step(self):
            params = [p for pg in self.opt.param_groups for p in pg['params']]
            for p, (old, grad, lr) in zip(params, self.before):
                assert torch.allclose(p.detach(), old - lr * grad, atol=1e-7)

    learn.fit(3, cbs=[ParamScheduler('lr', scheds), probe, CheckStep()])
    assert len(probe.seen) == 12
    expected_pos = [(e + i / 4) / 3 for e in range(3) for i in range(4)]
    assert probe.positions == pytest.approx(expected_pos)
    for pos, groups in zip(expected_pos, probe.seen):
        assert [g['lr'] for g in groups] == pytest.approx([scheds[0](pos), scheds[1](pos)])
    assert [pg['lr'] for pg in learn.opt.param_groups] == [0.5, 0.5]  # the fit's starting values are put back
    assert not hasattr(learn, 'lr_scheduler')


def test_param_scheduler_one_function_for_all_groups_and_count_mismatch_error():
    learn = Learner(mlp(), linear_data(n_train=32, bs=16), F.cross_entropy, lr=0.1, splitter=two_groups)
    probe = Probe()
    learn.fit(1, cbs=[ParamScheduler('lr', sched_lin(0.01, 0.03)), probe])
    assert [g['lr'] for s in probe.seen for g in s] == pytest.approx([0.01, 0.01, 0.02, 0.02])

    fresh = Learner(mlp(), linear_data(n_train=32, bs=16), F.cross_entropy, lr=0.1, splitter=two_groups)
    before = weights(fresh.model)
    with pytest.raises(ValueError, match='3 schedules for 2 param groups'):
        fresh.fit(1, cbs=[ParamScheduler('lr', [sched_no(1, 1)] * 3)])
    assert fresh.opt is None and same_weights(before, weights(fresh.model)) and fresh.cbs[1:] == []


@pytest.mark.parametrize('opt_func, pname, key', [
    (torch.optim.SGD, 'mom', 'momentum'), (torch.optim.SGD, 'momentum', 'momentum'),
    (torch.optim.Adam, 'mom', 'beta1'), (torch.optim.Adam, 'betas', 'beta1'), (torch.optim.AdamW, 'beta1', 'beta1'),
    (torch.optim.AdamW, 'weight_decay', 'weight_decay')])
def test_param_scheduler_hyper_parameter_names(opt_func, pname, key):
    learn = Learner(mlp(), linear_data(n_train=32, bs=16), F.cross_entropy, lr=0.01, opt_func=opt_func,
                    cbs=[Recorder()])
    learn.fit(2, cbs=[ParamScheduler(pname, sched_lin(0.9, 0.5))])
    assert learn.recorder.hypers[key][0] == pytest.approx([0.9, 0.8, 0.7, 0.6])
    group, fresh = learn.opt.param_groups[0], opt_func(mlp().parameters(), lr=0.01).param_groups[0]
    assert {k: v for k, v in group.items() if k != 'params'} == {k: v for k, v in fresh.items() if k != 'params'}


def test_param_scheduler_unknown_name_is_a_clear_error():
    learn = Learner(mlp(), linear_data(n_train=32, bs=16), F.cross_entropy, opt_func=torch.optim.Adam)
    with pytest.raises(ValueError, match=r"no hyper-parameter 'momentum'.*available: \[.*'betas'"):
        learn.fit(1, cbs=[ParamScheduler('momentum', sched_lin(0.9, 0.5))])
    with pytest.raises(TypeError, match='sched_funcs must be a schedule'):
        ParamScheduler('lr', 0.1)


def test_param_scheduler_continues_from_start_epoch():
    sched = sched_lin(0., 1.)
    learn = Learner(mlp(), linear_data(n_train=32, bs=16), F.cross_entropy)
    probe = Probe()
    learn.fit(4, cbs=[ParamScheduler('lr', sched), probe], start_epoch=2)
    assert [s[0]['lr'] for s in probe.seen] == pytest.approx([0.5, 0.625, 0.75, 0.875])


def test_two_schedulers_attach_together_with_distinct_names():
    learn = Learner(mlp(), linear_data(n_train=32, bs=16), F.cross_entropy, cbs=[Recorder()])
    names = []

    class Names(Callback):
        def begin_fit(self): names.extend(cb.name for cb in self.run.cbs)

    learn.fit(1, cbs=[ParamScheduler('lr', sched_lin(0.1, 0.2)), ParamScheduler('mom', sched_lin(0.9, 0.8)), Names()])
    assert 'lr_scheduler' in names and 'mom_scheduler' in names
    assert learn.recorder.hypers['momentum'][0] == pytest.approx([0.9, 0.85])


# ---- one cycle ---------------------------------------------------------------------------------------
def test_fit_one_cycle_lr_and_momentum_trace():
    data = linear_data(n_train=160, bs=16)  # 10 batches per epoch
    learn = Learner(mlp(), data, F.cross_entropy, lr=0.3, cbs=[Recorder()])
    learn.fit_one_cycle(2, max_lr=0.4, pct_start=0.25)
    lrs, moms = learn.recorder.lrs[0], learn.recorder.hypers['momentum'][0]
    assert len(lrs) == 20
    peak = int(np.argmax(lrs))
    assert peak == 5  # pos 5/20 = pct_start
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))
    assert all(a > b for a, b in zip(lrs[peak:-1], lrs[peak + 1:]))
    assert lrs[0] == pytest.approx(0.4 / 25) and lrs[peak] == pytest.approx(0.4)
    expected_last = sched_cos(0.4, 0.4 / 1e5)((19 / 20 - 0.25) / 0.75)
    assert lrs[-1] == pytest.approx(expected_last) and min(lrs) == lrs[-1]
    assert moms[0] == pytest.approx(0.95) and moms[peak] == pytest.approx(0.85) and int(np.argmin(moms)) == peak
    assert learn.opt.param_groups[0]['lr'] == 0.3 and learn.opt.param_groups[0]['momentum'] == 0


def test_fit_one_cycle_per_group_max_lr_and_default_max_lr():
    learn = Learner(mlp(), linear_data(n_train=64, bs=16), F.cross_entropy, lr=0.2, splitter=two_groups,
                    cbs=[Recorder()])
    learn.fit_one_cycle(2, max_lr=[0.01, 0.1], div=10.)
    assert max(learn.recorder.lrs[0]) == pytest.approx(0.01, rel=0.05)
    assert max(learn.recorder.lrs[1]) == pytest.approx(0.1, rel=0.05)
    assert learn.recorder.lrs[1][0] == pytest.approx(0.01)
    learn.fit_one_cycle(1)  # max_lr defaults to learn.lr
    assert learn.recorder.lrs[0][0] == pytest.approx(0.2 / 25)
    with pytest.raises(ValueError, match='max_lr has 3 values for 2 param groups'):
        learn.fit_one_cycle(1, max_lr=[0.1, 0.1, 0.1])


def test_fit_one_cycle_momentum_for_adam_and_optimizers_without_momentum():
    adam = Learner(mlp(), linear_data(n_train=64, bs=16), F.cross_entropy, opt_func=torch.optim.Adam, lr=1e-3,
                   cbs=[Recorder()])
    adam.fit_one_cycle(1, pct_start=0.5)
    assert adam.recorder.hypers['beta1'][0] == pytest.approx([0.95, 0.9, 0.85, 0.9])
    assert adam.opt.param_groups[0]['betas'] == (0.9, 0.999)
    ada = Learner(mlp(), linear_data(n_train=64, bs=16), F.cross_entropy, opt_func=torch.optim.Adagrad,
                  cbs=[Recorder()])
    ada.fit_one_cycle(1, max_lr=0.1)
    assert ada.recorder.lrs[0][0] == pytest.approx(0.1 / 25)
    sgd = Learner(mlp(), linear_data(n_train=64, bs=16), F.cross_entropy, cbs=[Recorder()])
    sgd.fit_one_cycle(1, moms=None)
    assert sgd.recorder.hypers['momentum'][0] == [0] * 4


def test_fit_one_cycle_resumed_continues_the_same_schedule():
    full = Learner(mlp(), linear_data(n_train=64, bs=16), F.cross_entropy, cbs=[Recorder()])
    full.fit_one_cycle(4, max_lr=0.1)
    resumed = Learner(mlp(), linear_data(n_train=64, bs=16), F.cross_entropy, cbs=[Recorder()])
    resumed.fit_one_cycle(4, max_lr=0.1, start_epoch=2)
    assert resumed.recorder.lrs[0] == pytest.approx(full.recorder.lrs[0][8:])
    assert resumed.recorder.hypers['momentum'][0] == pytest.approx(full.recorder.hypers['momentum'][0][8:])


@pytest.mark.parametrize('kwargs, match', [
    (dict(pct_start=1.5), 'pct_start'), (dict(div=0), 'div must'), (dict(max_lr=-1.), 'max_lr'),
    (dict(moms=(0.95,)), 'moms must'), (dict(moms=(1.2, 0.8)), 'moms must')])
def test_fit_one_cycle_bad_arguments_leave_the_learner_alone(kwargs, match):
    learn = Learner(mlp(), linear_data(n_train=32, bs=16), F.cross_entropy)
    before = weights(learn.model)
    with pytest.raises(ValueError, match=match):
        fit_one_cycle(learn, 1, **kwargs)
    assert learn.opt is None and same_weights(before, weights(learn.model)) and len(learn.cbs) == 1


def test_schedulers_and_recorder_read_nothing_back_from_the_device(monkeypatch):
    learn = Learner(mlp(), linear_data(n_train=64, bs=16), F.cross_entropy, cbs=[Recorder()])
    calls = []

    def no_host_read(*args, **kwargs):
        raise AssertionError('host read on the per-batch path')

    def guarded(handler):
        def run():
            calls.append(handler.__name__)
            with monkeypatch.context() as m:
                for name in ('item', 'tolist', '__bool__', '__float__', '__int__', 'cpu', 'numpy'):
                    m.setattr(torch.Tensor, name, no_host_read)
                return handler()
        return run

    class Guard(Callback):  # wraps the per-batch handlers of the schedulers and the recorder
        _order = -10
        def begin_fit(self):
            for cb in self.run.cbs:
                if isinstance(cb, (ParamScheduler, Recorder)):
                    for event in ('begin_batch', 'after_batch'):
                        if hasattr(type(cb), event): setattr(cb, event, guarded(getattr(cb, event)))

    learn.fit_one_cycle(2, cbs=[Guard()])
    assert calls.count('begin_batch') == 2 * 8 + 2 * 4 and calls.count('after_batch') == 8 + 4  # train and valid
    assert len(learn.recorder.losses) == 8


# ---- LR finder ------------------------------------------------------------------------------------
def _opt_state(opt):
    sd = opt.state_dict()
    return sd['param_groups'], {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
                                for k, s in sd['state'].items()}


def _same_value(a, b):
    return torch.equal(a, b) if torch.is_tensor(a) else a == b


def _same_opt_state(a, b):
    (groups_a, state_a), (groups_b, state_b) = a, b
    return groups_a == groups_b and state_a.keys() == state_b.keys() and all(
        state_a[k].keys() == state_b[k].keys() and all(_same_value(state_a[k][n], state_b[k][n]) for n in state_a[k])
        for k in state_a)


def test_lr_find_restores_weights_optimizer_state_and_rng_bit_identically():
    learn = Learner(mlp(), linear_data(n_train=64, bs=16), F.cross_entropy, opt_func=torch.optim.AdamW, lr=1e-3)
    learn.fit(1)  # the optimizer has state (exp_avg, exp_avg_sq, step)
    w, opt_state = weights(learn.model), _opt_state(learn.opt)
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    suggestion = learn.lr_find(max_iter=20)
    assert same_weights(w, weights(learn.model))
    assert _same_opt_state(opt_state, _opt_state(learn.opt)) and len(opt_state[1]) == 4
    assert torch.equal(rng[0], torch.get_rng_state()) and rng[1] == random.getstate()
    assert np.array_equal(rng[2], np.random.get_state()[1])
    assert all(p.grad is None for p in learn.model.parameters())
    assert 1e-6 <= suggestion <= 10 and not hasattr(learn, 'lr_finder')


def test_lr_find_does_not_change_a_later_training_run():
    def run(with_lr_find):
        torch.manual_seed(1)
        learn = Learner(torch.nn.Sequential(mlp(), torch.nn.Dropout(0.2)), linear_data(n_train=64, bs=16),
                        F.cross_entropy, lr=0.1, opt_func=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9))
        if with_lr_find:
            learn.lr_find(max_iter=10)
            assert learn.opt is None  # it had none before: the next fit builds one from learn.lr
        learn.fit(2)
        return weights(learn.model)
    assert same_weights(run(False), run(True))


def test_lr_find_with_an_optimizer_that_has_no_state_yet():
    learn = Learner(mlp(), linear_data(n_train=64, bs=16), F.cross_entropy,
                    opt_func=lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9))
    learn.create_opt()
    opt, w = learn.opt, weights(learn.model)
    learn.lr_find(max_iter=8)
    assert learn.opt is opt and len(opt.state) == 0 and same_weights(w, weights(learn.model))
    assert opt.param_groups[0]['lr'] == 1e-2 and opt.param_groups[0]['momentum'] == 0.9


def test_lr_find_sweeps_exponentially_without_validation_and_stops_at_max_iter():
    learn = Learner(mlp(), linear_data(n_train=64, bs=16), F.cross_entropy, splitter=two_groups)
    probe = Probe()
    lr_find(learn, max_iter=10, min_lr=1e-4, max_lr=1e-2, cbs=[probe])
    rec = learn.recorder
    expected = [1e-4 * 100 ** (i / 10) for i in range(10)]
    assert rec.lrs[0] == pytest.approx(expected) and rec.lrs[1] == pytest.approx(expected)
    assert len(rec.losses) == 10 and probe.valid_batches == 0


def test_lr_find_stops_at_the_first_divergence():
    learn = Learner(mlp(), linear_data(n_train=320, bs=16), F.cross_entropy, cbs=[Recorder()])
    learn.lr_find(max_iter=100, min_lr=1e-2, max_lr=1e8)
    losses = learn.recorder.losses
    assert 3 <= len(losses) < 100
    best_before = [min(losses[:i]) for i in range(1, len(losses))]
    assert all(l <= 10 * b for l, b in zip(losses[1:-1], best_before[:-1]))  # no earlier divergence
    assert not losses[-1] <= 10 * best_before[-1]  # the last one diverged (or is not finite)


def test_lr_find_suggestion_lies_in_the_swept_range_and_plot_marks_it(tmp_path):
    learn = Learner(mlp(), linear_data(n_train=256, bs=16), F.cross_entropy)
    suggestion = learn.lr_find(max_iter=60, min_lr=1e-4, max_lr=10)
    lrs = learn.recorder.lrs[0]
    assert min(lrs) <= suggestion <= max(lrs) and suggestion in lrs
    assert suggestion == learn.recorder.suggest_lr()
    fig = learn.recorder.plot(skip_last=5)
    ax = fig.axes[0]
    assert ax.get_xscale() == 'log'
    marker = ax.lines[-1]
    assert list(marker.get_xdata()) == [learn.recorder.suggest_lr(skip_last=5)]
    path = tmp_path / 'lr_find.png'
    fig.savefig(path)
    assert path.stat().st_size > 1000


def test_lr_find_restores_even_when_the_sweep_fails():
    learn = Learner(mlp(), linear_data(n_train=64, bs=16), F.cross_entropy, opt_func=torch.optim.Adam)
    learn.fit(1)
    w, opt_state = weights(learn.model), _opt_state(learn.opt)

    class Boom(Callback):
        def after_step(self):
            if self.n_iter == 2: raise RuntimeError('boom')

    with pytest.raises(RuntimeError, match='boom'):
        learn.lr_find(max_iter=10, cbs=[Boom()])
    assert same_weights(w, weights(learn.model)) and _same_opt_state(opt_state, _opt_state(learn.opt))


def test_lr_find_argument_errors():
    with pytest.raises(ValueError, match='min_lr'):
        LR_Find(min_lr=1., max_lr=0.1)
    with pytest.raises(ValueError, match='max_iter'):
        LR_Find(max_iter=0)
    learn = Learner(mlp(), linear_data(n_train=32, bs=16), F.cross_entropy)
    with pytest.raises(ValueError, match='skip_last'):
        learn.lr_find(skip_last=-1)
    assert not hasattr(learn, 'recorder') or learn.recorder.losses == []


# ---- callbacks written in the course's 05b style -------------------------------------------------------
def test_course_style_param_scheduler_recorder_and_lr_find_run_on_the_learner():
    """Course-style callbacks (own code, same protocol surface as course-v3 nb_05b): they read
    `opt.param_groups`, `n_epochs / epochs`, `n_iter` and compare `self.loss` tensors in Python."""
    import matplotlib.pyplot as plt
    from minilearn.learner import CancelTrainException

    class Recorder(Callback):
        def begin_fit(self):
            self.lrs, self.losses = [[] for _ in self.opt.param_groups], []

        def after_batch(self):
            if self.in_train:
                for group, lrs in zip(self.opt.param_groups, self.lrs): lrs.append(group['lr'])
                self.losses.append(self.loss.detach().cpu())

        def plot_lr(self, pgid=-1): plt.plot(self.lrs[pgid])
        def plot_loss(self, skip_last=0): plt.plot(self.losses[:len(self.losses) - skip_last])

        def plot(self, skip_last=0, pgid=-1):
            n = len(self.losses) - skip_last
            plt.xscale('log')
            plt.plot(self.lrs[pgid][:n], [loss.item() for loss in self.losses][:n])

    class ParamScheduler(Callback):
        _order = 1

        def __init__(self, pname, sched_funcs): self.pname, self.sched_funcs = pname, sched_funcs

        def begin_fit(self):
            if not isinstance(self.sched_funcs, (list, tuple)):
                self.sched_funcs = [self.sched_funcs] * len(self.opt.param_groups)

        def begin_batch(self):
            if not self.in_train: return
            for group, f in zip(self.opt.param_groups, self.sched_funcs): group[self.pname] = f(self.n_epochs / self.epochs)

    class LR_Find(Callback):
        _order = 1

        def __init__(self, max_iter=100, min_lr=1e-6, max_lr=10):
            self.max_iter, self.min_lr, self.max_lr, self.best_loss = max_iter, min_lr, max_lr, 1e9

        def begin_batch(self):
            if self.in_train:
                lr = self.min_lr * (self.max_lr / self.min_lr) ** (self.n_iter / self.max_iter)
                for group in self.opt.param_groups: group['lr'] = lr

        def after_step(self):
            if self.n_iter >= self.max_iter or self.loss > self.best_loss * 10: raise CancelTrainException()
            self.best_loss = min(self.best_loss, self.loss)

    sched = combine_scheds([0.3, 0.7], [sched_cos(0.3, 0.6), sched_cos(0.6, 0.2)])
    learn = Learner(mlp(), linear_data(n_train=160, bs=16), F.cross_entropy, cb_funcs=[Recorder])
    learn.fit(2, cbs=[ParamScheduler('lr', sched)])
    assert learn.recorder.lrs[0] == pytest.approx([sched(i / 20) for i in range(20)])
    assert len(learn.recorder.losses) == 20
    learn.recorder.plot_lr()
    learn.recorder.plot_loss()

    learn.fit(2, cbs=[LR_Find(max_iter=12)])
    assert learn.recorder.lrs[0] == pytest.approx([1e-6 * 1e7 ** (i / 12) for i in range(12)])
    learn.recorder.plot(skip_last=2)
    assert lr_find(learn, max_iter=12) > 0  # our lr_find reads a course Recorder too


def test_param_scheduler_writes_tensor_hyper_parameters_in_place():
    opt_func = lambda params, lr: torch.optim.Adam(params, lr=torch.tensor(lr), foreach=False)  # noqa: E731
    learn = Learner(mlp(), linear_data(n_train=64, bs=16), F.cross_entropy, lr=0.01, opt_func=opt_func)
    learn.create_opt()
    lr_tensor = learn.opt.param_groups[0]['lr']
    seen = []

    class Read(Callback):
        _order = 5
        def begin_batch(self):
            if self.in_train: seen.append(self.opt.param_groups[0]['lr'].clone())

    learn.fit(1, cbs=[ParamScheduler('lr', sched_lin(0.1, 0.5)), Read()])
    assert torch.stack(seen).tolist() == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert learn.opt.param_groups[0]['lr'] is lr_tensor and lr_tensor.item() == pytest.approx(0.01)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_lr_find_on_cuda_restores_and_stops_on_divergence():
    from minilearn.callbacks.device import DeviceCallback
    learn = Learner(mlp(), linear_data(n_train=320, bs=16), F.cross_entropy, opt_func=torch.optim.Adam,
                    cbs=[DeviceCallback('cuda'), Recorder()])
    learn.fit(1)
    w, opt_state = weights(learn.model), _opt_state(learn.opt)
    cuda_rng = torch.cuda.get_rng_state_all()
    suggestion = learn.lr_find(max_iter=100, min_lr=1e-3, max_lr=1e6)
    assert same_weights(w, weights(learn.model)) and _same_opt_state(opt_state, _opt_state(learn.opt))
    assert all(torch.equal(a, b) for a, b in zip(cuda_rng, torch.cuda.get_rng_state_all()))
    assert len(learn.recorder.losses) < 100  # stopped (a batch or two after the divergence at most)
    assert min(learn.recorder.lrs[0]) <= suggestion <= max(learn.recorder.lrs[0])


def test_lr_find_leaves_loggers_checkpoints_and_their_files_alone(tmp_path):
    from minilearn.callbacks.checkpoint import EarlyStoppingCallback, SaveModelCallback
    from minilearn.callbacks.loggers import CSVLogger
    from minilearn.callbacks.metrics import AvgStatsCallback, accuracy
    learn = Learner(mlp(), linear_data(n_train=64, bs=16), F.cross_entropy, lr=0.05, path=tmp_path,
                    cbs=[AvgStatsCallback([accuracy]), CSVLogger(), EarlyStoppingCallback(patience=5),
                         SaveModelCallback(every_epoch=True)])
    learn.fit(2)
    history, csv_text = [dict(r) for r in learn.avg_stats.history], (tmp_path / 'history.csv').read_text()
    best, checkpoint = learn.early_stopping.best, (tmp_path / 'models' / 'model_1.pth').read_bytes()
    learn.lr_find(max_iter=10)
    assert learn.avg_stats.history == history and (tmp_path / 'history.csv').read_text() == csv_text
    assert learn.early_stopping.best == best and (tmp_path / 'models' / 'model_1.pth').read_bytes() == checkpoint
    assert {'avg_stats', 'csv_logger', 'early_stopping', 'save_model'} <= {cb.name for cb in learn.cbs}
