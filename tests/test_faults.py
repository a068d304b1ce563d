"""Faults a run survives: a resume ends exactly like the uninterrupted fit (hyper-parameters included), corrupt
checkpoints are detected and the previous one is kept, `resume='auto'`, and a full disk during a checkpoint."""
import errno
import json
import os
import subprocess
import sys
import textwrap
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import nn

from helpers import linear_data, same_weights, weights
from minilearn.callbacks.checkpoint import CheckpointCallback
from minilearn.callbacks.metrics import AvgStatsCallback, accuracy
from minilearn.callbacks.recorder import Recorder
from minilearn.callbacks.schedule import ParamScheduler, sched_cos, sched_lin
from minilearn.learner import Callback, Learner
from minilearn.serialization import CheckpointError, CorruptCheckpointError, read_checkpoint, safe_load

EPOCHS, BS, N_TRAIN = 3, 8, 48  # 6 training batches per epoch


class Crash(Callback):
    """Dies inside a training batch of epoch 1, after the checkpoint of batch 4 of it."""

    def after_pred(self):
        if self.run.in_train and (self.run.epoch, self.run.iter) == (1, 4): raise RuntimeError('node lost')


def build_learner(path, opt_func, cbs=()):
    torch.manual_seed(0)
    data = linear_data(n_train=N_TRAIN, n_valid=16, bs=BS)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))
    learn = Learner(model, data, nn.CrossEntropyLoss(), opt_func=opt_func, lr=0.1, path=path, cbs=list(cbs),
                    cb_funcs=[partial(AvgStatsCallback, accuracy), Recorder])
    learn.logger = lambda *args: None
    return learn


def one_cycle(learn, **kwargs):
    learn.fit_one_cycle(EPOCHS, **kwargs)


def mom_and_wd(learn, **kwargs):
    learn.fit(EPOCHS, cbs=[ParamScheduler('mom', sched_cos(0.95, 0.8)),
                           ParamScheduler('weight_decay', sched_lin(1e-2, 1e-4))], **kwargs)


def callback_states(learn):
    return {cb.name: cb.state_dict() for cb in learn.cbs if cb.state_dict() is not None}


def same_tree(a, b):
    """Equal containers whose tensors are equal bit for bit."""
    if isinstance(a, torch.Tensor): return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tree(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)): return type(a) is type(b) and len(a) == len(b) and all(map(same_tree, a, b))
    return a == b or (a != a and b != b)  # NaN == NaN here


def without_time(state):
    if isinstance(state, dict): return {k: without_time(v) for k, v in state.items() if k != 'time'}
    if isinstance(state, list): return [without_time(v) for v in state]
    return state


@pytest.mark.parametrize('schedule, opt_func', [
    (one_cycle, torch.optim.SGD),  # momentum 0 to start with: one-cycle turns it on, after_fit puts 0 back
    (one_cycle, partial(torch.optim.Adam, betas=(0.9, 0.99))),
    (mom_and_wd, partial(torch.optim.SGD, momentum=0.9, weight_decay=5e-4)),
], ids=['one-cycle-SGD', 'one-cycle-Adam', 'momentum-and-weight-decay'])
def test_a_resumed_fit_ends_exactly_like_the_uninterrupted_one(tmp_path, schedule, opt_func):
    straight = build_learner(tmp_path / 'straight', opt_func)
    schedule(straight)
    started = straight.start_hypers
    assert [g['lr'] for g in straight.opt.param_groups] == [0.1]  # what the fit started with, put back
    crashed = build_learner(tmp_path / 'crashed', opt_func, cbs=[CheckpointCallback('ckpt', every_n_batches=2),
                                                                   Crash()])
    with pytest.raises(RuntimeError, match='node lost'):
        schedule(crashed)
    ckpt = crashed.path / 'models' / 'ckpt.pth'
    written = safe_load(ckpt)
    assert (written['epoch'], written['iter']) == (1, 4)
    assert same_tree(written['start_hypers'], started)  # the checkpoint records what the fit started with
    mid = written['opt']['param_groups'][0]
    assert any(mid[k] != started[0][k] for k in ('lr', 'momentum', 'betas', 'weight_decay') if k in mid)

    torch.manual_seed(1234)
    resumed = build_learner(tmp_path / 'crashed', opt_func)
    schedule(resumed, resume=ckpt)
    assert (resumed.position.epoch, resumed.position.batches_done) == (1, 4)
    assert same_weights(weights(resumed.model), weights(straight.model))
    assert same_tree(resumed.opt.state_dict(), straight.opt.state_dict())  # state and hyper-parameters
    assert same_tree(resumed.start_hypers, straight.start_hypers)
    assert same_tree(without_time(callback_states(resumed)), without_time(callback_states(straight)))
    assert resumed.recorder.hypers == straight.recorder.hypers
    resumed.save(tmp_path / 'resumed.pth')
    straight.save(tmp_path / 'straight.pth')
    a, b = safe_load(tmp_path / 'resumed.pth'), safe_load(tmp_path / 'straight.pth')
    for key in ('model', 'opt', 'start_hypers', 'epoch', 'iter', 'n_iter', 'n_epochs', 'loader', 'rng'):
        assert same_tree(a[key], b[key]), key
    # and anything trained afterwards trains alike: the LR finder's sweep from the learners as they stand
    assert resumed.lr_find(max_iter=8) == straight.lr_find(max_iter=8)
    assert resumed.recorder.losses == straight.recorder.losses
    assert same_tree(resumed.opt.state_dict(), straight.opt.state_dict())


