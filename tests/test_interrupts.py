"""Ctrl-C and errors mid-fit: after_fit runs, swaps are undone, bars close, the error propagates."""
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import linear_data, mlp, same_weights, weights
from minilearn.callbacks.metrics import AvgStatsCallback, accuracy
from minilearn.callbacks.mixup import MixUp
from minilearn.callbacks.progress import ProgressCallback
from minilearn.callbacks.recorder import Recorder
from minilearn.learner import Callback, Learner
from minilearn.losses import LabelSmoothingCrossEntropy


class Events(Callback):
    """Records the events it sees (every one: it overrides dispatch)."""
    _order = 100

    def __init__(self): self.seen = []

    def __call__(self, event_name):
        self.seen.append(event_name)
        return False


class RaiseAt(Callback):
    """Raises `error` at `event` of the given epoch and training batch."""
    _order = 5

    def __init__(self, error, event='after_batch', epoch=1, batch=1):
        self.error, self.event, self.at = error, event, (epoch, batch)

    def __call__(self, event_name):
        if event_name == self.event and self.run.in_train and (self.run.epoch, self.run.iter) == self.at:
            raise self.error
        return False


class SwapLoaderAndHook(Callback):
    """Swaps the training DataLoader and adds a model hook at begin_fit, as real callbacks do; undoes both."""

    def begin_fit(self):
        self.old_dl = self.run.data.train_dl
        self.run.data.train_dl = list(self.old_dl)
        self.hook = self.run.model[0].register_forward_hook(lambda *args: None)

    def after_fit(self):
        self.run.data.train_dl = self.old_dl
        self.hook.remove()


def make_learner(cbs=(), interactive=False, loss_func=F.cross_entropy):
    data = linear_data(n_train=48, n_valid=32, bs=16)
    learn = Learner(mlp(), data, loss_func, lr=0.1, cbs=list(cbs),
                    cb_funcs=[partial(AvgStatsCallback, accuracy), Recorder,
                              partial(ProgressCallback, interactive=interactive)])
    return learn


def check_cleaned_up(learn, logger, events):
    assert events.seen[-1] == 'after_fit' and events.seen.count('after_fit') == 1
    assert learn.progress.pb is None and learn.progress.mbar is None
    assert learn.logger is logger


@pytest.mark.parametrize('interactive', [False, True])
def test_keyboard_interrupt_mid_epoch_cleans_up_and_propagates_the_same_object(capsys, interactive):
    interrupt = KeyboardInterrupt()
    events = Events()
    learn = make_learner([RaiseAt(interrupt), events], interactive=interactive)
    logger = learn.logger
    with pytest.raises(KeyboardInterrupt) as info:
        learn.fit(3)
    assert info.value is interrupt
    check_cleaned_up(learn, logger, events)
    assert 'after_cancel_train' not in events.seen and events.seen.count('after_epoch') == 1
    assert [row['epoch'] for row in learn.avg_stats.history] == [0]  # epoch 1 was not completed
    table_rows = [line for line in capsys.readouterr().out.splitlines() if line.strip().startswith(('0 ', '1 '))]
    assert [row.split()[0] for row in table_rows] == ['0']


