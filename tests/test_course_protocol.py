"""Callbacks written in the course-v3 dl2 style run on our Learner when their base class is ours.

Each callback here uses the protocol surface the course's exp modules rely on: dispatch through
`cb(event_name)` (overridable `__call__`), `set_runner`, `run.logger`, `dl`, `iter`, `iters`, `epoch`,
`epochs`, `n_epochs`, `n_iter`, `in_train`, `opt.param_groups`, and rewriting `run.pred` / `run.loss`.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import linear_data, mlp
from minilearn.learner import Callback, CancelTrainException, Learner


class EventTrap(Callback):
    """Course 11a style: overrides __call__ to act on one event only."""
    _order = 999

    def __init__(self, event, action): self.event, self.action = event, action

    def __call__(self, event_name):
        if event_name == self.event: self.action(self.run)


def test_overridden_dispatch_receives_events_and_can_cancel():
    hits = []

    def stop_after_two(run):
        hits.append((run.epoch, run.iter, len(run.opt.param_groups)))
        if len(hits) == 2: raise CancelTrainException()

    learn = Learner(mlp(), linear_data(), F.cross_entropy, lr=0.1)
    learn.fit(2, cbs=[EventTrap('after_step', stop_after_two)])
    assert hits == [(0, 0, 1), (0, 1, 1)]


class TableLogger(Callback):
    """Course 09c style: writes a header at begin_fit and a row per epoch through `self.logger`."""

    def begin_fit(self): self.logger(['epoch', 'n_iter'])
    def after_epoch(self): self.logger([str(self.epoch), str(self.n_iter)])


class BarLike(Callback):
    """Course 09c style progress: replaces run.logger, follows `self.dl`, `self.iter`, `self.epochs`."""
    _order = -1

    def begin_fit(self):
        self.rows, self.updates = [], []
        self.old_logger, self.run.logger = self.run.logger, self.rows.append

    def begin_epoch(self): self.total = len(self.dl)
    def begin_validate(self): self.total = len(self.dl)
    def after_batch(self): self.updates.append((self.iter, self.iters, self.total, self.epochs))
    def after_fit(self): self.run.logger = self.old_logger


def test_logger_swap_and_loop_counters():
    bar, table = BarLike(), TableLogger()
    learn = Learner(mlp(), linear_data(n_train=48, n_valid=32, bs=16), F.cross_entropy, cbs=[bar, table])
    logger = learn.logger
    learn.fit(2)
    assert bar.rows == [['epoch', 'n_iter'], ['0', '3'], ['1', '6']]
    assert bar.updates[:4] == [(0, 3, 3, 2), (1, 3, 3, 2), (2, 3, 3, 2), (0, 1, 1, 2)]
    assert learn.logger is logger


class ScheduleLr(Callback):
    """Course 05b style scheduler: writes every param group from n_epochs/epochs at begin_batch."""
    _order = 1

    def __init__(self, f): self.f = f

    def begin_batch(self):
        if self.in_train:
            for group in self.opt.param_groups: group['lr'] = self.f(self.n_epochs / self.epochs)


def test_param_group_writes_take_effect():
    seen = []

    class Read(Callback):
        def after_step(self): seen.append(self.opt.param_groups[0]['lr'])

    learn = Learner(mlp(), linear_data(n_train=48, bs=16), F.cross_entropy, lr=1.)
    learn.fit(2, cbs=[ScheduleLr(lambda pos: 1 - pos), Read()])
    assert seen == pytest.approx([1, 5 / 6, 4 / 6, 0.5, 2 / 6, 1 / 6])


class MultiOutputModel(nn.Module):
    """Returns (scores, extra activations) like the course's language model."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Linear(8, 16), nn.Linear(16, 3)

    def forward(self, x):
        h = self.body(x).relu()
        return self.head(h), h


class ActivationPenalty(Callback):
    """Course 12a RNNTrainer style: keeps extra outputs in after_pred, adds a penalty in after_loss."""

    def __init__(self, alpha): self.alpha = alpha

    def after_pred(self):
        self.hidden = self.pred[1]
        self.run.pred = self.pred[0]

    def after_loss(self):
        self.run.loss = self.run.loss + self.alpha * self.hidden.pow(2).mean()


