"""Core callbacks: device, batch transforms/normalization, AvgStats, Recorder, Progress (issue: foundation)."""
import functools
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import image_data, linear_data, mlp, small_cnn
from minilearn.callbacks.device import CudaCallback, DeviceCallback
from minilearn.callbacks.metrics import AvgStats, AvgStatsCallback, accuracy
from minilearn.callbacks.progress import ProgressCallback
from minilearn.callbacks.recorder import Recorder
from minilearn.callbacks.transforms import BatchTransformXCallback, Normalize, channel_stats, normalize_chan
from minilearn.data.core import DataBunch, Dataset
from minilearn.learner import Callback, Learner

import minilearn

PACKAGE_DIR = os.path.dirname(minilearn.__file__) + os.sep


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


def test_normalize_chan_gives_zero_mean_unit_std_per_channel_any_rank():
    for shape in [(64, 3, 8, 8), (64, 2, 20), (16, 3, 4, 4, 4)]:
        x = torch.randn(*shape) * torch.tensor([2., 5., 0.5][:shape[1]]).reshape((1, -1) + (1,) * (len(shape) - 2)) + 3
        mean, std = channel_stats([(x, None)])
        for fn in (functools.partial(normalize_chan, mean=mean, std=std), Normalize(mean, std)):
            out = fn(x).transpose(0, 1).reshape(shape[1], -1)
            assert torch.allclose(out.mean(1), torch.zeros(shape[1]), atol=1e-4)
            assert torch.allclose(out.std(1, unbiased=False), torch.ones(shape[1]), atol=1e-4)


def test_normalization_follows_the_batch_dtype():
    x = torch.rand(4, 3, 2, 2, dtype=torch.float64)
    assert normalize_chan(x, [0.5] * 3, [0.2] * 3).dtype == torch.float64
    assert Normalize([0.5] * 3, [0.2] * 3)(x.half()).dtype == torch.float16