def test_error_mid_epoch_from_the_model_propagates_unchanged():
    error = RuntimeError('CUDA out of memory (simulated)')

    class FailsLater(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.calls = mlp(), 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 6: raise error  # epoch 1, second training batch
            return self.body(x)

    events = Events()
    learn = Learner(FailsLater(), linear_data(n_train=48, n_valid=32, bs=16), F.cross_entropy,
                    cbs=[events], cb_funcs=[AvgStatsCallback, ProgressCallback])
    logger = learn.logger
    with pytest.raises(RuntimeError) as info:
        learn.fit(3)
    assert info.value is error and info.value.__cause__ is None
    check_cleaned_up(learn, logger, events)
    assert len(learn.avg_stats.history) == 1


def test_swaps_made_by_callbacks_are_undone_after_an_interrupt():
    interrupt = KeyboardInterrupt()
    learn = make_learner([SwapLoaderAndHook(), MixUp(0.4), RaiseAt(interrupt, 'after_loss', epoch=0, batch=2)],
                         loss_func=LabelSmoothingCrossEntropy())
    loss_func, train_dl = learn.loss_func, learn.data.train_dl
    with pytest.raises(KeyboardInterrupt):
        learn.fit(2)
    assert learn.loss_func is loss_func and learn.data.train_dl is train_dl
    assert not learn.model[0]._forward_hooks
    assert loss_func.reduction == 'mean'  # MixUp's per-item reduction put back too


def test_callbacks_passed_to_fit_are_detached_after_an_interrupt():
    extra = Events()
    learn = make_learner([RaiseAt(KeyboardInterrupt(), epoch=0)])
    with pytest.raises(KeyboardInterrupt):
        learn.fit(2, cbs=[extra])
    assert extra not in learn.cbs and not hasattr(learn, 'events')
    learn.remove_cbs(learn.raise_at)
    learn.fit(1)  # the learner is usable again
    assert len(learn.avg_stats.history) == 1


def test_exception_in_a_callback_names_it_keeps_its_type_and_chains_the_original():
    class MyError(ValueError):
        pass

    original = MyError('bad value in my callback')
    learn = make_learner([RaiseAt(original, 'after_step', epoch=0, batch=1)])
    with pytest.raises(MyError) as info:
        learn.fit(1)
    message = str(info.value)
    assert 'bad value in my callback' in message and "'raise_at'" in message and 'RaiseAt' in message
    assert "'after_step'" in message
    assert info.value.__cause__ is original
    with pytest.raises(ValueError):  # a user's `except ValueError` still catches it
        make_learner([RaiseAt(MyError('x'), epoch=0, batch=0)]).fit(1)


def test_exception_that_cannot_be_rebuilt_keeps_its_identity_with_a_note():
    class NeedsTwoArgs(Exception):
        def __init__(self, code, text):
            super().__init__(code, text)

    original = NeedsTwoArgs(7, 'custom')
    learn = make_learner([RaiseAt(original, 'begin_batch', epoch=0, batch=1)])
    with pytest.raises(NeedsTwoArgs) as info:
        learn.fit(1)
    assert info.value is original
    assert any("'raise_at'" in note and 'begin_batch' in note for note in original.__notes__)


def test_after_fit_failing_during_an_interrupt_does_not_replace_it():
    class BrokenCleanup(Callback):
        def after_fit(self): raise RuntimeError('cleanup failed')

    interrupt = KeyboardInterrupt()
    events = Events()
    learn = make_learner([BrokenCleanup(), RaiseAt(interrupt, epoch=0), events])
    with pytest.warns(UserWarning, match='after_fit also failed while handling KeyboardInterrupt.*cleanup failed'):
        with pytest.raises(KeyboardInterrupt) as info:
            learn.fit(2)
    assert info.value is interrupt
    assert events.seen[-1] == 'after_fit'  # the others' after_fit still ran
    assert learn.progress.mbar is None


def test_after_fit_failing_after_a_clean_fit_is_raised_naming_the_callback():
    class BrokenCleanup(Callback):
        def after_fit(self): raise RuntimeError('cleanup failed')

    events = Events()
    learn = make_learner([BrokenCleanup(), events])
    with pytest.raises(RuntimeError, match=r"cleanup failed.*'broken_cleanup'.*after_fit"):
        learn.fit(1)
    assert events.seen[-1] == 'after_fit'


def test_interrupt_before_any_step_leaves_the_model_and_optimizer_as_they_were():
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    model.eval()
    learn = Learner(model, linear_data(n_train=48, n_valid=32, bs=16), F.cross_entropy,
                    cbs=[RaiseAt(KeyboardInterrupt(), 'after_loss', epoch=0, batch=0)])
    before = weights(model)
    with pytest.raises(KeyboardInterrupt):
        learn.fit(1)
    assert learn.opt is None
    assert same_weights(before, weights(model))  # BatchNorm's running statistics included
    assert not model.training and not model[1].training


def test_interrupt_after_steps_keeps_the_training_done():
    learn = make_learner([RaiseAt(KeyboardInterrupt(), epoch=1, batch=0)])
    before = weights(learn.model)
    with pytest.raises(KeyboardInterrupt):
        learn.fit(2)
    assert learn.opt is not None and not same_weights(before, weights(learn.model))
    assert len(learn.recorder.losses) == 4  # 3 batches of epoch 0, 1 of epoch 1
    assert torch.isfinite(torch.tensor(learn.recorder.losses)).all()
