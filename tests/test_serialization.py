"""Checkpoints: paths, contents, atomic writes, safe loading, refusing what does not fit (issue: reliability)."""
import os
import pickle
import random
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import minilearn.serialization as serialization
from helpers import linear_data, mlp, same_weights, weights
from minilearn.callbacks.metrics import AvgStatsCallback, accuracy
from minilearn.callbacks.recorder import Recorder
from minilearn.learner import Callback, Learner
from minilearn.serialization import CheckpointError, atomic_write, checkpoint_path, safe_load


def make_learner(tmp_path, model=None, opt_func=torch.optim.Adam, cb_funcs=None, **kwargs):
    data = linear_data(n_train=48, n_valid=32, bs=16)
    cb_funcs = [Recorder, partial(AvgStatsCallback, accuracy)] if cb_funcs is None else cb_funcs
    learn = Learner(model or mlp(), data, F.cross_entropy, opt_func=opt_func, lr=0.01, cb_funcs=cb_funcs,
                    path=tmp_path, **kwargs)
    learn.logger = lambda *args: None
    return learn


def snapshot(learn):
    """Everything a failed load must leave unchanged."""
    return {'model': weights(learn.model), 'opt': learn.opt, 'loss_func': learn.loss_func,
            'opt_state': None if learn.opt is None else _opt_tensors(learn.opt),
            'history': [dict(r) for r in learn.avg_stats.history], 'losses': list(learn.recorder.losses),
            'counters': (learn.n_epochs, learn.n_iter)}


