"""SaveModelCallback, EarlyStoppingCallback and TerminateOnNaNCallback (issue: reliability)."""
import math
import sys
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import minilearn.serialization as serialization
from helpers import linear_data, mlp, same_weights, weights
from minilearn.callbacks.checkpoint import EarlyStoppingCallback, SaveModelCallback, TerminateOnNaNCallback
from minilearn.callbacks.metrics import AvgStatsCallback, accuracy
from minilearn.callbacks.recorder import Recorder
from minilearn.learner import Callback, CancelTrainException, Learner


class WeightsPerEpoch(Callback):
    """Keeps a copy of the weights at the end of every epoch and after every optimizer step."""
    _order = 100

    def __init__(self):
        self.per_epoch, self.steps = [], []

    def after_step(self): self.steps.append(weights(self.run.model))

    def after_epoch(self): self.per_epoch.append(weights(self.run.model))


def make_learner(tmp_path, cbs=(), stats=True, lr=0.3, loss_func=F.cross_entropy, **data_kwargs):
    data = linear_data(**{'n_train': 48, 'n_valid': 32, 'bs': 16, **data_kwargs})
    cb_funcs = [partial(AvgStatsCallback, accuracy)] if stats else []
    learn = Learner(mlp(), data, loss_func, lr=lr, cbs=list(cbs), cb_funcs=cb_funcs, path=tmp_path)
    learn.logger = lambda *args: None
    return learn


def fake_monitor(cb, values):
    """Make a tracker see `values`, one per epoch, instead of the real AvgStats column."""
    sequence = iter(values)
    cb._current = lambda: next(sequence)


# ---- SaveModelCallback --------------------------------------------------------------------------------
@pytest.mark.parametrize('mode', ['min', 'max'])
def test_save_model_keeps_the_best_epoch(tmp_path, mode):
    probe = WeightsPerEpoch()
    learn = make_learner(tmp_path, cbs=[SaveModelCallback(mode=mode), probe])
    learn.fit(4)
    losses = [row['valid_loss'] for row in learn.avg_stats.history]
    best = (min if mode == 'min' else max)(range(4), key=lambda i: losses[i])
    path = tmp_path / 'models' / 'model.pth'
    assert sorted(p.name for p in path.parent.iterdir()) == ['model.pth']
    ckpt = torch.load(path, weights_only=True)
    assert ckpt['epoch'] == best + 1
    assert same_weights(ckpt['model'], probe.per_epoch[best])
    assert learn.save_model.best == losses[best]
    assert ckpt['callbacks']['save_model']['best'] == losses[best]
    assert ckpt['callbacks']['avg_stats']['history'] == learn.avg_stats.history[:best + 1]


def test_save_model_every_epoch_writes_one_file_per_epoch_that_resumes(tmp_path):
    probe = WeightsPerEpoch()
    learn = make_learner(tmp_path, cbs=[SaveModelCallback('run', every_epoch=True), probe])
    learn.fit(3)
    folder = tmp_path / 'models'
    assert sorted(p.name for p in folder.iterdir()) == ['run_0.pth', 'run_1.pth', 'run_2.pth']
    for epoch in range(3):
        ckpt = torch.load(folder / f'run_{epoch}.pth', weights_only=True)
        assert ckpt['epoch'] == epoch + 1 and ckpt['opt'] is not None
        assert same_weights(ckpt['model'], probe.per_epoch[epoch])


def test_save_model_without_optimizer(tmp_path):
    learn = make_learner(tmp_path, cbs=[SaveModelCallback(with_opt=False)])
    learn.fit(1)
    assert torch.load(tmp_path / 'models' / 'model.pth', weights_only=True)['opt'] is None


def test_save_model_writes_on_rank_zero_only(tmp_path, monkeypatch):
    monkeypatch.setattr(serialization, 'is_main_process', lambda: False)
    learn = make_learner(tmp_path, cbs=[SaveModelCallback(every_epoch=True)])
    learn.fit(2)
    assert not (tmp_path / 'models').exists()


def test_save_model_best_survives_a_resume(tmp_path):
    saver = SaveModelCallback()
    learn = make_learner(tmp_path, cbs=[saver])
    fake_monitor(saver, [0.5, 0.4])
    learn.fit(2)
    resumed_saver = SaveModelCallback()
    resumed = make_learner(tmp_path, cbs=[resumed_saver])
    resumed.load('model')
    assert resumed_saver.best == 0.4
    fake_monitor(resumed_saver, [0.45, 0.3])
    path = tmp_path / 'models' / 'model.pth'
    resumed.fit(4, start_epoch=2, cbs=[probe := WeightsPerEpoch()])
    ckpt = torch.load(path, weights_only=True)
    assert ckpt['epoch'] == 4 and same_weights(ckpt['model'], probe.per_epoch[1])  # 0.45 was no improvement
    assert resumed_saver.best == 0.3


