"""CSVLogger and TensorBoardCallback write what AvgStats computed, survive interrupts, need no per-batch sync."""
import csv
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from minilearn.callbacks.loggers import CSVLogger, TensorBoardCallback
from minilearn.callbacks.metrics import AvgStatsCallback, accuracy
from minilearn.callbacks.recorder import Recorder
from minilearn.data.core import DataBunch, Dataset
from minilearn.learner import Callback, Learner


def make_learner(tmp_path, cbs):
    x, y = torch.randn(40, 3), torch.randint(0, 2, (40,))
    data = DataBunch(DataLoader(Dataset(x, y), batch_size=10, shuffle=True), DataLoader(Dataset(x, y), batch_size=20))
    learn = Learner(nn.Linear(3, 2), data, F.cross_entropy, lr=0.1, path=tmp_path, cbs=[AvgStatsCallback(accuracy)] + cbs)
    learn.logger = lambda *a: None
    return learn


def read_csv(path):
    with open(path, newline='') as f:
        return list(csv.reader(f))


class InterruptAt(Callback):
    def __init__(self, epoch):
        self.epoch_to_stop = epoch

    def begin_batch(self):
        if self.run.epoch == self.epoch_to_stop: raise KeyboardInterrupt


def test_csv_rows_equal_avg_stats_history(tmp_path):
    learn = make_learner(tmp_path, [CSVLogger()])
    learn.fit(3)
    rows = read_csv(tmp_path / 'history.csv')
    assert rows[0] == ['epoch', 'train_loss', 'train_accuracy', 'valid_loss', 'valid_accuracy', 'time']
    history = learn.avg_stats.history
    assert len(rows) == 1 + len(history) == 4
    for row, expected in zip(rows[1:], history):
        assert [float(v) for v in row] == pytest.approx([expected[c] for c in rows[0]], rel=0, abs=0)
    assert learn.csv_logger.read() == history


def test_csv_intact_after_keyboard_interrupt_in_epoch_3(tmp_path):
    learn = make_learner(tmp_path, [CSVLogger('logs/run.csv')])
    with pytest.raises(KeyboardInterrupt):
        learn.fit(5, cbs=InterruptAt(2))
    rows = read_csv(tmp_path / 'logs' / 'run.csv')
    assert len(rows) == 3 and [int(r[0]) for r in rows[1:]] == [0, 1]
    assert learn.csv_logger.file is None  # closed by after_fit


def test_csv_is_flushed_every_epoch(tmp_path):
    seen = []

    class ReadBack(Callback):
        _order = 30
        def after_epoch(self): seen.append(len(read_csv(tmp_path / 'history.csv')))

    learn = make_learner(tmp_path, [CSVLogger(), ReadBack()])
    learn.fit(2)
    assert seen == [2, 3]


def test_csv_append_and_header_mismatch(tmp_path):
    learn = make_learner(tmp_path, [CSVLogger(append=True)])
    learn.fit(1)
    learn.fit(2)
    assert len(read_csv(tmp_path / 'history.csv')) == 1 + 1 + 2
    (tmp_path / 'other.csv').write_text('epoch,loss\n0,1.0\n')
    with pytest.raises(ValueError, match='other.csv has columns'):
        make_learner(tmp_path, [CSVLogger('other.csv', append=True)]).fit(1)
    assert (tmp_path / 'other.csv').read_text() == 'epoch,loss\n0,1.0\n'


def test_csv_logger_needs_avg_stats(tmp_path):
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
    data = DataBunch(DataLoader(Dataset(x, y), batch_size=4), None)
    learn = Learner(nn.Linear(3, 2), data, F.cross_entropy, path=tmp_path, cbs=[CSVLogger()])
    with pytest.raises(ValueError, match='AvgStatsCallback'):
        learn.fit(1)


def event_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}


def test_tensorboard_writes_epoch_and_step_scalars(tmp_path):
    learn = make_learner(tmp_path, [TensorBoardCallback(), Recorder()])

    class LossCopy(Callback):  # an independent record of the training losses
        losses = []
        def after_loss(self):
            if self.run.in_train: self.losses.append(self.run.loss.item())

    learn.fit(2, cbs=LossCopy())
    scalars = event_scalars(tmp_path / 'runs')
    history = learn.avg_stats.history
    for name in ('train_loss', 'valid_loss', 'valid_accuracy'):
        assert scalars[f'epoch/{name}'] == [(r['epoch'], pytest.approx(r[name], rel=1e-6)) for r in history]
    steps = scalars['train/loss_step']
    assert [s for s, _ in steps] == list(range(8))
    assert [v for _, v in steps] == pytest.approx(LossCopy.losses, rel=1e-6)
    assert [v for _, v in scalars['train/lr_group0']] == pytest.approx([0.1] * 8)


def test_tensorboard_buffers_steps_until_epoch_end(tmp_path):
    learn = make_learner(tmp_path, [TensorBoardCallback(log_dir=tmp_path / 'tb'), Recorder()])
    seen = []

    class Spy(Callback):
        _order = 30
        def begin_fit(self):
            writer, self.calls = self.run.tensor_board.writer, []
            add_scalar = writer.add_scalar
            writer.add_scalar = lambda *a, **k: (self.calls.append(a[0]), add_scalar(*a, **k))
        def after_batch(self):
            seen.append((self.run.recorder.n_losses, len(self.calls)))

    learn.fit(1, cbs=Spy())
    # 4 training batches recorded, nothing written during the epoch; 2 validation batches add nothing
    assert seen == [(1, 0), (2, 0), (3, 0), (4, 0), (4, 0), (4, 0)]
    assert (tmp_path / 'tb').is_dir() and learn.tensor_board.writer is None
    assert len(event_scalars(tmp_path / 'tb')['train/loss_step']) == 4


