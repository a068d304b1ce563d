"""minilearn.callbacks.progress: ProgressCallback's bars and table, its smoothed loss and its throttled reads."""
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

import minilearn
from helpers import linear_data, mlp
from minilearn.callback import Order
from minilearn.callbacks.metrics import AvgStatsCallback, accuracy
from minilearn.callbacks.progress import ProgressCallback
from minilearn.learner import Callback, Learner

PACKAGE_DIR = os.path.dirname(minilearn.__file__) + os.sep




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


def test_the_loss_shown_is_the_debiased_moving_average_of_the_training_losses(capsys):
    beta, losses, shown = 0.9, [], []

    class Watch(Callback):
        _order = Order.PROGRESS + 0.5  # after ProgressCallback at every event

        def after_loss(self):
            if self.in_train: losses.append(self.loss.item())

        def after_batch(self):
            if self.in_train: shown.append(float(self.progress.pb.comment.removeprefix('loss ')))

    progress = ProgressCallback(beta=beta, max_updates_per_sec=1e9, interactive=True)  # shown after every batch
    learn = Learner(mlp(), linear_data(n_train=96, bs=16), F.cross_entropy, lr=0.1, cbs=[progress, Watch()])
    logger = learn.logger
    learn.fit(2)
    expected, average = [], 0.
    for n, loss in enumerate(losses, 1):  # fastai's SmoothenValue: the moving average over the fit, debiased
        average = beta * average + (1 - beta) * loss
        expected.append(average / (1 - beta ** n))
    assert len(shown) == 12 and shown == pytest.approx(expected, abs=1e-4)
    assert 'Epoch 2/2' in capsys.readouterr().out and learn.logger is logger


def test_without_bars_no_loss_is_kept():
    progress = ProgressCallback(interactive=False)
    learn = Learner(mlp(), linear_data(), F.cross_entropy, lr=0.1, cbs=[progress])
    learn.logger = lambda *a: None
    learn.fit(1)
    assert progress.pb is None and progress.pending == [] and progress.smooth_loss is None


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
