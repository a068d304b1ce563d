"""Exact resume from inside an epoch (issue 16): the resumable sampler/loader, CheckpointCallback every N
batches, `fit(resume=...)` in a fresh process, signals (SIGTERM/SIGINT, a second signal during the save) and
`minilearn train --checkpoint-every N` / `--resume DIR` stopped by a real SIGTERM.

The run under test shuffles, uses dropout, MixUp, label smoothing, one-cycle and a random batch augmentation;
its final weights, optimizer state, loss/lr records and per-epoch statistics must equal an uninterrupted run's
bit for bit on the CPU.
"""
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import minilearn.callbacks.checkpoint as checkpoint
import minilearn.serialization as serialization

from helpers import (batches, free_port, image_data, linear_data, run_two_processes, same_weights, small_cnn,
                     weights)
from minilearn.callback import Order
from minilearn.callbacks.augment import RandomCropPad, RandomFlip
from minilearn.callbacks.checkpoint import CheckpointCallback, TrainingInterrupted
from minilearn.callbacks.distributed import DistributedCallback
from minilearn.callbacks.metrics import AvgStatsCallback, accuracy
from minilearn.callbacks.mixup import CutMix, MixUp, MixUpCutMix
from minilearn.callbacks.precision import GradientAccumulation
from minilearn.callbacks.recorder import Recorder
from minilearn.cli import main
from minilearn.data.core import DataBunch, Dataset, TensorLoader
from minilearn.data.sampler import ResumableLoader
from minilearn.learner import Callback, Learner
from minilearn.losses import LabelSmoothingCrossEntropy
from minilearn.serialization import CheckpointError, safe_load

EPOCHS, N_TRAIN, BS = 3, 80, 16  # 5 training batches per epoch
EVERY = 2
CRASH_AT = (1, 4)  # (epoch, batch): crashes inside batch 4 of epoch 1; the last checkpoint is after batch 2 (n_iter 8)


class FlipJitter(Callback):
    """A random batch augmentation drawing from torch's global generator: sign flips and noise."""
    _order = Order.AUGMENT

    def begin_batch(self):
        if not self.run.in_train: return
        xb = self.run.xb
        flip = (torch.rand(xb.shape[0]) < 0.5).view(-1, *[1] * (xb.ndim - 1))
        self.run.xb = torch.where(flip, -xb, xb) + 0.05 * torch.randn_like(xb)


class Crash(Callback):
    """Dies inside a training batch (after the forward pass), like a kill between checkpoints."""

    def after_pred(self):
        if self.run.in_train and (self.run.epoch, self.run.iter) == CRASH_AT: raise RuntimeError('node lost')


class BatchLog(Callback):
    """The (epoch, batch) of every training batch run."""

    def __init__(self): self.seen = []

    def begin_batch(self):
        if self.run.in_train: self.seen.append((self.run.epoch, self.run.iter))


def build_learner(path, cbs=()):
    data = linear_data(n_train=N_TRAIN, n_valid=24, bs=BS)  # a shuffled ResumableLoader, seed from torch's generator
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    learn = Learner(model, data, LabelSmoothingCrossEntropy(0.1), opt_func=torch.optim.Adam, lr=0.02, path=path,
                    cbs=[MixUp(0.4), FlipJitter(), *cbs], cb_funcs=[partial(AvgStatsCallback, accuracy), Recorder])
    learn.logger = lambda *args: None
    return learn


def train(learn, **kwargs):
    learn.fit_one_cycle(EPOCHS, **kwargs)


def stats(history):
    return [{k: v for k, v in row.items() if k != 'time'} for row in history]


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
    torch.manual_seed(0)
    learn = build_learner(tmp_path_factory.mktemp('straight'))
    train(learn)
    return learn