class ClipGrads(Callback):
    """Course 12a GradientClipping style: clips in after_backward through `self.run.model`."""

    def __init__(self, clip=None): self.clip = clip

    def after_backward(self):
        if self.clip: self.norms.append(float(nn.utils.clip_grad_norm_(self.run.model.parameters(), self.clip)))

    def begin_fit(self): self.norms = []


def test_callbacks_rewrite_pred_and_loss_and_clip():
    seen = []

    class Check(Callback):
        _order = 5
        def after_loss(self):
            hidden = self.activation_penalty.hidden
            expected = F.cross_entropy(self.pred, self.yb) + 0.5 * hidden.pow(2).mean()
            seen.append(torch.allclose(self.loss, expected))

        def after_step(self):
            total = torch.sqrt(sum((p.grad ** 2).sum() for p in self.model.parameters()))
            seen.append(float(total) <= 1e-3 + 1e-6)

    learn = Learner(MultiOutputModel(), linear_data(), F.cross_entropy, lr=0.1,
                    cbs=[ActivationPenalty(0.5), ClipGrads(1e-3), Check()])
    learn.fit(1)
    assert seen and all(seen)
    assert learn.clip_grads.norms and max(learn.clip_grads.norms) > 1e-3  # clipping had work to do


def test_set_runner_and_reads_before_attachment():
    cb = TableLogger()
    with pytest.raises(AttributeError, match="no attribute 'xb'"):
        cb.xb
    learn = Learner(mlp(), linear_data(), F.cross_entropy)
    cb.set_runner(learn)
    assert cb.model is learn.model and cb.run is learn


class DebugCallback(Callback):
    """Course 11a: overrides `__call__`, so it receives every event (here it records them)."""
    _order = 999

    def __init__(self): self.events = []
    def __call__(self, event_name): self.events.append(event_name)


def test_handlers_come_from_the_class_and_an_overridden_dispatch_gets_every_event():
    calls = []

    class OnlyFit(Callback):
        def begin_fit(self): calls.append('class begin_fit')

    only_fit, debug = OnlyFit(), DebugCallback()
    only_fit.after_batch = lambda: calls.append('instance after_batch')  # not a handler: the class has none
    learn = Learner(mlp(), linear_data(n_train=32, n_valid=16, bs=16), F.cross_entropy, cbs=[only_fit, debug])
    learn.fit(1)
    assert calls == ['class begin_fit']
    train, valid = ['begin_batch', 'after_pred', 'after_loss', 'after_backward', 'after_step', 'after_batch'], \
        ['begin_batch', 'after_pred', 'after_loss', 'after_batch']
    assert debug.events == ['begin_fit', 'begin_epoch'] + train * 2 + ['begin_validate'] + valid + \
        ['after_epoch', 'after_fit']


def test_ranks_other_than_0_leave_main_process_only_callbacks_out_of_the_dispatch():
    got = []

    class Rank1(Callback):
        """What DistributedCallback does on rank 1: set the learner's rank at begin_fit, put it back after."""
        _order = -6
        def begin_fit(self): self.run.rank = 1
        def after_fit(self): self.run.rank = 0

    class Logs(Callback):
        main_process_only, who = True, 'logs'
        def begin_fit(self): got.append((self.who, 'begin_fit'))
        def after_batch(self): got.append((self.who, 'after_batch'))
        def after_fit(self): got.append((self.who, 'after_fit'))

    class EarlyLogs(Logs):  # runs before the rank changes at begin_fit, and after it is put back at after_fit
        _order, who = -10, 'early'

    learn = Learner(mlp(), linear_data(n_train=32, n_valid=16, bs=16), F.cross_entropy, cbs=[Logs(), EarlyLogs()])
    learn.fit(1, cbs=[Rank1()])
    assert got == [('early', 'begin_fit'), ('early', 'after_fit')] and learn.rank == 0
    got.clear()
    learn.fit(1)  # rank 0 again: every event
    assert got.count(('logs', 'after_batch')) == 3 and got.count(('early', 'after_batch')) == 3
    assert got[:2] == [('early', 'begin_fit'), ('logs', 'begin_fit')] and got[-1] == ('early', 'after_fit')