def test_tensorboard_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, 'torch.utils.tensorboard', None)
    with pytest.raises(ImportError, match=r"minilearn\[tensorboard\]"):
        TensorBoardCallback()


def test_tensorboard_writes_the_steps_of_an_interrupted_epoch(tmp_path):
    class StopAfterTwoBatches(Callback):
        def begin_batch(self):
            if self.run.epoch == 1 and self.run.iter == 2: raise KeyboardInterrupt

    learn = make_learner(tmp_path, [TensorBoardCallback(), Recorder()])
    with pytest.raises(KeyboardInterrupt):
        learn.fit(3, cbs=StopAfterTwoBatches())
    scalars = event_scalars(tmp_path / 'runs')
    assert [s for s, _ in scalars['train/loss_step']] == list(range(6))
    assert len(scalars['epoch/train_loss']) == 1


def test_loggers_write_nothing_on_other_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.distributed, 'is_initialized', lambda: True)
    monkeypatch.setattr(torch.distributed, 'get_rank', lambda group=None: 1)
    monkeypatch.setattr(torch.distributed, 'get_world_size', lambda group=None: 2)
    learn = make_learner(tmp_path, [TensorBoardCallback(), CSVLogger()])
    learn.fit(1)
    assert not (tmp_path / 'runs').exists() and not (tmp_path / 'history.csv').exists()


def test_csv_resumed_fit_keeps_the_earlier_epochs(tmp_path):
    learn = make_learner(tmp_path, [CSVLogger()])
    learn.fit(2)
    learn.fit(4, start_epoch=2)
    rows = read_csv(tmp_path / 'history.csv')
    assert [int(r[0]) for r in rows[1:]] == [0, 1, 2, 3]
    assert learn.csv_logger.read() == learn.avg_stats.history


# ---- the protocol every logger follows ------------------------------------------------------------------------
from minilearn.callbacks.loggers import LoggerCallback  # noqa: E402


class Recording(LoggerCallback):
    """Keeps what the protocol hands a logger, in order."""
    def __init__(self): self.calls = []
    def open(self): self.calls.append(('open',))
    def log_params(self, params): self.calls.append(('params', params))
    def log_epoch(self, row, step): self.calls.append(('epoch', step, row))
    def log_steps(self, values, first_step): self.calls.append(('steps', first_step, values))
    def log_status(self, status, error): self.calls.append(('status', status, error))
    def close(self): self.calls.append(('close',))


def test_the_protocol_gives_params_once_rows_steps_and_the_status(tmp_path):
    log = Recording()
    learn = make_learner(tmp_path, [log, Recorder()])
    learn.fit(2)
    kinds = [c[0] for c in log.calls]
    assert kinds == ['open', 'params', 'steps', 'epoch', 'steps', 'epoch', 'status', 'close']
    params = log.calls[1][1]
    assert params['lr'] == 0.1 and params['epochs'] == 2 and params['bs'] == 10 and params['n_train'] == 40
    assert params['model'] == 'Linear' and params['n_params'] == 3 * 2 + 2 and params['loss_func'] == 'cross_entropy'
    assert [(c[1], c[2]) for c in log.calls if c[0] == 'epoch'] == [(r['epoch'], r) for r in learn.avg_stats.history]
    steps = [c for c in log.calls if c[0] == 'steps']
    assert [c[1] for c in steps] == [0, 4]
    assert sum((c[2]['loss_step'] for c in steps), []) == pytest.approx(learn.recorder.losses)
    assert log.calls[-2] == ('status', 'finished', None)
    # a resumed fit continues the steps (absolute epochs and batches), a second fit starts them anew
    log.calls = []
    learn.fit(4, start_epoch=2)
    assert [c[1] for c in log.calls if c[0] == 'epoch'] == [2, 3]
    assert [c[1] for c in log.calls if c[0] == 'steps'] == [8, 12]


def test_the_protocol_reports_failed_and_interrupted_fits(tmp_path):
    log = Recording()
    learn = make_learner(tmp_path, [log, Recorder()])
    error = RuntimeError('boom')

    class Fail(Callback):
        def begin_batch(self):
            if self.run.epoch == 1 and self.run.iter == 1: raise error

    with pytest.raises(RuntimeError, match='boom') as raised:
        learn.fit(3, cbs=Fail())
    status = [c for c in log.calls if c[0] == 'status']
    assert len(status) == 1 and status[0][1] == 'failed' and status[0][2] is raised.value  # what fit raised
    assert [c[1] for c in log.calls if c[0] == 'steps'] == [0, 4]  # the failed epoch's first batch too
    log.calls = []
    with pytest.raises(KeyboardInterrupt):
        learn.fit(3, cbs=InterruptAt(1))
    assert [c[1] for c in log.calls if c[0] == 'status'] == ['interrupted']