# ---- corrupt checkpoints ---------------------------------------------------------------------------------------
def saved_learner(tmp_path):
    learn = build_learner(tmp_path, torch.optim.SGD)
    learn.fit(1)
    return learn, learn.save(tmp_path / 'ckpt.pth')


def flip_a_weight_bit(path, tensor):
    """Flip one bit inside `tensor`'s bytes where the file stores them (the zip holds them uncompressed)."""
    data = bytearray(path.read_bytes())
    at = data.find(tensor.detach().contiguous().numpy().tobytes())
    assert at > 0
    data[at + 5] ^= 0x10
    path.write_bytes(bytes(data))


def test_torch_alone_loads_a_flipped_bit_silently(tmp_path):
    learn, path = saved_learner(tmp_path)
    flip_a_weight_bit(path, learn.model[0].weight)
    loaded = torch.load(path, weights_only=True)  # no error: the zip has no check on tensor data
    assert not torch.equal(loaded['model']['0.weight'], learn.model[0].weight)


@pytest.mark.parametrize('damage', ['flipped bit', 'truncated'])
def test_a_corrupt_checkpoint_is_one_error_naming_the_file_and_the_learner_is_unchanged(tmp_path, damage):
    learn, path = saved_learner(tmp_path)
    if damage == 'flipped bit': flip_a_weight_bit(path, learn.model[0].weight)
    else: path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    other = build_learner(tmp_path, torch.optim.SGD)
    other.fit(1, cbs=[ParamScheduler('lr', sched_lin(0.05, 0.01))])
    before, opt_before = weights(other.model), other.opt.state_dict()
    for attempt in (lambda: other.load(path), lambda: other.fit(2, resume=path), lambda: read_checkpoint(path)):
        with pytest.raises(CorruptCheckpointError, match='is corrupt') as info:
            attempt()
        assert str(path) in str(info.value)
        assert same_weights(weights(other.model), before) and same_tree(other.opt.state_dict(), opt_before)


def test_keep_keeps_the_previous_checkpoints_and_nothing_else(tmp_path):
    learn = build_learner(tmp_path, torch.optim.SGD, cbs=[CheckpointCallback('ckpt', every_n_batches=2, keep=3)])
    learn.fit(2)
    folder = tmp_path / 'models'
    assert sorted(p.name for p in folder.iterdir()) == ['ckpt.1.pth', 'ckpt.2.pth', 'ckpt.pth']
    # written after batches 2, 4 of epoch 1, then at its end: newest first
    assert [safe_load(folder / n)['n_iter'] for n in ('ckpt.pth', 'ckpt.1.pth', 'ckpt.2.pth')] == [12, 10, 8]
    with pytest.raises(ValueError, match='keep must be a positive int'):
        CheckpointCallback(keep=0)