def test_channel_stats_over_a_dataloader():
    data = image_data(n_train=64, n_valid=32)
    mean, std = channel_stats(data.train_dl)
    x = torch.stack([data.train_ds[i][0] for i in range(len(data.train_ds))])
    assert torch.allclose(mean, x.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(std, x.std((0, 2, 3), unbiased=False), atol=1e-5)


def test_batch_transform_runs_after_device_move_and_sees_every_batch():
    seen = []

    def tfm(x):
        seen.append(x.device)
        return x * 2

    learn = Learner(mlp(), linear_data(n_train=32, n_valid=32), F.cross_entropy,
                    cbs=[BatchTransformXCallback(tfm), DeviceCallback('cpu')])
    learn.fit(1)
    assert len(seen) == 3 and learn.batch_transform_x._order > learn.device._order


def test_model_and_batches_land_on_the_callback_device():
    where = []

    class Where(Callback):
        _order = 10
        def after_pred(self):
            where.append((self.xb.device, self.yb.device, next(self.model.parameters()).device, self.pred.device))

    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    learn = Learner(mlp(), linear_data(), F.cross_entropy, cbs=[DeviceCallback(device), Where()])
    learn.fit(1)
    assert where and all(d.type == device for row in where for d in row)


def test_device_callback_sets_the_fit_device_and_defers_to_one_already_chosen():
    seen = []

    class Where(Callback):
        _order = 10
        def after_pred(self): seen.append((self.fit_device, self.xb.device, next(self.model.parameters()).device))

    class ChoosesCpu(Callback):  # as DistributedCallback chooses this process's device, before DeviceCallback
        _order = -6
        def begin_fit(self): self.run.fit_device = torch.device('cpu')
        def after_fit(self): self.run.fit_device = None

    cpu = torch.device('cpu')
    data = linear_data(n_train=32, n_valid=16, bs=16)
    learn = Learner(mlp(), data, F.cross_entropy, cbs=[DeviceCallback(cpu), Where()])
    assert learn.fit_device is None
    learn.fit(1)
    assert seen == [(cpu, cpu, cpu)] * 3 and learn.fit_device is None
    # Its own device would fail the fit (meta tensors hold no data): the device chosen first is used instead.
    seen.clear()
    meta = DeviceCallback('meta')
    learn = Learner(mlp(), data, F.cross_entropy, cbs=[meta, Where()])
    learn.fit(1, cbs=[ChoosesCpu()])
    assert seen == [(cpu, cpu, cpu)] * 3 and learn.fit_device is None and meta.device == torch.device('meta')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_callback_moves_to_gpu_with_pinned_memory():
    data = linear_data(pin_memory=True)
    learn = Learner(mlp(), data, F.cross_entropy, cbs=[CudaCallback()])
    learn.fit(1)
    assert next(learn.model.parameters()).is_cuda and learn.xb.is_cuda


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the fallback on machines without CUDA')
def test_cuda_callback_warns_and_trains_on_cpu_without_cuda():
    with pytest.warns(UserWarning, match='CUDA is not available'):
        cb = CudaCallback()
    learn = Learner(mlp(), linear_data(), F.cross_entropy, cbs=[cb])
    learn.fit(1)
    assert cb.device.type == 'cpu'


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


def test_progress_callback_in_a_plain_process_prints_one_row_per_epoch(tmp_path):
    script = textwrap.dedent('''
        import functools, sys, torch, torch.nn.functional as F
        sys.path.insert(0, %r)
        from helpers import linear_data, mlp
        from minilearn.callbacks.metrics import AvgStatsCallback, accuracy
        from minilearn.callbacks.progress import ProgressCallback
        from minilearn.learner import Learner
        learn = Learner(mlp(), linear_data(), F.cross_entropy, lr=0.1,
                        cb_funcs=[functools.partial(AvgStatsCallback, [accuracy]), ProgressCallback])
        logger = learn.logger
        learn.fit(3)
        print('logger restored:', learn.logger is logger)
    ''' % os.path.dirname(__file__))
    out = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ['epoch', 'train_loss', 'train_accuracy', 'valid_loss', 'valid_accuracy', 'time']
    rows = [l.split() for l in lines[1:4]]
    assert [r[0] for r in rows] == ['0', '1', '2'] and all(len(r) == 6 for r in rows)
    assert lines[4] == 'logger restored: True'
    assert '\r' not in out.stdout and '\x1b' not in out.stdout


def test_progress_bars_in_a_terminal_close_when_fit_is_interrupted(capsys):
    class Interrupt(Callback):
        def after_batch(self):
            if self.iter == 2: raise KeyboardInterrupt

    learn = Learner(mlp(), linear_data(n_train=96), F.cross_entropy,
                    cbs=[ProgressCallback(interactive=True), AvgStatsCallback([accuracy]), Interrupt()])
    logger = learn.logger
    with pytest.raises(KeyboardInterrupt):
        learn.fit(2)
    assert learn.progress.mbar is None and learn.progress.pb is None and learn.logger is logger
    assert 'Epoch 1/2' in capsys.readouterr().out


def _bar_labels(out: str) -> list[str]:
    """The label of each bar a terminal fit drew, in order: read from each bar's first drawing, at [0/n]."""
    return re.findall(r'\r(Epoch \d+/\d+) :[^\r]*? \[0/', out)


def test_terminal_bars_are_labelled_with_their_own_epoch(capsys):
    learn = Learner(mlp(), linear_data(n_train=96), F.cross_entropy,
                    cbs=[ProgressCallback(interactive=True), AvgStatsCallback([accuracy])])
    learn.fit(2)
    out = capsys.readouterr().out
    assert 'Epoch 2/2' in out  # epoch 2's bars used to read 'Epoch 1/2'
    assert _bar_labels(out) == ['Epoch 1/2'] * 2 + ['Epoch 2/2'] * 2  # training and validation bar of each epoch


def test_a_resumed_fit_labels_its_bars_from_the_start_epoch(capsys):
    learn = Learner(mlp(), linear_data(n_train=96), F.cross_entropy,
                    cbs=[ProgressCallback(interactive=True), AvgStatsCallback([accuracy])])
    learn.fit(3, start_epoch=2)
    assert _bar_labels(capsys.readouterr().out) == ['Epoch 3/3'] * 2


def test_without_progress_callback_the_table_is_printed_as_aligned_rows(capsys):
    learn = Learner(mlp(), linear_data(n_train=96), F.cross_entropy, lr=0.1, cbs=[AvgStatsCallback([accuracy])])
    learn.fit(2)
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and not any('[' in l or "'" in l for l in lines), lines  # not Python lists
    names = lines[0].split()
    assert names == ['epoch', 'train_loss', 'train_accuracy', 'valid_loss', 'valid_accuracy', 'time']
    starts = [lines[0].index(n) for n in names]  # every value starts under its column's name
    for line, epoch in zip(lines[1:], ['0', '1']):
        cells = line.split()
        assert cells[0] == epoch and len(cells) == len(names)
        assert [line.index(c, s) for c, s in zip(cells, starts)] == starts, line
        assert float(cells[1]) == pytest.approx(learn.avg_stats.history[int(epoch)]['train_loss'], abs=1e-6)


def test_progress_reads_the_loss_at_most_at_its_throttle_rate():
    reads = []
    progress = ProgressCallback(interactive=True, max_updates_per_sec=1e-6)  # effectively: only the last batch
    original = torch.Tensor.item

    def counting_item(self):
        if sys._getframe(1).f_code.co_filename.startswith(PACKAGE_DIR): reads.append(1)
        return original(self)

    learn = Learner(mlp(), linear_data(n_train=160, bs=16), F.cross_entropy, cbs=[progress])
    torch.Tensor.item = counting_item
    try:
        learn.fit(1)
    finally:
        torch.Tensor.item = original
    assert len(reads) <= 2  # 10 training batches, at most the first and the last update read it


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


def test_device_callback_moves_a_loss_module_with_class_weights():
    from minilearn.losses import LabelSmoothingCrossEntropy
    loss = LabelSmoothingCrossEntropy(0.1, weight=torch.tensor([1., 2., 3.], dtype=torch.float64))
    learn = Learner(mlp(), linear_data(), loss, cbs=[DeviceCallback('cpu')])
    learn.fit(1)
    assert loss.weight.device.type == 'cpu' and learn.loss_func is loss


def test_norm_stats_reads_every_way_of_giving_normalization():
    from minilearn.callbacks.transforms import norm_stats
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.6, 0.7]
    expected = (torch.tensor(mean), torch.tensor(std))
    for source in ((mean, std), Normalize(mean, std), functools.partial(normalize_chan, mean=mean, std=std),
                   BatchTransformXCallback(Normalize(mean, std))):
        got = norm_stats(source)
        assert torch.allclose(got[0], expected[0]) and torch.allclose(got[1], expected[1])
    learn = Learner(mlp(), linear_data(), F.cross_entropy,
                    cbs=[BatchTransformXCallback(functools.partial(normalize_chan, mean=mean, std=std))])
    assert torch.allclose(norm_stats(learn)[1], expected[1])
    assert norm_stats(Learner(mlp(), linear_data(), F.cross_entropy)) is None and norm_stats(None) is None
    with pytest.raises(TypeError, match='cannot read normalization stats'):
        norm_stats(lambda x: x)