def _opt_tensors(opt):
    return [v.clone() for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def assert_unchanged(learn, before):
    after = snapshot(learn)
    assert same_weights(before['model'], after['model'])
    assert after['opt'] is before['opt'] and after['loss_func'] is before['loss_func']
    if before['opt_state'] is not None:
        assert len(before['opt_state']) == len(after['opt_state'])
        assert all(torch.equal(a, b) for a, b in zip(before['opt_state'], after['opt_state']))
    assert after['history'] == before['history'] and after['losses'] == before['losses']
    assert after['counters'] == before['counters']


# ---- paths --------------------------------------------------------------------------------------------
def test_bare_name_goes_to_model_dir_and_paths_are_kept(tmp_path):
    learn = make_learner(tmp_path, model_dir='ckpts')
    assert checkpoint_path(learn, 'stage1') == tmp_path / 'ckpts' / 'stage1.pth'
    assert checkpoint_path(learn, 'stage1.pt') == Path('stage1.pt')
    assert checkpoint_path(learn, tmp_path / 'x' / 'y') == tmp_path / 'x' / 'y'
    assert checkpoint_path(learn, 'sub/name') == Path('sub/name')
    written = learn.save('stage1')
    assert written == tmp_path / 'ckpts' / 'stage1.pth' and written.is_file()
    default = Learner(mlp(), linear_data(), F.cross_entropy)
    assert checkpoint_path(default, 'm') == Path('.') / 'models' / 'm.pth'


# ---- contents and round trip --------------------------------------------------------------------------
def test_checkpoint_holds_plain_state_loadable_with_weights_only(tmp_path):
    learn = make_learner(tmp_path)
    learn.fit(2)
    path = learn.save('ckpt')
    ckpt = torch.load(path, weights_only=True)  # the plain loader accepts it: nothing but tensors and containers
    assert ckpt['epoch'] == 2 and ckpt['n_iter'] == 2 * 3 and ckpt['n_epochs'] == 2.0
    assert ckpt['opt_class'] == 'Adam' and len(ckpt['opt']['state']) == 4
    assert set(ckpt['callbacks']) == {'recorder', 'avg_stats'}
    assert len(ckpt['callbacks']['avg_stats']['history']) == 2
    assert torch.equal(ckpt['callbacks']['recorder']['losses'], torch.tensor(learn.recorder.losses))
    assert set(ckpt['rng']) == {'torch', 'cuda', 'numpy', 'python'}
    assert torch.equal(ckpt['rng']['torch'], torch.get_rng_state())
    assert torch.equal(ckpt['model']['0.weight'], learn.model[0].weight)


def test_save_then_load_restores_everything_into_a_fresh_learner(tmp_path):
    learn = make_learner(tmp_path)
    learn.fit(2)
    np.random.seed(3)
    random.seed(4)
    path = learn.save('ckpt')
    expected_rng = (torch.rand(3), np.random.rand(3), [random.random() for _ in range(3)])
    torch.manual_seed(123)  # fresh learner: other weights, no optimizer yet, other RNG states
    fresh = make_learner(tmp_path)
    assert fresh.opt is None and not same_weights(weights(fresh.model), weights(learn.model))
    fresh.load(path)
    assert same_weights(weights(fresh.model), weights(learn.model))
    assert isinstance(fresh.opt, torch.optim.Adam)
    for p_new, p_old in zip(fresh.model.parameters(), learn.model.parameters()):
        new_state, old_state = fresh.opt.state[p_new], learn.opt.state[p_old]
        assert torch.equal(new_state['exp_avg'], old_state['exp_avg'])
        assert torch.equal(new_state['exp_avg_sq'], old_state['exp_avg_sq'])
    assert fresh.avg_stats.history == learn.avg_stats.history
    assert fresh.recorder.losses == learn.recorder.losses and fresh.recorder.lrs == learn.recorder.lrs
    assert (fresh.n_epochs, fresh.n_iter) == (2.0, 6)
    assert torch.equal(torch.rand(3), expected_rng[0])
    assert np.array_equal(np.random.rand(3), expected_rng[1])
    assert [random.random() for _ in range(3)] == expected_rng[2]


def test_loaded_state_trains_on_like_the_original(tmp_path):
    learn = make_learner(tmp_path, cb_funcs=[])
    learn.fit(1)
    learn.save('ckpt')
    learn.fit(2, start_epoch=1)
    fresh = make_learner(tmp_path, cb_funcs=[])
    fresh.load('ckpt')  # also puts the RNG back where it was at the save: same shuffles
    fresh.fit(2, start_epoch=1)
    assert same_weights(weights(fresh.model), weights(learn.model))


def test_with_opt_false_writes_no_optimizer_and_loading_it_keeps_the_optimizer(tmp_path):
    learn = make_learner(tmp_path)
    learn.fit(1)
    path = learn.save('weights_only', with_opt=False)
    assert torch.load(path, weights_only=True)['opt'] is None
    other = make_learner(tmp_path)
    other.fit(1)
    opt, opt_state = other.opt, _opt_tensors(other.opt)
    with pytest.warns(UserWarning, match='no optimizer state'):
        other.load(path)
    assert other.opt is opt and all(torch.equal(a, b) for a, b in zip(opt_state, _opt_tensors(other.opt)))
    assert same_weights(weights(other.model), weights(learn.model))
    # and with_opt=False on load ignores a saved optimizer without creating one
    full = learn.save('full')
    fresh = make_learner(tmp_path)
    fresh.load(full, with_opt=False)
    assert fresh.opt is None and same_weights(weights(fresh.model), weights(learn.model))


def test_saving_a_wrapped_model_writes_the_bare_keys(tmp_path):
    learn = make_learner(tmp_path, cb_funcs=[])
    bare = learn.model
    learn.model = nn.DataParallel(bare)  # stands for DistributedDataParallel / torch.compile wrappers
    path = learn.save('wrapped')
    assert set(torch.load(path, weights_only=True)['model']) == set(bare.state_dict())
    fresh = make_learner(tmp_path, cb_funcs=[])
    fresh.model = nn.DataParallel(mlp())
    fresh.load(path, with_opt=False)
    assert same_weights(weights(fresh.model.module), weights(bare))


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    learn = make_learner(tmp_path)
    monkeypatch.setattr(serialization, 'is_main_process', lambda: False)
    path = learn.save('ranked')
    assert path == tmp_path / 'models' / 'ranked.pth' and not path.exists()


# ---- atomic writes ------------------------------------------------------------------------------------
def _half_write_then(error):
    real_save = torch.save

    def failing_save(obj, f):
        import io
        buffer = io.BytesIO()
        real_save(obj, buffer)
        data = buffer.getvalue()
        f.write(data[:len(data) // 2])
        raise error
    return failing_save


@pytest.mark.parametrize('error', [OSError(28, 'No space left on device'), KeyboardInterrupt()])
def test_failed_save_leaves_previous_checkpoint_intact_and_no_temp_file(tmp_path, monkeypatch, error):
    learn = make_learner(tmp_path)
    learn.fit(1)
    path = learn.save('ckpt')
    good_bytes = path.read_bytes()
    learn.fit(1)  # the weights move on, the next save fails midway
    monkeypatch.setattr(serialization.torch, 'save', _half_write_then(error))
    with pytest.raises(type(error)) as info:
        learn.save('ckpt')
    if isinstance(error, OSError):  # one error naming the file and the cause
        assert info.value.__cause__ is error and str(path) in str(info.value) and error.strerror in str(info.value)
    else:  # Ctrl-C goes through as it is
        assert info.value is error
    monkeypatch.undo()
    assert path.read_bytes() == good_bytes
    assert sorted(p.name for p in path.parent.iterdir()) == ['ckpt.pth']
    fresh = make_learner(tmp_path)
    fresh.load(path)  # still a complete, loadable checkpoint


def test_temporary_left_by_a_killed_save_is_cleaned_up_by_the_next(tmp_path):
    target = tmp_path / 'ckpt.pth'
    target.write_bytes(b'previous')
    dead_pid = 2 ** 22 + 12345  # above Linux's largest pid: no such process
    stale = tmp_path / f'.ckpt.pth.{dead_pid}.0123abcd.tmp'
    stale.write_bytes(b'half a checkpoint')
    alive = tmp_path / f'.ckpt.pth.{os.getpid()}.89abcdef.tmp'  # a live writer's: kept
    alive.write_bytes(b'in progress')
    other = tmp_path / f'.other.pth.{dead_pid}.0123abcd.tmp'  # another file's: not ours to judge now
    other.write_bytes(b'x')
    assert target.read_bytes() == b'previous'
    atomic_write(target, lambda f: f.write(b'new'))
    assert target.read_bytes() == b'new'
    assert not stale.exists() and alive.exists() and other.exists()


def test_atomic_write_replaces_and_fsyncs(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(serialization.os, 'fsync', lambda fd: synced.append(fd) or real_fsync(fd))
    target = tmp_path / 'new' / 'folder' / 'f.bin'
    atomic_write(target, lambda f: f.write(b'one'))
    atomic_write(target, lambda f: f.write(b'two'))
    assert target.read_bytes() == b'two' and len(synced) >= 2
    assert [p.name for p in target.parent.iterdir()] == ['f.bin']


# ---- safe loading -------------------------------------------------------------------------------------
class _CreatesFile:
    """Unpickling this would create a file: the payload of a malicious checkpoint."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (Path.touch, (Path(self.target),))


@pytest.mark.filterwarnings('ignore:Detected pickle protocol')
@pytest.mark.parametrize('writer', ['torch', 'pickle'])
def test_malicious_pickle_is_refused_and_nothing_in_it_runs(tmp_path, writer):
    target = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pth'
    payload = {'model': _CreatesFile(target)}
    if writer == 'torch': torch.save(payload, evil)
    else: evil.write_bytes(pickle.dumps(payload))
    learn = make_learner(tmp_path)
    learn.fit(1)
    before = snapshot(learn)
    with pytest.raises(CheckpointError) as info:
        learn.load(evil)
    message = str(info.value)
    assert str(evil) in message and 'pickled Python objects' in message and 'arbitrary code' in message
    assert not target.exists()
    assert_unchanged(learn, before)
    pickle.loads(pickle.dumps(_CreatesFile(target)))  # the payload is real: plain unpickling creates the file
    assert target.exists()


def test_truncated_checkpoint_error_names_the_file(tmp_path):
    learn = make_learner(tmp_path)
    learn.fit(1)
    path = learn.save('ckpt')
    data = path.read_bytes()
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(data[:len(data) // 2])
    before = snapshot(learn)
    with pytest.raises(CheckpointError, match='truncated or corrupted') as info:
        learn.load(truncated)
    assert str(truncated) in str(info.value)
    assert_unchanged(learn, before)


@pytest.mark.parametrize('content', [b'', b'\x80\x02garbage' + bytes(range(256)) * 3, b'hello, not a checkpoint'])
def test_corrupted_or_empty_file_error_names_the_file(tmp_path, content):
    learn = make_learner(tmp_path)
    path = tmp_path / 'bad.pth'
    path.write_bytes(content)
    before = snapshot(learn)
    with pytest.raises(CheckpointError) as info:
        learn.load(path)
    assert str(path) in str(info.value) and ('corrupted' in str(info.value))
    assert_unchanged(learn, before)


def test_missing_file_is_named(tmp_path):
    learn = make_learner(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        learn.load('nothing_here')
    assert str(tmp_path / 'models' / 'nothing_here.pth') in str(info.value)
    assert 'does not exist' in str(info.value)  # the models folder is missing too


def test_a_plain_state_dict_is_not_taken_for_a_checkpoint(tmp_path):
    learn = make_learner(tmp_path)
    path = tmp_path / 'sd.pth'
    torch.save(learn.model.state_dict(), path)
    with pytest.raises(CheckpointError, match='not a minilearn checkpoint') as info:
        learn.load(path)
    assert 'load_state_dict' in str(info.value)
    assert safe_load(path).keys() == learn.model.state_dict().keys()


# ---- checkpoints that do not fit ---------------------------------------------------------------------
def test_other_architecture_is_refused_naming_keys_and_learner_unchanged(tmp_path):
    source = make_learner(tmp_path, model=nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 3),
                                                         nn.ReLU(), nn.Linear(3, 3)))
    source.fit(1)
    path = source.save('big')
    learn = make_learner(tmp_path)
    learn.fit(1)
    before = snapshot(learn)
    with pytest.raises(CheckpointError) as info:
        learn.load(path)
    message = str(info.value)
    assert 'unexpected keys' in message and '4.weight' in message and '4.bias' in message
    assert '0.weight: checkpoint (32, 8) vs model (16, 8)' in message
    assert '2.weight: checkpoint (3, 32) vs model (3, 16)' in message
    assert 'unchanged' in message
    assert_unchanged(learn, before)
    smaller = make_learner(tmp_path, model=nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3),
                                                         nn.ReLU(), nn.Linear(3, 3)))
    learn.save('small')
    with pytest.raises(CheckpointError, match=r'missing keys.*4\.weight, 4\.bias'):
        smaller.load('small')


def test_strict_false_loads_matching_keys_but_never_mismatched_shapes(tmp_path):
    learn = make_learner(tmp_path)
    learn.fit(1)
    path = learn.save('ckpt', with_opt=False)
    deeper = make_learner(tmp_path, model=nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3),
                                                        nn.ReLU(), nn.Linear(3, 3)))
    head = weights(deeper.model[4])
    deeper.load(path, strict=False, with_opt=False)
    assert torch.equal(deeper.model[0].weight, learn.model[0].weight)
    assert same_weights(weights(deeper.model[4]), head)
    wider = make_learner(tmp_path, model=mlp(n_hidden=32))
    before = snapshot(wider)
    with pytest.raises(CheckpointError, match='shape mismatches'):
        wider.load(path, strict=False, with_opt=False)
    assert_unchanged(wider, before)


def test_other_optimizer_is_refused_and_learner_unchanged(tmp_path):
    learn = make_learner(tmp_path)
    learn.fit(1)
    path = learn.save('adam')
    sgd = make_learner(tmp_path, opt_func=partial(torch.optim.SGD, momentum=0.9))
    sgd.fit(1)
    before = snapshot(sgd)
    with pytest.raises(CheckpointError, match='Adam optimizer, this learner uses SGD'):
        sgd.load(path)
    assert_unchanged(sgd, before)
    fresh = make_learner(tmp_path, opt_func=torch.optim.SGD)
    with pytest.raises(CheckpointError, match='with_opt=False'):
        fresh.load(path)
    assert fresh.opt is None
    fresh.load(path, with_opt=False)


def test_optimizer_with_other_parameter_groups_is_refused_and_learner_unchanged(tmp_path):
    learn = make_learner(tmp_path)
    learn.fit(1)
    path = learn.save('one_group')
    split = make_learner(tmp_path, splitter=lambda m: [m[0].parameters(), m[2].parameters()])
    split.fit(1)
    before = snapshot(split)
    with pytest.raises(CheckpointError, match='optimizer or callback state'):
        split.load(path)
    assert_unchanged(split, before)


def test_state_of_a_missing_callback_is_skipped_with_a_warning(tmp_path):
    learn = make_learner(tmp_path)
    learn.fit(1)
    path = learn.save('ckpt')
    bare = make_learner(tmp_path, cb_funcs=[Recorder])
    with pytest.warns(UserWarning, match="'avg_stats'.*skipped"):
        bare.load(path)
    assert bare.recorder.losses == learn.recorder.losses


def test_failing_callback_state_rolls_back_optimizer_and_other_callbacks(tmp_path):
    class Fussy(Callback):
        def state_dict(self): return {'x': 1}

        def load_state_dict(self, state): raise KeyError('needs y')

    source = make_learner(tmp_path, cb_funcs=[Recorder, partial(AvgStatsCallback, accuracy), Fussy])
    source.fit(2)
    path = source.save('ckpt')
    learn = make_learner(tmp_path, cb_funcs=[Recorder, partial(AvgStatsCallback, accuracy), Fussy])
    learn.fit(1)
    before = snapshot(learn)
    with pytest.raises(CheckpointError, match='needs y'):
        learn.load(path)
    assert_unchanged(learn, before)
