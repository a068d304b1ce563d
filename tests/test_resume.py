"""Exact resume: 4 epochs straight == 2 epochs, checkpoint, fresh learner or process, load, 2 more.

With shuffled data, dropout, MixUp, LabelSmoothingCrossEntropy and a one-cycle schedule, the final weights are
bit-identical on the CPU, and so are the loss and learning-rate records and the per-epoch statistics.
"""
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import linear_data, same_weights, weights
from minilearn.callbacks.checkpoint import (CheckpointCallback, EarlyStoppingCallback, SaveModelCallback,
                                            TerminateOnNaNCallback)
from minilearn.callbacks.metrics import AvgStatsCallback, accuracy
from minilearn.callbacks.mixup import MixUp
from minilearn.callbacks.progress import ProgressCallback
from minilearn.callbacks.recorder import Recorder
from minilearn.learner import Callback, Learner
from minilearn.losses import LabelSmoothingCrossEntropy

EPOCHS, RESUME_AT = 4, 2


def build_learner(path, cbs=()):
    """The run under test; its model's initial weights come from the global seed."""
    data = linear_data(n_train=64, n_valid=32, bs=16)  # the training loader shuffles
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    learn = Learner(model, data, LabelSmoothingCrossEntropy(0.1), opt_func=torch.optim.Adam, lr=0.02,
                    cbs=[MixUp(0.4), *cbs], cb_funcs=[partial(AvgStatsCallback, accuracy), Recorder], path=path)
    learn.logger = lambda *args: None
    return learn


def train(learn, start_epoch=0):
    learn.fit_one_cycle(EPOCHS, start_epoch=start_epoch)


class Crash(Callback):
    """A Ctrl-C in the middle of epoch `RESUME_AT` (after the checkpoint of epoch RESUME_AT - 1 was written)."""

    def after_batch(self):
        if self.run.in_train and (self.run.epoch, self.run.iter) == (RESUME_AT, 1): raise KeyboardInterrupt


def stats(learn):
    return [{k: v for k, v in row.items() if k != 'time'} for row in learn.avg_stats.history]


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    torch.manual_seed(0)
    learn = build_learner(tmp_path_factory.mktemp('straight'))
    train(learn)
    return learn


@pytest.fixture(scope='module')
def checkpoint_dir(tmp_path_factory):
    """A run like `straight`, saving every epoch, killed in epoch RESUME_AT."""
    path = tmp_path_factory.mktemp('crashed')
    torch.manual_seed(0)
    learn = build_learner(path, cbs=[SaveModelCallback('ckpt', every_epoch=True), Crash()])
    with pytest.raises(KeyboardInterrupt):
        train(learn)
    assert sorted(p.name for p in (path / 'models').iterdir()) == ['ckpt_0.pth', 'ckpt_1.pth', 'ckpt_2.pth'][:RESUME_AT]
    return path


def test_resume_in_the_same_process_is_bit_identical(straight, checkpoint_dir):
    torch.manual_seed(1234)  # other initial weights and RNG: everything must come from the checkpoint
    resumed = build_learner(checkpoint_dir, cbs=[SaveModelCallback('resumed', every_epoch=True)])
    assert not same_weights(weights(resumed.model), weights(straight.model))
    resumed.load(f'ckpt_{RESUME_AT - 1}')
    assert len(resumed.avg_stats.history) == RESUME_AT
    train(resumed, start_epoch=RESUME_AT)
    assert same_weights(weights(resumed.model), weights(straight.model))
    for p_resumed, p_straight in zip(resumed.model.parameters(), straight.model.parameters()):
        for key, value in straight.opt.state[p_straight].items():
            assert torch.equal(resumed.opt.state[p_resumed][key], value)
    assert stats(resumed) == stats(straight) and len(stats(straight)) == EPOCHS
    assert resumed.recorder.losses == straight.recorder.losses
    assert resumed.recorder.hypers == straight.recorder.hypers


def test_resume_in_a_fresh_process_is_bit_identical(straight, checkpoint_dir, tmp_path):
    script = tmp_path / 'resume.py'
    script.write_text(textwrap.dedent(f'''
        import sys
        import torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        torch.set_num_threads(1)  # as in the test process (conftest)
        from test_resume import build_learner, train, RESUME_AT
        torch.manual_seed(4321)
        learn = build_learner(sys.argv[1])
        learn.load(f'ckpt_{{RESUME_AT - 1}}')
        train(learn, start_epoch=RESUME_AT)
        torch.save({{'model': learn.model.state_dict(), 'losses': torch.tensor(learn.recorder.losses)}}, sys.argv[2])
    '''))
    out = tmp_path / 'final.pth'
    result = subprocess.run([sys.executable, str(script), str(checkpoint_dir), str(out)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    final = torch.load(out, weights_only=True)
    assert same_weights(final['model'], weights(straight.model))
    assert torch.equal(final['losses'], torch.tensor(straight.recorder.losses))


def test_resume_without_restoring_rng_would_differ(straight, checkpoint_dir):
    """The control: the same checkpoint with the weights and optimizer only does not reproduce the run."""
    torch.manual_seed(1234)
    resumed = build_learner(checkpoint_dir)
    ckpt = torch.load(checkpoint_dir / 'models' / f'ckpt_{RESUME_AT - 1}.pth', weights_only=True)
    resumed.model.load_state_dict(ckpt['model'])
    resumed.create_opt()
    resumed.opt.load_state_dict(ckpt['opt'])
    train(resumed, start_epoch=RESUME_AT)
    assert not same_weights(weights(resumed.model), weights(straight.model))


def test_nothing_once_per_fit_draws_from_the_global_rng(tmp_path):
    """begin_fit handlers, the pre-flight check, checkpoint writes and after_fit leave the global RNG alone."""
    data = linear_data(n_train=32, n_valid=16, bs=16)
    data.train_dl, data.valid_dl = list(data.train_dl), list(data.valid_dl)  # loaders that draw nothing
    learn = Learner(nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3)), data, LabelSmoothingCrossEntropy(),
                    lr=0.05, path=tmp_path,
                    cbs=[SaveModelCallback(), EarlyStoppingCallback(patience=5), TerminateOnNaNCallback(),
                         ProgressCallback(interactive=False), CheckpointCallback('resume', signals=None)],
                    cb_funcs=[partial(AvgStatsCallback, accuracy), Recorder])
    learn.logger = lambda *args: None
    state = torch.get_rng_state()
    learn.fit_one_cycle(2)
    learn.save('end')
    learn.load('end')
    assert torch.equal(torch.get_rng_state(), state)
    assert (tmp_path / 'models' / 'model.pth').is_file() and (tmp_path / 'models' / 'resume.pth').is_file()
