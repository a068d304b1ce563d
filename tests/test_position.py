"""`learn.position`: where a fit starts (completed epochs, batches done of the next), in one place, read by the loop
and by callbacks; `learn.start_epoch` / `learn.start_iter` are read-only views of it."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from helpers import linear_data, mlp, same_weights, weights
from minilearn.callback import Position
from minilearn.callbacks.checkpoint import CheckpointCallback
from minilearn.callbacks.metrics import AvgStatsCallback, accuracy
from minilearn.learner import Callback, Learner
from minilearn.serialization import CheckpointError, safe_load

N_TRAIN, BS = 80, 16  # 5 training batches per epoch, 2 validation batches
CRASH_AT = (1, 3)  # inside batch 3 of epoch 1: the last checkpoint (every 2 batches, n_iter 8) is after batch 2


class SeesPosition(Callback):
    """What a callback reads of the position at begin_fit, and the index of each pass's first batch."""

    def __init__(self): self.at_begin_fit, self.n_epochs_at_begin_fit, self.first_batch = None, None, {}

    def begin_fit(self):
        self.at_begin_fit, self.n_epochs_at_begin_fit = self.position, self.run.n_epochs  # through the learner

    def begin_batch(self): self.first_batch.setdefault((self.epoch, self.in_train), self.iter)


class Crash(Callback):
    def after_pred(self):
        if self.in_train and (self.epoch, self.iter) == CRASH_AT: raise RuntimeError('node lost')


def learner(path, cbs=()):
    torch.manual_seed(0)
    learn = Learner(mlp(), linear_data(n_train=N_TRAIN, n_valid=32, bs=BS), F.cross_entropy, lr=0.1, path=path,
                    cbs=[AvgStatsCallback([accuracy]), *cbs])
    learn.logger = lambda *a: None
    return learn


@pytest.fixture
def crashed(tmp_path):
    learn = learner(tmp_path / 'run', [CheckpointCallback('ckpt', every_n_batches=2, signals=None), Crash()])
    with pytest.raises(RuntimeError, match='node lost'):
        learn.fit(3)
    return tmp_path / 'run' / 'models' / 'ckpt.pth'


def test_a_fresh_fit_starts_at_the_beginning():
    learn, seen = learner('.'), SeesPosition()
    assert learn.position == Position(0, 0)  # before any fit
    learn.fit(2, cbs=[seen])
    assert seen.at_begin_fit == Position(epoch=0, batches_done=0) and not seen.at_begin_fit.resuming
    assert seen.n_epochs_at_begin_fit == 0. and (learn.start_epoch, learn.start_iter) == (0, 0)
    assert seen.first_batch == {(0, True): 0, (0, False): 0, (1, True): 0, (1, False): 0}


def test_start_epoch_starts_after_whole_epochs():
    learn, seen = learner('.'), SeesPosition()
    learn.fit(3, cbs=[seen], start_epoch=2)
    assert seen.at_begin_fit == Position(2, 0) and seen.at_begin_fit.resuming
    assert seen.n_epochs_at_begin_fit == 2. and learn.start_epoch == 2
    assert seen.first_batch == {(2, True): 0, (2, False): 0}


def test_a_mid_epoch_resume_starts_at_the_checkpoints_batch(crashed, tmp_path):
    ckpt = safe_load(crashed)
    assert (ckpt['epoch'], ckpt['iter'], ckpt['loader']['batches_done']) == (1, 3, 3)
    learn, seen = learner(tmp_path / 'run'), SeesPosition()
    learn.fit(3, cbs=[seen], resume=crashed)
    assert seen.at_begin_fit == Position(epoch=1, batches_done=3) and seen.at_begin_fit.resuming
    assert seen.n_epochs_at_begin_fit == 1 + 3 / 5 and (learn.start_epoch, learn.start_iter) == (1, 3)
    # only the resumed epoch's training pass starts inside; its validation and the next epoch start at 0
    assert seen.first_batch == {(1, True): 3, (1, False): 0, (2, True): 0, (2, False): 0}
    assert learn.avg_stats.history[1]['epoch'] == 1 and len(learn.avg_stats.history) == 3


def test_done_in_counts_only_the_epoch_the_fit_resumes_inside():
    start = Position(epoch=1, batches_done=3)
    assert [start.done_in(e) for e in range(4)] == [0, 3, 0, 0]
    assert not Position().resuming and Position(0, 1).resuming and Position(1, 0).resuming


def test_the_position_is_read_only():
    learn = learner('.')
    with pytest.raises(dataclasses.FrozenInstanceError):
        learn.position.epoch = 2
    with pytest.raises(AttributeError):
        learn.start_iter = 3
    with pytest.raises(AttributeError):
        learn.start_epoch = 1
    assert learn.position == Position(0, 0)


@pytest.mark.parametrize('loader, message', [(None, 'holds no training loader position'),
                                             (2, 'holds a loader at batch 2')])
def test_a_mid_epoch_checkpoint_whose_loader_is_elsewhere_is_refused(crashed, tmp_path, loader, message):
    ckpt = safe_load(crashed)
    ckpt['loader'] = None if loader is None else {**ckpt['loader'], 'batches_done': loader}
    bad = tmp_path / 'bad.pth'
    torch.save(ckpt, bad)
    learn = learner(tmp_path / 'other')
    before, loader_before = weights(learn.model), learn.data.train_dl.state_dict()
    with pytest.raises(CheckpointError, match=message):
        learn.fit(3, resume=bad)
    assert same_weights(weights(learn.model), before) and learn.data.train_dl.state_dict() == loader_before
    assert learn.position == Position(0, 0)


def test_avg_stats_restores_its_passes_in_load_state_dict(crashed):
    state = safe_load(crashed)['callbacks']['avg_stats']
    cb = AvgStatsCallback([accuracy])
    cb.load_state_dict(state)
    assert cb.train_stats.count == 3 * BS and cb.train_stats.n_batches == 3 and cb.valid_stats.count == 0
    assert [r['epoch'] for r in cb.history] == [0]
    cb.load_state_dict({'history': []})  # a state written at an epoch boundary: no pass under way
    assert cb.train_stats.count == 0 and cb.train_stats.n_batches == 0 and cb.history == []