@pytest.fixture(scope='module')
def crashed(tmp_path_factory):
    path = tmp_path_factory.mktemp('crashed')
    torch.manual_seed(0)
    learn = build_learner(path, cbs=[CheckpointCallback('ckpt', every_n_batches=EVERY, signals=None), Crash()])
    with pytest.raises(RuntimeError, match='node lost'):
        train(learn)
    return path / 'models' / 'ckpt.pth'


def test_the_checkpoint_is_inside_the_epoch(crashed):
    ckpt = safe_load(crashed)
    assert (ckpt['epoch'], ckpt['iter'], ckpt['n_iter'], ckpt['epochs']) == (1, 3, 8, EPOCHS)
    assert (ckpt['loader']['epoch'], ckpt['loader']['batches_done']) == (1, 3)
    partial = ckpt['callbacks']['avg_stats']['partial']
    assert partial['epoch'] == 1 and partial['train']['count'] == 3 * BS
    assert len(partial['train']['pending']) == 3  # this epoch's batches, not summed yet


def test_resume_in_a_fresh_process_is_bit_identical(straight, crashed, tmp_path):
    script = tmp_path / 'resume.py'
    script.write_text(textwrap.dedent(f'''
        import sys
        import torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        torch.set_num_threads(1)  # as in the test process (conftest)
        from test_mid_epoch_resume import BatchLog, build_learner, train
        torch.manual_seed(4321)  # other weights, loader seed and RNG: all of it must come from the checkpoint
        log = BatchLog()
        learn = build_learner(sys.argv[1], cbs=[log])
        train(learn, resume=sys.argv[2])
        torch.save({{'model': learn.model.state_dict(), 'opt': learn.opt.state_dict(),
                    'losses': torch.tensor(learn.recorder.losses), 'lrs': torch.tensor(learn.recorder.lrs),
                    'stats': learn.avg_stats.history, 'seen': torch.tensor(log.seen)}}, sys.argv[3])
    '''))
    out = tmp_path / 'final.pth'
    result = subprocess.run([sys.executable, str(script), str(tmp_path), str(crashed), str(out)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    final = torch.load(out, weights_only=True)
    assert same_weights(final['model'], weights(straight.model))
    for key, value in straight.opt.state_dict()['state'].items():
        for name, tensor in value.items(): assert torch.equal(final['opt']['state'][key][name], tensor)
    assert torch.equal(final['losses'], torch.tensor(straight.recorder.losses))
    assert torch.equal(final['lrs'], torch.tensor(straight.recorder.lrs))
    assert stats(final['stats']) == stats(straight.avg_stats.history) and len(final['stats']) == EPOCHS
    # it started at batch 3 of epoch 1: the batches done were not run again
    seen = [tuple(p) for p in final['seen'].tolist()]
    assert seen[0] == (1, 3) and len(seen) == 2 + 5 and seen[-1] == (2, 4)


def test_resume_in_the_same_process_too(straight, crashed, tmp_path):
    torch.manual_seed(99)
    learn = build_learner(tmp_path)
    assert not same_weights(weights(learn.model), weights(straight.model))
    train(learn, resume=crashed)
    assert same_weights(weights(learn.model), weights(straight.model))
    assert stats(learn.avg_stats.history) == stats(straight.avg_stats.history)
    assert (learn.start_epoch, learn.start_iter) == (1, 3)


def test_starting_that_epoch_from_its_first_batch_would_differ(straight, crashed, tmp_path):
    """The control: weights, optimizer, RNG and loader seed from the checkpoint, but the epoch rerun from batch 0."""
    torch.manual_seed(99)
    learn = build_learner(tmp_path)
    with pytest.warns(UserWarning, match='resume=path'):
        learn.load(crashed)  # a plain load: the loader at epoch 1's first batch
    train(learn, start_epoch=1)
    assert not same_weights(weights(learn.model), weights(straight.model))


def test_a_plain_load_of_a_mid_epoch_checkpoint_puts_the_loader_at_the_start_of_that_epoch(crashed, tmp_path):
    learn = build_learner(tmp_path, cbs=[GradientAccumulation(5)])
    with pytest.warns(UserWarning, match='resume=path'):
        learn.load(crashed)
    assert (learn.data.train_dl.state_dict()['epoch'], learn.data.train_dl.state_dict()['batches_done']) == (1, 0)
    log, steps = BatchLog(), []
    learn.opt.step = lambda *a, step=learn.opt.step, **k: (steps.append(1), step(*a, **k))[1]
    learn.fit(1, cbs=[log])
    assert log.seen == [(0, i) for i in range(N_TRAIN // BS)] and len(steps) == 1  # a whole epoch, its step done


def test_resume_errors_are_clear_and_leave_the_learner_unchanged(crashed, tmp_path):
    learn = build_learner(tmp_path)
    before = weights(learn.model)
    with pytest.raises(ValueError, match='nothing left to train'):
        learn.fit(1, resume=crashed)
    with pytest.raises(ValueError, match='leave start_epoch out'):
        learn.fit(EPOCHS, resume=crashed, start_epoch=1)
    other = build_learner(tmp_path)
    other.data = linear_data(n_train=N_TRAIN + 16, n_valid=24, bs=BS)
    with pytest.raises(CheckpointError, match='n_items=80'):
        other.fit(EPOCHS, resume=crashed)
    plain = build_learner(tmp_path)
    plain.data.train_dl = torch.utils.data.DataLoader(plain.data.train_ds, batch_size=BS, shuffle=True)
    with pytest.raises(CheckpointError, match='cannot start at a batch'):
        plain.fit(EPOCHS, resume=crashed)
    with pytest.raises(ValueError, match='can resume inside an epoch'):
        plain.fit(1, cbs=CheckpointCallback('x', every_n_batches=2, signals=None))
    assert same_weights(weights(learn.model), before) and len(learn.cbs) == len(plain.cbs)


def test_a_resumed_fit_that_fails_before_any_step_leaves_the_learner_as_it_was(crashed, tmp_path):
    class FailsToBegin(Callback):
        def begin_fit(self): raise RuntimeError('no GPU today')

    torch.manual_seed(7)
    learn = build_learner(tmp_path)
    learn.fit(1)  # an optimizer with state of its own
    model_before, opt_before = weights(learn.model), learn.opt.state_dict()
    exp_avg = [s['exp_avg'].clone() for s in opt_before['state'].values()]
    counters, opt = (learn.n_epochs, learn.n_iter), learn.opt
    with pytest.raises(RuntimeError, match='no GPU today'):
        learn.fit(EPOCHS, cbs=[FailsToBegin()], resume=crashed)
    assert same_weights(weights(learn.model), model_before) and learn.opt is opt
    assert all(torch.equal(s['exp_avg'], e) for s, e in zip(learn.opt.state_dict()['state'].values(), exp_avg))
    assert (learn.n_epochs, learn.n_iter) == counters != (1, 8)


def test_with_gradient_accumulation_checkpoints_wait_for_the_step(tmp_path):
    torch.manual_seed(0)
    straight = build_learner(tmp_path / 'straight', cbs=[GradientAccumulation(2)])
    train(straight)
    torch.manual_seed(0)
    ckpt = CheckpointCallback('acc', every_n_batches=1, signals=None)
    crashing = build_learner(tmp_path, cbs=[GradientAccumulation(2), ckpt, Crash()])  # dies inside (1, 4)
    with pytest.raises(RuntimeError, match='node lost'):
        train(crashing)
    state = safe_load(ckpt.path)
    assert (state['epoch'], state['iter']) == (1, 4)  # after the step of batches 2 and 3, not after batch 2
    torch.manual_seed(7)
    resumed = build_learner(tmp_path, cbs=[GradientAccumulation(2)])
    train(resumed, resume=ckpt.path)
    assert same_weights(weights(resumed.model), weights(straight.model))


@pytest.mark.parametrize('mixer', [CutMix, MixUpCutMix])
def test_images_with_cutmix_resume_exactly(tmp_path, mixer):
    def image_learner(cbs=()):
        data = image_data(n_train=96, n_valid=32, size=8, bs=16)  # 6 shuffled batches per epoch
        learn = Learner(small_cnn(), data, LabelSmoothingCrossEntropy(0.1), lr=0.1, path=tmp_path,
                        cbs=[mixer(), FlipJitter(), *cbs], cb_funcs=[partial(AvgStatsCallback, accuracy), Recorder])
        learn.logger = lambda *args: None
        return learn

    torch.manual_seed(0)
    straight = image_learner()
    straight.fit_one_cycle(2)
    torch.manual_seed(0)
    ckpt = CheckpointCallback('img', every_n_batches=4, signals=None)
    crashing = image_learner(cbs=[ckpt, Crash()])  # dies inside (1, 4), after the checkpoint at batch 4 of 12
    with pytest.raises(RuntimeError, match='node lost'):
        crashing.fit_one_cycle(2)
    assert (safe_load(ckpt.path)['epoch'], safe_load(ckpt.path)['iter']) == (1, 2)
    torch.manual_seed(3)
    resumed = image_learner()
    resumed.fit_one_cycle(2, resume=ckpt.path)
    assert same_weights(weights(resumed.model), weights(straight.model))
    assert stats(resumed.avg_stats.history) == stats(straight.avg_stats.history)


def test_from_tensors_with_crop_and_flip_resumes_exactly(tmp_path):
    """The in-memory loader (DataBunch.from_tensors, uint8 images) and its batch augmentations."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (112, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 4, (112,), generator=g)

    def tensor_learner(cbs=()):
        data = DataBunch.from_tensors(x[:96], y[:96], x[96:], y[96:], bs=16, c_out=4)  # seed from torch's generator
        learn = Learner(small_cnn(), data, LabelSmoothingCrossEntropy(0.1), lr=0.1, path=tmp_path,
                        cbs=[RandomCropPad(2), RandomFlip(), MixUp(0.4), *cbs],
                        cb_funcs=[partial(AvgStatsCallback, accuracy), Recorder])
        learn.logger = lambda *args: None
        return learn

    torch.manual_seed(0)
    straight = tensor_learner()
    straight.fit_one_cycle(2)
    torch.manual_seed(0)
    ckpt = CheckpointCallback('tensors', every_n_batches=4, signals=None)
    crashing = tensor_learner(cbs=[ckpt, Crash()])
    with pytest.raises(RuntimeError, match='node lost'):
        crashing.fit_one_cycle(2)
    state = safe_load(ckpt.path)
    assert (state['epoch'], state['iter']) == (1, 2) and state['loader']['batches_done'] == 2
    torch.manual_seed(3)
    resumed = tensor_learner(cbs=[BatchLog()])
    assert resumed.data.train_dl.seed != straight.data.train_dl.seed
    resumed.fit_one_cycle(2, resume=ckpt.path)
    assert same_weights(weights(resumed.model), weights(straight.model))
    assert stats(resumed.avg_stats.history) == stats(straight.avg_stats.history)
    assert resumed.batch_log.seen[0] == (1, 2) and len(resumed.batch_log.seen) == 4


def test_tensor_loader_shards_and_dropped_iterations_keep_the_position():
    x, y = torch.arange(21.).unsqueeze(1), torch.arange(21)
    full = TensorLoader(x, y, bs=3, shuffle=True, seed=2)
    uninterrupted = [[b.tolist() for b, _ in full.shard(r, 2, train=True)] for r in range(2)]
    stopped = full.shard(0, 2, train=True)
    it = iter(stopped)
    next(it)
    restarted = TensorLoader(x, y, bs=3, shuffle=True, seed=9)
    restarted.load_state_dict(stopped.state_dict())
    for r in range(2):  # each rank continues its own share of the epoch
        assert [b.tolist() for b, _ in restarted.shard(r, 2, train=True)] == uninterrupted[r][1:]
    loader = TensorLoader(x, y, bs=3, shuffle=True, seed=2)
    next(iter(loader))  # read partly, then dropped
    assert loader.state_dict()['epoch'] == 1 and loader.state_dict()['batches_done'] == 0


# ---- signals ------------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _sigusr1_ignored():
    """SIGUSR1 stands for SIGTERM here; ignored outside the handlers under test, so a stray one kills nothing."""
    previous = signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGUSR1, previous)


class SignalAt(Callback):
    """Sends `signum` to this process during a training batch (after the forward pass)."""

    def __init__(self, signum, at): self.signum, self.at = signum, at

    def after_pred(self):
        if self.run.in_train and (self.run.epoch, self.run.iter) == self.at: os.kill(os.getpid(), self.signum)


def test_a_signal_finishes_the_batch_writes_the_checkpoint_and_stops(straight, tmp_path):
    torch.manual_seed(0)
    ckpt = CheckpointCallback('ckpt', every_n_batches=None, signals=[signal.SIGUSR1])
    learn = build_learner(tmp_path, cbs=[ckpt, SignalAt(signal.SIGUSR1, (0, 1))])
    loss_func = learn.loss_func
    with pytest.raises(TrainingInterrupted, match=r'SIGUSR1 inside epoch 0 after 2 batch') as info:
        train(learn)
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN  # the previous handler is back
    assert isinstance(info.value, KeyboardInterrupt) and info.value.exit_code == 128 + signal.SIGUSR1
    assert info.value.checkpoint == tmp_path / 'models' / 'ckpt.pth'
    assert learn.loss_func is loss_func and learn.opt.param_groups[0]['lr'] == learn.lr  # after_fit ran
    state = safe_load(info.value.checkpoint)
    assert (state['epoch'], state['iter']) == (0, 2)
    torch.manual_seed(5)
    resumed = build_learner(tmp_path)
    train(resumed, resume=info.value.checkpoint)
    assert same_weights(weights(resumed.model), weights(straight.model))


def test_a_signal_during_validation_stops_at_the_end_of_the_epoch(tmp_path):
    class SignalInValidation(Callback):
        def after_pred(self):
            if not self.run.in_train and self.run.epoch == 0: os.kill(os.getpid(), signal.SIGUSR1)

    ckpt = CheckpointCallback('ckpt', signals=[signal.SIGUSR1])
    learn = build_learner(tmp_path, cbs=[ckpt, SignalInValidation()])
    with pytest.raises(TrainingInterrupted, match='after 1 epoch'):
        train(learn)
    assert len(learn.avg_stats.history) == 1 and safe_load(ckpt.path)['iter'] == 0


def test_with_a_plain_dataloader_a_signal_waits_for_the_epoch_end_and_the_checkpoint_resumes(tmp_path):
    def plain_data():
        data = linear_data(n_train=N_TRAIN, n_valid=24, bs=BS)
        data.train_dl = torch.utils.data.DataLoader(data.train_dl.dataset, batch_size=BS, shuffle=True)
        return data

    def plain_learner(cbs=()):
        learn = build_learner(tmp_path, cbs=cbs)
        learn.data = plain_data()
        return learn

    ckpt = CheckpointCallback('ckpt', signals=[signal.SIGUSR1])
    log = BatchLog()
    learn = plain_learner([ckpt, SignalAt(signal.SIGUSR1, (0, 1)), log])
    with pytest.raises(TrainingInterrupted, match='SIGUSR1 after 1 epoch') as info:
        train(learn)
    assert log.seen == [(0, i) for i in range(N_TRAIN // BS)]  # the whole first epoch ran
    assert safe_load(info.value.checkpoint)['iter'] == 0
    log = BatchLog()
    train(plain_learner([log]), resume=info.value.checkpoint)  # the message's advice works
    assert sorted({epoch for epoch, _ in log.seen}) == list(range(1, EPOCHS))


def test_a_second_signal_during_the_save_aborts_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ckpt = CheckpointCallback('ckpt', every_n_batches=1, signals=[signal.SIGUSR1])
    learn = build_learner(tmp_path, cbs=[ckpt, SignalAt(signal.SIGUSR1, (0, 2))])
    real_save, before = torch.save, []

    def save_interrupted_by_a_second_signal(obj, f):
        before.append(ckpt.path.read_bytes() if ckpt.path.is_file() else None)
        if len(before) == 3:  # the save the first signal asked for, after batch 2
            f.write(b'partial')
            os.kill(os.getpid(), signal.SIGUSR1)  # the handler raises here, in the middle of the write
        real_save(obj, f)

    monkeypatch.setattr(serialization.torch, 'save', save_interrupted_by_a_second_signal)
    with pytest.raises(TrainingInterrupted, match='aborted at once by a second signal') as info:
        train(learn)
    monkeypatch.undo()
    assert len(before) == 3 and info.value.checkpoint == ckpt.path
    assert ckpt.path.read_bytes() == before[-1]  # the checkpoint written after batch 1, intact
    assert safe_load(ckpt.path)['iter'] == 2
    assert [p.name for p in ckpt.path.parent.iterdir()] == ['ckpt.pth']  # no temporary left behind
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_IGN


def test_no_handlers_outside_the_main_thread(tmp_path):
    seen = {}

    class Probe(Callback):
        _order = Order.CHECKPOINT + 1
        def begin_epoch(self): seen['handler'] = signal.getsignal(signal.SIGUSR1)

    learn = build_learner(tmp_path, cbs=[CheckpointCallback('c', signals=[signal.SIGUSR1]), Probe()])
    thread = threading.Thread(target=lambda: learn.fit(1))
    thread.start()
    thread.join()
    assert seen['handler'] == signal.SIG_IGN


# ---- the sampler and loader -----------------------------------------------------------------------------
def test_a_loader_read_partly_before_fitting_gives_whole_epochs(tmp_path):
    """show_batch / channel_stats / summary read a batch or two; the LR finder puts the position back after its
    sweep: neither shortens an epoch of the next fit."""
    learn = build_learner(tmp_path, cbs=[BatchLog()])
    next(iter(learn.data.train_dl))  # a dropped iteration (show_batch itself keeps the position)
    assert learn.data.train_dl.state_dict()['batches_done'] == 0
    learn.lr_find(max_iter=3)
    learn.batch_log.seen = []
    learn.fit(2)
    assert [b for e, b in learn.batch_log.seen] == list(range(5)) * 2


def test_get_dls_shuffles_with_a_resumable_loader_and_validates_in_order():
    x, y = torch.arange(20.).unsqueeze(1), torch.arange(20)
    data = DataBunch.from_datasets(Dataset(x, y), Dataset(x, y), bs=4, seed=5)
    assert isinstance(data.train_dl, ResumableLoader) and data.train_dl.sampler.seed == 5
    assert sum(batches(data.valid_dl), []) == [[float(i)] for i in range(20)]
    g = torch.Generator().manual_seed(0)
    seeded = DataBunch.from_datasets(Dataset(x, y), None, bs=4, generator=g)
    drawn = torch.randint(0, 2 ** 62, (), generator=torch.Generator().manual_seed(0))
    assert seeded.train_dl.sampler.seed == int(drawn)


# ---- DDP: two processes (gloo, forked), each rank resumes its own shard -------------------------------
def _ddp_learner(path, rank, tensors, cbs=()):
    torch.manual_seed(rank)  # each rank its own initial weights (DDP broadcasts rank 0's) and random draws
    learn = build_learner(path, cbs=cbs)
    data = linear_data(n_train=128, n_valid=24, bs=BS)  # 64 items, 4 batches per rank
    if tensors:
        data = DataBunch.from_tensors(data.train_ds.x, data.train_ds.y, data.valid_ds.x, data.valid_ds.y, bs=BS)
    learn.data = data
    return learn


def _ddp_worker(rank, port, out_dir, tensors):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE='2')
    torch.set_num_threads(1)
    dist.init_process_group('gloo')
    path, result = Path(out_dir), {}
    straight = _ddp_learner(path / 'straight', rank, tensors)
    train(straight, cbs=[DistributedCallback()])
    stopper = SignalAt(signal.SIGUSR1, (0, 0)) if rank == 1 else Callback()  # only rank 1 is signalled
    ckpt = CheckpointCallback(path / 'ckpt.pth', every_n_batches=2, signals=[signal.SIGUSR1])
    stopped = _ddp_learner(path, rank, tensors, cbs=[ckpt, stopper])
    try:
        train(stopped, cbs=[DistributedCallback()])
    except TrainingInterrupted as e:
        result['stopped'] = str(e)
    dist.barrier()  # rank 0 has written the checkpoint
    resumed = _ddp_learner(path, 50 + rank, tensors)
    train(resumed, cbs=[DistributedCallback()], resume=path / 'ckpt.pth')
    result.update(same_weights=same_weights(weights(resumed.model), weights(straight.model)),
                  same_stats=stats(resumed.avg_stats.history) == stats(straight.avg_stats.history),
                  same_losses=resumed.recorder.losses == straight.recorder.losses,
                  n_losses=len(straight.recorder.losses), position=(resumed.start_epoch, resumed.start_iter))
    dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f'rank{rank}.pt'))


@pytest.mark.parametrize('tensors', [False, True], ids=['ResumableLoader', 'TensorLoader'])
def test_under_ddp_the_ranks_stop_together_and_resume_their_shards(tmp_path, tensors):
    run_two_processes(_ddp_worker, (free_port(), str(tmp_path), tensors), timeout=180)
    r0, r1 = [torch.load(tmp_path / f'rank{r}.pt', weights_only=False) for r in range(2)]
    for r in (r0, r1):  # rank 1 alone was signalled: both stopped at the next checkpoint batch
        assert 'inside epoch 0 after 2 batch' in r['stopped'] and r['position'] == (0, 2)
        assert r['same_weights'] and r['same_stats'] and r['same_losses'] and r['n_losses'] == 4 * EPOCHS
    assert len(safe_load(tmp_path / 'ckpt.pth')['ranks']) == 2


def test_sigint_is_a_clean_stop_only_without_a_terminal(tmp_path, monkeypatch):
    class Stdin:
        def __init__(self, tty): self.tty = tty
        def isatty(self): return self.tty

    monkeypatch.setattr(checkpoint.sys, 'stdin', Stdin(True))
    assert checkpoint._default_signals() == [signal.SIGTERM]  # at a terminal, Ctrl-C stops at once as usual
    monkeypatch.setattr(checkpoint.sys, 'stdin', Stdin(False))
    assert checkpoint._default_signals() == [signal.SIGTERM, signal.SIGINT]
    handler = signal.getsignal(signal.SIGINT)
    learn = build_learner(tmp_path, cbs=[CheckpointCallback('ckpt'), SignalAt(signal.SIGINT, (1, 2))])
    with pytest.raises(TrainingInterrupted, match='SIGINT inside epoch 1 after 3 batch') as info:
        train(learn)
    assert info.value.exit_code == 130 and signal.getsignal(signal.SIGINT) is handler


def test_signals_accepts_one_signal_and_refuses_others_at_once():
    assert CheckpointCallback(signals=signal.SIGUSR1).signals == [signal.SIGUSR1]
    assert CheckpointCallback(signals=None).signals == [] and CheckpointCallback().signals == 'default'
    for bad in ('SIGTERM', 'sigterm', [signal.SIGTERM, 'x'], 12345, 1.5, True):
        with pytest.raises(ValueError, match=r"signals must be 'default', None, a signal or a list"):
            CheckpointCallback(signals=bad)


# ---- the command line: a real SIGTERM, then --resume, against a run never interrupted ----------------------
CLI_ARGS = ['train', '--n-per-class', '30', '--size', '12', '--bs', '6', '--epochs', '2', '--one-cycle',
            '--mixup', '0.4', '--label-smoothing', '0.1', '--quiet']  # 50 training batches per epoch


def _cli(*args, wait=False):
    """`minilearn ARGS` in a new process; with `wait`, it imports everything first and runs once sent a line."""
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).parents[1]), 'MPLBACKEND': 'Agg'}
    code = ('import sys; from minilearn.cli import main; sys.stdin.readline() if WAIT else None; '
            'sys.exit(main(sys.argv[1:]))')
    return subprocess.Popen([sys.executable, '-c', code.replace('WAIT', str(wait)), *args], env=env,
                            stdin=subprocess.PIPE if wait else subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _history(folder):
    return stats(json.loads((folder / 'metrics.json').read_text())['history'])


def test_cli_stopped_by_sigterm_and_resumed_equals_a_run_never_interrupted(tmp_path):
    stopped, straight = tmp_path / 'stopped', tmp_path / 'straight'
    proc = _cli(*CLI_ARGS, '--out', str(stopped), '--checkpoint-every', '5')
    resumed = _cli('train', '--resume', str(stopped), '--quiet', wait=True)  # a fresh process, started early
    try:
        assert main([*CLI_ARGS, '--out', str(straight)]) == 0  # meanwhile, the reference run in this process
        deadline = time.time() + 240
        while not (stopped / 'checkpoint.pth').is_file():
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, 'no checkpoint written within 240 s'
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    except BaseException:
        resumed.kill()
        raise
    finally:
        if proc.poll() is None: proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert 'stopped by SIGTERM' in err and f'minilearn train --resume {stopped}' in err
    position = safe_load(stopped / 'checkpoint.pth')
    assert position['epoch'] == 0 and position['iter'] > 0  # stopped inside the first epoch
    assert json.loads((stopped / 'run.json').read_text())['checkpoint_every'] == 5
    assert json.loads((stopped / 'metrics.json').read_text())['status'] == 'interrupted'
    out, err = resumed.communicate('go\n', timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    assert same_weights(safe_load(stopped / 'model.pth')['model'], safe_load(straight / 'model.pth')['model'])
    assert _history(stopped) == _history(straight) and len(_history(straight)) == 2
    report = json.loads((stopped / 'metrics.json').read_text())
    assert report['resumed_from'] == {'epoch': 0, 'batch': position['iter']} and report['status'] == 'complete'
    assert not (stopped / 'checkpoint.pth').exists()  # the run is complete: nothing left to resume


def test_cli_resume_refuses_other_options_and_missing_checkpoints(tmp_path, capsys):
    assert main(['train', '--resume', str(tmp_path)]) == 2
    assert 'no checkpoint.pth there' in capsys.readouterr().err
    (tmp_path / 'checkpoint.pth').write_bytes(b'')
    (tmp_path / 'run.json').write_text(json.dumps({'lr': 0.02, 'epochs': 2, 'out': str(tmp_path), 'data': None}))
    assert main(['train', '--resume', str(tmp_path), '--lr', '0.5']) == 2
    assert '--lr differ(s)' in capsys.readouterr().err
    assert main(['train', '--resume', str(tmp_path)]) == 2
    assert 'cannot read checkpoint' in capsys.readouterr().err  # an empty file: one line, no traceback
    assert main(['train', '--out', str(tmp_path), '--checkpoint-every', '3']) == 2
    assert f'continue it with --resume {tmp_path}' in capsys.readouterr().err