# ---- monitored names ----------------------------------------------------------------------------------
@pytest.mark.parametrize('tracker', [SaveModelCallback, EarlyStoppingCallback])
def test_unknown_monitor_lists_the_valid_names_before_training(tmp_path, tracker):
    learn = make_learner(tmp_path, cbs=[tracker(monitor='val_loss')])
    before = weights(learn.model)
    with pytest.raises(ValueError) as info:
        learn.fit(1)
    message = str(info.value)
    assert "'val_loss'" in message and 'valid_loss' in message and 'train_accuracy' in message
    assert 'valid_accuracy' in message
    assert same_weights(before, weights(learn.model)) and learn.opt is None


@pytest.mark.parametrize('tracker', [SaveModelCallback, EarlyStoppingCallback])
def test_monitor_without_avg_stats_is_a_clear_error(tmp_path, tracker):
    learn = make_learner(tmp_path, cbs=[tracker()], stats=False)
    with pytest.raises(ValueError, match='no AvgStatsCallback'):
        learn.fit(1)


def test_monitoring_validation_without_a_validation_set_is_an_error(tmp_path):
    learn = make_learner(tmp_path, cbs=[EarlyStoppingCallback()])
    learn.data.valid_dl = None
    with pytest.raises(ValueError, match='no validation set'):
        learn.fit(1)
    learn.early_stopping.monitor = 'train_loss'
    learn.fit(1)  # a training column works without validation
    assert learn.early_stopping.best == learn.avg_stats.history[-1]['train_loss']


def test_bad_tracker_arguments(tmp_path):
    with pytest.raises(ValueError, match="'min' or 'max'"):
        EarlyStoppingCallback(mode='lowest')
    with pytest.raises(ValueError, match='patience'):
        EarlyStoppingCallback(patience=0)
    with pytest.raises(ValueError, match='min_delta'):
        EarlyStoppingCallback(min_delta=-1)
    with pytest.raises(ValueError, match='fname'):
        SaveModelCallback('models/best')


# ---- EarlyStoppingCallback ----------------------------------------------------------------------------
def test_early_stopping_waits_patience_epochs_and_resets_on_improvement(tmp_path):
    stopper = EarlyStoppingCallback(patience=2)
    learn = make_learner(tmp_path, cbs=[stopper])
    fake_monitor(stopper, [1.0, 0.9, 0.95, 0.85, 0.9, 0.9, 0.1, 0.1])
    with pytest.warns(UserWarning, match=r'no improvement of valid_loss \(best 0.85 at epoch 3\) for 2 epoch'):
        learn.fit(8)
    assert learn.epoch == 5 and len(learn.avg_stats.history) == 6


def test_early_stopping_min_delta_and_max_mode_on_real_columns(tmp_path):
    learn = make_learner(tmp_path, cbs=[EarlyStoppingCallback(min_delta=100.)])
    with pytest.warns(UserWarning, match='stopped after epoch 1'):
        learn.fit(6)  # no epoch improves the loss by 100
    assert len(learn.avg_stats.history) == 2
    learn = make_learner(tmp_path, cbs=[EarlyStoppingCallback('train_accuracy', mode='max', patience=3)], lr=0.05)
    learn.fit(4)  # accuracy still rising while learning: no stop
    assert len(learn.avg_stats.history) == 4
    assert learn.early_stopping.best == max(r['train_accuracy'] for r in learn.avg_stats.history)


def test_early_stopping_state_is_saved_up_to_date_by_save_model(tmp_path):
    stopper, saver = EarlyStoppingCallback(patience=3), SaveModelCallback(every_epoch=True)
    learn = make_learner(tmp_path, cbs=[saver, stopper])
    fake_monitor(stopper, [1.0, 1.5, 2.0])
    learn.fit(3)
    state = torch.load(tmp_path / 'models' / 'model_2.pth', weights_only=True)['callbacks']['early_stopping']
    assert state == {'best': 1.0, 'wait': 2, 'best_epoch': 0}


# ---- TerminateOnNaNCallback ---------------------------------------------------------------------------
class NaNAt:
    """Cross entropy, made non-finite at the given (epoch, batch, in_train) positions."""

    def __init__(self, learn_ref, bad, value=math.nan):
        self.learn_ref, self.bad, self.value = learn_ref, set(bad), value

    def __call__(self, pred, yb):
        loss = F.cross_entropy(pred, yb)
        learn = self.learn_ref[0]
        return loss * self.value if (learn.epoch, learn.iter, learn.in_train) in self.bad else loss


def nan_learner(tmp_path, bad, value=math.nan):
    ref = []
    probe = WeightsPerEpoch()
    learn = make_learner(tmp_path, cbs=[TerminateOnNaNCallback(), probe, Recorder()],
                         loss_func=NaNAt(ref, bad, value))
    ref.append(learn)
    return learn, probe