# ---- resume='auto' -----------------------------------------------------------------------------------------
def test_resume_auto_starts_from_scratch_then_resumes_and_falls_back_past_a_corrupt_checkpoint(tmp_path):
    straight = build_learner(tmp_path / 'straight', torch.optim.SGD)
    one_cycle(straight)
    # first start: no checkpoint yet, the same call trains from scratch
    ckpt = partial(CheckpointCallback, 'ckpt', every_n_batches=2, keep=2)
    first = build_learner(tmp_path / 'auto', torch.optim.SGD, cbs=[ckpt(), Crash()])
    with pytest.raises(RuntimeError, match='node lost'):
        one_cycle(first, resume='auto')
    folder = tmp_path / 'auto' / 'models'
    assert [safe_load(folder / n)['iter'] for n in ('ckpt.pth', 'ckpt.1.pth')] == [4, 2]
    flip_a_weight_bit(folder / 'ckpt.pth', safe_load(folder / 'ckpt.pth')['model']['0.weight'])
    # the restart: the newest is corrupt, so it continues from the one before, with a warning naming both
    torch.manual_seed(99)
    restarted = build_learner(tmp_path / 'auto', torch.optim.SGD, cbs=[ckpt()])
    expected = r"ckpt\.pth' is corrupt.*resuming from the previous checkpoint .*ckpt\.1\.pth"
    with pytest.warns(UserWarning, match=expected):
        one_cycle(restarted, resume='auto')
    assert (restarted.position.epoch, restarted.position.batches_done) == (1, 2)
    assert same_weights(weights(restarted.model), weights(straight.model))
    assert same_tree(restarted.opt.state_dict(), straight.opt.state_dict())
    # a restart after the end: the last checkpoint loads, nothing is left to train
    again = build_learner(tmp_path / 'auto', torch.optim.SGD, cbs=[ckpt()])
    one_cycle(again, resume='auto')
    assert again.position.epoch == EPOCHS and same_weights(weights(again.model), weights(straight.model))
    assert again.recorder.losses == straight.recorder.losses and again.n_iter == EPOCHS * N_TRAIN // BS
    with pytest.raises(ValueError, match='nothing left to train'):  # an explicit resume of it is refused as before
        build_learner(tmp_path / 'auto', torch.optim.SGD).fit(EPOCHS, resume=folder / 'ckpt.pth')


def test_resume_auto_needs_a_checkpoint_callback_and_an_intact_file(tmp_path):
    learn = build_learner(tmp_path, torch.optim.SGD)
    with pytest.raises(ValueError, match=r"resume='auto'.*attach one"):
        learn.fit(1, resume='auto')
    learn.add_cb(CheckpointCallback('ckpt', keep=2))
    learn.fit(2)
    for name in ('ckpt.pth', 'ckpt.1.pth'):
        path = tmp_path / 'models' / name
        path.write_bytes(path.read_bytes()[:100])
    before = weights(learn.model)
    with pytest.raises(CorruptCheckpointError, match='no intact checkpoint to resume from'):
        learn.fit(3, resume='auto')
    assert same_weights(weights(learn.model), before)


# ---- a full disk during a checkpoint -------------------------------------------------------------------------
DISK_FULL = '''
import json, os, resource, signal, sys
import torch
sys.path.insert(0, {tests!r})
from test_faults import build_learner
from minilearn.callbacks.checkpoint import CheckpointCallback
from minilearn.learner import Callback
from minilearn.serialization import safe_load

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so that a write past the limit raises EFBIG instead of killing
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)

class DiskFills(Callback):
    """From the 4th training batch on, no file may grow past 2000 bytes (a checkpoint is larger)."""
    def begin_batch(self):
        if self.run.in_train and self.run.n_iter == 3: resource.setrlimit(resource.RLIMIT_FSIZE, (2000, hard))

handler = signal.getsignal(signal.SIGTERM)
learn = build_learner({path!r}, torch.optim.SGD, cbs=[CheckpointCallback('ckpt', every_n_batches=2), DiskFills()])
try:
    learn.fit_one_cycle(2)
    error = None
except Exception as e:
    error = e
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
folder = learn.path / 'models'
print(json.dumps({{'type': type(error).__name__, 'errno': getattr(error, 'errno', None), 'message': str(error),
                  'files': sorted(os.listdir(folder)), 'n_iter': safe_load(folder / 'ckpt.pth')['n_iter'],
                  'lr': [g['lr'] for g in learn.opt.param_groups], 'momentum': learn.opt.param_groups[0]['momentum'],
                  'callbacks': [type(cb).__name__ for cb in learn.cbs], 'handler': signal.getsignal(signal.SIGTERM) == handler}}))
'''


