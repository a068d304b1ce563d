"""Core callbacks: batch transforms, AvgStats, Recorder (issue: foundation). DeviceCallback: test_device.py,
normalization: test_normalize.py, ProgressCallback: test_progress.py."""
import functools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import image_data, linear_data, mlp, small_cnn
from minilearn.callback import Order
from minilearn.callbacks.device import DeviceCallback
from minilearn.callbacks.metrics import AvgStats, AvgStatsCallback, accuracy
from minilearn.callbacks.recorder import Recorder
from minilearn.callbacks.transforms import BatchTransformXCallback, Normalize, channel_stats
from minilearn.data.core import DataBunch, Dataset
from minilearn.learner import Callback, Learner


def test_avg_stats_equal_a_hand_computation_over_the_same_batches():
    data = linear_data(n_train=50, n_valid=30, bs=16)  # uneven last batches weigh by their size
    learn = Learner(mlp(), data, F.cross_entropy, lr=0.1, cb_funcs=[functools.partial(AvgStatsCallback, [accuracy])])
    seen = {True: [], False: []}

    class Keep(Callback):
        _order = 10
        def after_loss(self):
            seen[self.in_train].append((self.loss.item(), accuracy(self.pred, self.yb).item(), len(self.yb)))

    learn.fit(1, cbs=[Keep()])
    row = learn.avg_stats.history[-1]
    for in_train, prefix in ((True, 'train'), (False, 'valid')):
        batches = seen[in_train]
        n = sum(b for _, _, b in batches)
        assert row[f'{prefix}_loss'] == pytest.approx(sum(l * b for l, _, b in batches) / n, rel=1e-6)
        assert row[f'{prefix}_accuracy'] == pytest.approx(sum(a * b for _, a, b in batches) / n, rel=1e-6)
    assert n == 30 and set(row) == {'epoch', 'train_loss', 'train_accuracy', 'valid_loss', 'valid_accuracy', 'time'}


def test_avg_stats_keeps_sums_on_device_and_reports_floats():
    stats = AvgStats([accuracy], in_train=True)

    class Run: pass

    run = Run()
    run.xb, run.yb = torch.zeros(4, 2), torch.tensor([0, 1, 1, 0])
    run.pred = torch.tensor([[1., 0], [0, 1], [1, 0], [1, 0]])
    run.loss = torch.tensor(2.)
    stats.accumulate(run)
    assert isinstance(stats.tot_loss, torch.Tensor)
    assert stats.avg_stats == [pytest.approx(2.), pytest.approx(0.75)]
    assert repr(stats).startswith('train:')


def test_history_has_one_row_per_epoch_and_logger_gets_the_table():
    lines = []
    learn = Learner(mlp(), linear_data(), F.cross_entropy, lr=0.1, cbs=[AvgStatsCallback([accuracy])])
    learn.logger = lines.append
    learn.fit(3)
    assert [r['epoch'] for r in learn.avg_stats.history] == [0, 1, 2]
    assert lines[0] == learn.avg_stats.metric_names and len(lines) == 4
    assert lines[1][0] == '0' and float(lines[1][1]) == pytest.approx(learn.avg_stats.history[0]['train_loss'], abs=1e-6)


def test_no_validation_loader_is_reported_as_missing():
    data = linear_data()
    data.valid_dl = None
    lines = []
    learn = Learner(mlp(), data, F.cross_entropy, lr=0.1, cbs=[AvgStatsCallback([accuracy])])
    learn.logger = lines.append
    learn.fit(1)
    assert learn.avg_stats.history[0]['valid_loss'] is None and lines[1][3] == '-'


def test_batch_transform_runs_after_device_move_and_sees_every_batch():
    # On the meta device (shapes, no data) a regression fit runs without host reads; the batches come from the
    # loader on the CPU, so the device each callback sees says whether the move came before it.
    seen = []

    def tfm(x):
        seen.append(('transform', x.device.type))
        return x * 2

    class BeforeMove(Callback):
        _order = Order.DEVICE - 0.5
        def begin_batch(self): seen.append(('before', self.xb.device.type))

    x, y = torch.randn(48, 8), torch.randn(48, 3)
    data = DataBunch.from_datasets(Dataset(x[:32], y[:32]), Dataset(x[32:], y[32:]), bs=16, c_in=8, c_out=3)
    learn = Learner(mlp(), data, F.mse_loss, cbs=[BatchTransformXCallback(tfm), DeviceCallback('meta'), BeforeMove()])
    learn.logger = lambda *args: None
    learn.fit(1)
    assert seen == [('before', 'cpu'), ('transform', 'meta')] * 3  # 2 training batches, 1 validation batch


def test_recorder_records_lr_per_group_and_losses_and_plots_to_png(tmp_path):
    learn = Learner(mlp(), linear_data(n_train=64, bs=16), F.cross_entropy, lr=0.05, cbs=[Recorder()],
                    splitter=lambda m: [m[0].parameters(), m[2].parameters()])
    losses = []

    class Keep(Callback):
        def after_loss(self):
            if self.in_train: losses.append(self.loss.item())

    learn.fit(2, cbs=[Keep()])
    rec = learn.recorder
    assert len(rec.lrs) == 2 and rec.lrs[0] == [0.05] * 8
    assert rec.losses == pytest.approx(losses)
    assert all(isinstance(l, torch.Tensor) for l in rec._losses)  # kept on the device until read
    for name, fig in (('lr', rec.plot_lr()), ('loss', rec.plot_loss(skip_last=1)), ('momentum', rec.plot_lr('momentum'))):
        path = tmp_path / f'{name}.png'
        fig.savefig(path)
        assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="no hyper-parameter 'betas'"):
        rec.plot_lr('betas')


def test_a_small_cnn_learns_a_generated_dataset():
    torch.manual_seed(0)
    data = image_data(n_train=512, n_valid=256)
    mean, std = channel_stats(data.train_dl)
    learn = Learner(small_cnn(), data, F.cross_entropy, lr=0.3,
                    cbs=[BatchTransformXCallback(Normalize(mean, std)), AvgStatsCallback([accuracy])])
    learn.fit(4)
    assert learn.avg_stats.history[-1]['valid_accuracy'] > 0.8  # chance is 0.25


def test_databunch_from_torchvision_style_dataset():
    from torchvision.datasets import FakeData
    from torchvision.transforms import ToTensor
    train, valid = FakeData(40, (3, 8, 8), 5, transform=ToTensor()), FakeData(20, (3, 8, 8), 5, transform=ToTensor())
    data = DataBunch.from_datasets(train, valid, bs=8, c_in=3, c_out=5)
    assert data.train_dl.batch_size == 8 and data.valid_dl.batch_size == 16 and data.c == 5
    xb, yb = next(iter(data.train_dl))
    assert xb.shape == (8, 3, 8, 8) and yb.dtype == torch.int64
    learn = Learner(nn.Sequential(nn.Flatten(), nn.Linear(192, 5)), data, F.cross_entropy, cbs=[AvgStatsCallback()])
    learn.fit(1)
    assert len(learn.avg_stats.history) == 1


def test_dataset_and_bad_batch_size_errors():
    with pytest.raises(ValueError, match='same length'):
        Dataset(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match='batch size'):
        DataBunch.from_datasets(Dataset(torch.zeros(3), torch.zeros(3)), None, bs=0)