@pytest.mark.parametrize('value', [math.nan, math.inf])
def test_terminate_on_nan_stops_before_the_bad_batch_is_stepped(tmp_path, value):
    learn, probe = nan_learner(tmp_path, bad=[(1, 1, True)], value=value)
    with pytest.warns(UserWarning, match='non-finite loss at epoch 1, training batch 1'):
        learn.fit(3)
    assert len(probe.steps) == 3 + 1  # epoch 0 and the first batch of epoch 1; nothing after the bad one
    assert same_weights(weights(learn.model), probe.steps[-1])
    assert all(torch.isfinite(p).all() for p in learn.model.parameters())
    assert len(learn.avg_stats.history) == 1  # the interrupted epoch is not reported
    assert all(math.isfinite(l) for l in learn.recorder.losses) and len(learn.recorder.losses) == 4


def test_terminate_on_nan_in_validation(tmp_path):
    learn, probe = nan_learner(tmp_path, bad=[(0, 0, False)])
    with pytest.warns(UserWarning, match='epoch 0, validation batch 0'):
        learn.fit(3)
    assert len(probe.steps) == 3 and learn.avg_stats.history == []


def test_terminate_on_nan_lets_finite_runs_finish_and_reads_no_tensor(tmp_path, monkeypatch):
    learn, probe = nan_learner(tmp_path, bad=[])
    calls = []
    checkpoint_file = sys.modules[TerminateOnNaNCallback.__module__].__file__

    def counting(name, original):
        def wrapper(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename == checkpoint_file: calls.append((name, learn.n_iter))
            return original(self, *args, **kwargs)
        return wrapper

    for name in ('item', 'tolist', 'cpu', 'numpy', '__bool__', '__float__', '__int__'):
        monkeypatch.setattr(torch.Tensor, name, counting(name, getattr(torch.Tensor, name)))
    learn.fit(2)
    monkeypatch.undo()
    assert calls == [('numpy', 0)]  # once per fit, to set up the flag's view; never per batch
    assert len(learn.avg_stats.history) == 2 and len(probe.steps) == 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_terminate_on_nan_on_cuda_stops_within_the_epoch_without_sync(tmp_path):
    from minilearn.callbacks.device import DeviceCallback
    learn, probe = nan_learner(tmp_path, bad=[(0, 1, True)])
    learn.add_cb(DeviceCallback('cuda'))
    with pytest.warns(UserWarning, match='non-finite loss at epoch 0, training batch 1'):
        learn.fit(3)
    assert 2 <= len(probe.steps) <= 3 and learn.avg_stats.history == []


class FakeEvent:
    """Stands for a CUDA event: the work recorded completes `lag` ticks of a shared clock later."""

    def __init__(self, clock, lag):
        self.clock, self.lag, self.done_at = clock, lag, None

    def record(self): self.done_at = self.clock[0] + self.lag

    def query(self): return self.clock[0] >= self.done_at

    def synchronize(self): self.clock[0] = max(self.clock[0], self.done_at)


def async_nan_checker(n_slots, lag):
    """A TerminateOnNaNCallback in its CUDA mode, with CPU flags and fake events (runs without a GPU)."""
    cb, clock = TerminateOnNaNCallback(n_slots=n_slots), [0]
    cb._flags = torch.ones(n_slots, dtype=torch.bool)
    cb._flags_np, cb._slot_views = cb._flags.numpy(), [cb._flags[i] for i in range(n_slots)]
    cb._events = [FakeEvent(clock, lag) for _ in range(n_slots)]
    cb._pending, cb._device = [], torch.device('cuda')

    def submit(batch, value=1.0):
        cb._check_async(torch.tensor(value), (0, batch, True))
        clock[0] += 1
    return cb, submit


def test_async_nan_check_reads_completed_flags_in_order_one_batch_later():
    cb, submit = async_nan_checker(n_slots=4, lag=1)
    submit(0)
    submit(1, math.nan)
    with pytest.warns(UserWarning, match='epoch 0, training batch 1'):
        with pytest.raises(CancelTrainException):
            submit(2)  # batch 1's copy has completed by now


def test_async_nan_check_waits_for_the_oldest_copy_only_when_every_slot_is_busy():
    cb, submit = async_nan_checker(n_slots=2, lag=10)  # the device runs far behind
    submit(0)
    submit(1, math.nan)
    assert len(cb._pending) == 2
    submit(2)  # both slots busy: waits for batch 0's copy only (a fine loss), reuses its slot
    assert [where[1] for _, _, where in cb._pending] == [1, 2]
    with pytest.warns(UserWarning, match='training batch 1'):
        with pytest.raises(CancelTrainException):
            submit(3)  # batch 1's copy completed meanwhile


def test_async_nan_check_drains_at_the_end_of_the_epoch():
    cb, submit = async_nan_checker(n_slots=8, lag=100)
    submit(0)
    submit(1)
    submit(2, math.inf)
    assert len(cb._pending) == 3  # nothing read yet, no waiting
    with pytest.warns(UserWarning, match='training batch 2'):
        with pytest.raises(CancelTrainException):
            cb.after_epoch()
    assert cb._pending == []