@pytest.mark.skipif(sys.platform == 'win32', reason='file-size limits (RLIMIT_FSIZE) are POSIX')
def test_a_full_disk_during_a_checkpoint_stops_with_one_clear_error_and_keeps_the_previous(tmp_path):
    script = DISK_FULL.format(tests=str(Path(__file__).parent), path=str(tmp_path))
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    path = tmp_path / 'models' / 'ckpt.pth'
    assert result['type'] == 'OSError' and result['errno'] == errno.EFBIG
    assert f"could not write {str(path)!r}: File too large (the file exceeds the file-size limit" in result['message']
    assert result['files'] == ['ckpt.pth'] and result['n_iter'] == 2  # the previous checkpoint, no temporary file
    learn = build_learner(tmp_path, torch.optim.SGD)
    learn.fit_one_cycle(2, resume=path)  # it loads, and the run continues from it
    assert (learn.position.epoch, learn.position.batches_done) == (0, 2)
    # after_fit restored the learner: the rates the fit started with, its callbacks and the signal handler
    assert result['lr'] == [0.1] and result['momentum'] == 0 and result['handler']
    assert result['callbacks'] == ['TrainEvalCallback', 'CheckpointCallback', 'DiskFills', 'AvgStatsCallback',
                                   'Recorder']


# ---- the command line: killed outright (SIGKILL), the same command again, against a run never interrupted ----------
CLI_ARGS = ['train', '--n-per-class', '30', '--size', '12', '--bs', '6', '--epochs', '2', '--quiet']  # 50 batches/epoch


@pytest.mark.slow
def test_cli_killed_and_rerun_with_resume_if_exists_ends_with_the_same_model_pth(tmp_path):
    import signal
    import time
    from minilearn.cli import main
    killed, straight = tmp_path / 'killed', tmp_path / 'straight'
    command = [*CLI_ARGS, '--out', str(killed), '--checkpoint-every', '7', '--resume-if-exists']
    env = {**os.environ, 'PYTHONPATH': str(Path(__file__).parents[1]), 'MPLBACKEND': 'Agg'}
    proc = subprocess.Popen([sys.executable, '-m', 'minilearn', *command], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert main([*CLI_ARGS, '--out', str(straight)]) == 0  # meanwhile, the reference run in this process
        deadline = time.time() + 240
        while not (killed / 'checkpoint.1.pth').is_file():  # two checkpoints written
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.time() < deadline, 'no checkpoint written within 240 s'
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)  # no handler, no last checkpoint: a node lost
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None: proc.kill()
    assert json.loads((killed / 'metrics.json').read_text())['status'] == 'running'  # it never knew
    written = safe_load(killed / 'checkpoint.pth')
    assert written['epoch'] < 2
    assert main(command) == 0  # the same command: it continues from the checkpoint
    report = json.loads((killed / 'metrics.json').read_text())
    assert report['status'] == 'complete' and report['resumed_from'] == {'epoch': written['epoch'],
                                                                         'batch': written['iter']}
    a, b = safe_load(killed / 'model.pth'), safe_load(straight / 'model.pth')
    for key in ('model', 'opt', 'start_hypers', 'callbacks', 'epoch', 'iter', 'n_iter'):
        assert same_tree(without_time(a[key]), without_time(b[key])), key
    assert torch.equal(a['rng']['torch'], b['rng']['torch'])  # (the job never seeds numpy's or python's generator)
    assert (a['opt']['param_groups'][0]['lr'], a['opt']['param_groups'][0]['momentum']) == (0.1, 0.9)
    assert not any(p.name.startswith('checkpoint') for p in killed.iterdir())  # complete: nothing left to resume


def test_cli_resume_if_exists_needs_checkpoint_every_and_no_resume(tmp_path, capsys):
    from minilearn.cli import main
    assert main(['train', '--out', str(tmp_path), '--resume-if-exists']) == 2
    assert '--resume-if-exists needs --checkpoint-every N' in capsys.readouterr().err
    assert main(['train', '--resume', str(tmp_path), '--checkpoint-every', '3', '--resume-if-exists']) == 2
    assert 'leave --resume out' in capsys.readouterr().err
