"""MLflowCallback against MLflow's own sqlite store, read back through `MlflowClient` (issue 25).

One store per module (creating MLflow's tables takes seconds); each test logs to its own experiment, whose
artifacts go to the test's temporary folder.
"""
import os
import re
import signal
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from helpers import free_port, linear_data, mlp, run_two_processes
from minilearn.callbacks.checkpoint import CheckpointCallback, TrainingInterrupted
from minilearn.callbacks.loggers import fit_hyperparameters
from minilearn.callbacks.metrics import AvgStatsCallback, accuracy
from minilearn.callbacks.mixup import MixUp
from minilearn.callbacks.mlflow_logger import MLflowCallback, mlflow_params
from minilearn.callbacks.recorder import Recorder
from minilearn.learner import Callback, Learner
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow  # MLflow's store: seconds to create, a fraction of one per run


@pytest.fixture(scope='module')
def store(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # creates the tables once
    return uri


@pytest.fixture
def experiment(store, tmp_path, request):
    """A new experiment (named after the test) whose artifacts go to tmp_path; returns its name."""
    name = request.node.name
    MlflowClient(store).create_experiment(name, artifact_location=(tmp_path / 'artifacts').as_uri())
    return name


def new_learner(path, cbs=(), epochs_data_seed=0):
    torch.manual_seed(0)
    learn = Learner(mlp(), linear_data(n_train=64, n_valid=32, bs=16, seed=epochs_data_seed), F.cross_entropy,
                    lr=0.1, path=path, cbs=[AvgStatsCallback([accuracy]), Recorder(), *cbs])
    learn.logger = lambda *a: None
    return learn


def runs_of(store, experiment):
    client = MlflowClient(store)
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], order_by=['attributes.start_time ASC'])


def history(store, run_id, key):
    return sorted((m.step, m.value) for m in MlflowClient(store).get_metric_history(run_id, key))


def assert_epochs_logged(store, run_id, rows):
    """Every AvgStats column of every row, once, at step = the row's epoch."""
    for key in [k for k in rows[0] if k != 'epoch']:
        assert history(store, run_id, key) == [(r['epoch'], pytest.approx(r[key], rel=1e-12)) for r in rows], key


class FailAt(Callback):
    def __init__(self, epoch, exc): self.at, self.exc = epoch, exc

    def begin_batch(self):
        if self.run.epoch == self.at and self.run.iter == 1: raise self.exc


def test_a_fit_logs_params_every_epoch_column_per_step_losses_and_finishes(store, experiment, tmp_path):
    learn = new_learner(tmp_path, [MixUp(0.4), MLflowCallback(store, experiment, run_name='first')])
    learn.fit(3)
    (run,) = runs_of(store, experiment)
    assert run.info.status == 'FINISHED' and run.info.run_name == 'first' and run.info.run_id == learn.mlflow.run_id
    params = run.data.params
    assert params['lr'] == '0.1' and params['epochs'] == '3' and params['bs'] == '16'
    assert params['opt_func'] == 'SGD' and params['loss_func'] == 'cross_entropy' and params['model'] == 'Sequential'
    assert params['n_params'] == str(8 * 16 + 16 + 16 * 3 + 3) and params['n_train'] == '64' and params['n_valid'] == '32'
    assert params['MixUp.alpha'] == '0.4' and params['MixUp.per_sample'] == 'True'
    assert 'MixUp' in params['callbacks'] and params['MLflowCallback.experiment'] == experiment
    rows = learn.avg_stats.history
    assert_epochs_logged(store, run.info.run_id, rows)
    assert set(run.data.metrics) >= {'train_loss', 'train_accuracy', 'valid_loss', 'valid_accuracy', 'time'}
    losses = history(store, run.info.run_id, 'train_loss_step')
    assert [s for s, _ in losses] == list(range(12))  # 3 epochs of 4 batches
    assert [v for _, v in losses] == pytest.approx(learn.recorder.losses, rel=1e-6)
    assert [v for _, v in history(store, run.info.run_id, 'lr_group0')] == pytest.approx([0.1] * 12)


def test_two_fits_two_runs(store, experiment, tmp_path):
    learn = new_learner(tmp_path, [MLflowCallback(store, experiment)])
    learn.fit(1)
    first = learn.mlflow.run_id
    learn.fit(2)  # a second fit in the same session: a new run, its own steps from 0
    runs = runs_of(store, experiment)
    assert [r.info.run_id for r in runs] == [first, learn.mlflow.run_id] and first != learn.mlflow.run_id
    assert [r.info.status for r in runs] == ['FINISHED', 'FINISHED']
    assert [s for s, _ in history(store, first, 'valid_loss')] == [0]
    assert_epochs_logged(store, learn.mlflow.run_id, learn.avg_stats.history)


def test_a_failing_fit_is_recorded_failed_and_keeps_its_metrics(store, experiment, tmp_path):
    learn = new_learner(tmp_path, [MLflowCallback(store, experiment)])
    with pytest.raises(RuntimeError, match='disk on fire'):
        learn.fit(3, cbs=FailAt(1, RuntimeError('disk on fire')))
    (run,) = runs_of(store, experiment)
    assert run.info.status == 'FAILED' and 'RuntimeError: disk on fire' in run.data.tags['error']
    assert_epochs_logged(store, run.info.run_id, learn.avg_stats.history)  # epoch 0
    assert [s for s, _ in history(store, run.info.run_id, 'train_loss_step')] == [0, 1, 2, 3, 4]  # + 1 of epoch 1


def test_ctrl_c_is_recorded_killed_and_a_fit_inside_an_except_block_is_not_failed(store, experiment, tmp_path):
    learn = new_learner(tmp_path, [MLflowCallback(store, experiment)])
    with pytest.raises(KeyboardInterrupt):
        learn.fit(2, cbs=FailAt(1, KeyboardInterrupt()))
    try:
        raise ValueError('handled by the caller')
    except ValueError:
        learn.fit(1)  # the exception being handled around fit is not this fit's
    assert [r.info.status for r in runs_of(store, experiment)] == ['KILLED', 'FINISHED']


def test_sigterm_then_resume_continues_the_same_run_with_each_step_once(store, experiment, tmp_path):
    ckpt = tmp_path / 'ckpt.pth'

    class Sigterm(Callback):
        def after_batch(self):
            if self.run.in_train and (self.run.epoch, self.run.iter) == (1, 1): os.kill(os.getpid(), signal.SIGTERM)

    learn = new_learner(tmp_path, [MLflowCallback(store, experiment, log_checkpoints=True),
                                   CheckpointCallback(ckpt, signals=[signal.SIGTERM])])
    with pytest.raises(TrainingInterrupted):
        learn.fit(4, cbs=Sigterm())
    (run,) = runs_of(store, experiment)
    assert run.info.status == 'KILLED' and [s for s, _ in history(store, run.info.run_id, 'valid_loss')] == [0]
    assert [a.path for a in MlflowClient(store).list_artifacts(run.info.run_id)] == ['ckpt.pth']
    # A new learner (a new process, say), told nothing of the run: the checkpoint holds its id.
    resumed = new_learner(tmp_path, [MLflowCallback(store, experiment, log_checkpoints=True),
                                     CheckpointCallback(ckpt, signals=[signal.SIGTERM])])
    with warnings.catch_warnings():
        warnings.filterwarnings('error', message='.*steps never go back')  # no step is logged twice
        resumed.fit(4, resume=ckpt)
    (run,) = runs_of(store, experiment)
    assert run.info.status == 'FINISHED' and run.info.run_id == learn.mlflow.run_id == resumed.mlflow.run_id
    rows = resumed.avg_stats.history
    assert [r['epoch'] for r in rows] == [0, 1, 2, 3]
    assert_epochs_logged(store, run.info.run_id, rows)
    losses = history(store, run.info.run_id, 'train_loss_step')
    assert [s for s, _ in losses] == list(range(16))  # 4 epochs of 4 batches: each step once
    assert [v for _, v in losses] == pytest.approx(resumed.recorder.losses, rel=1e-6)


def test_continuing_a_run_keeps_its_values_and_names_what_it_did_not_log(store, experiment, tmp_path):
    learn = new_learner(tmp_path, [MLflowCallback(store, experiment)])
    learn.fit(2)
    run_id = learn.mlflow.run_id
    before = history(store, run_id, 'valid_loss')
    again = new_learner(tmp_path, [MLflowCallback(store, experiment, run_id=run_id)])
    again.lr = 0.05
    with pytest.warns(UserWarning) as caught:
        again.fit(3)
    messages = ' '.join(str(w.message) for w in caught)
    assert re.search(r'keeps the values it has of epochs, lr \(', messages) and 'valid_loss@0' in messages
    assert MlflowClient(store).get_run(run_id).data.params['lr'] == '0.1'
    assert history(store, run_id, 'valid_loss') == before + [(2, pytest.approx(again.avg_stats.history[2]['valid_loss']))]
    assert len(runs_of(store, experiment)) == 1


def test_an_unknown_run_id_fails_before_training_naming_the_fix(store, experiment, tmp_path):
    learn = new_learner(tmp_path, [MLflowCallback(store, experiment, run_id='0' * 32)])
    before = [p.detach().clone() for p in learn.model.parameters()]
    with pytest.raises(ValueError, match="cannot continue run '0+' .*tracking_uri"):
        learn.fit(1)
    assert all(torch.equal(a, b) for a, b in zip(before, learn.model.parameters()))


def test_long_nested_and_odd_parameters_are_made_acceptable(store, experiment, tmp_path):
    extra = {'notes': 'x' * 7000, 'data': {'source': 'shapes', 'sizes': [1, 2]}, 'odd name: $1': 3}
    learn = new_learner(tmp_path, [MLflowCallback(store, experiment, params=extra)])
    learn.fit(1)
    params = runs_of(store, experiment)[0].data.params
    assert len(params['notes']) == 6000 and params['notes'].endswith('...')
    assert params['data.source'] == 'shapes' and params['data.sizes'] == '[1, 2]' and params['odd name_ _1'] == '3'


def test_mlflow_params_flattens_and_limits():
    assert mlflow_params({'a': {'b': {'c': 1}}, '../x': None}) == {'a.b.c': '1', '_.._x': 'None'}
    assert len(next(iter(mlflow_params({'k' * 300: 1})))) == 250


def test_fit_hyperparameters_of_partials_and_loss_objects(tmp_path):
    from functools import partial
    from minilearn.losses import LabelSmoothingCrossEntropy
    learn = Learner(mlp(), linear_data(n_train=32, n_valid=16), LabelSmoothingCrossEntropy(0.2),
                    opt_func=partial(torch.optim.SGD, momentum=0.9, weight_decay=5e-4), lr=0.3, cbs=[MixUp(0.2)])
    learn.epochs = 5
    params = fit_hyperparameters(learn)
    assert params['opt_func'] == 'SGD' and params['opt_func.momentum'] == 0.9 and params['opt_func.weight_decay'] == 5e-4
    assert params['loss_func'] == 'LabelSmoothingCrossEntropy' and params['loss_func.eps'] == 0.2
    assert params['lr'] == 0.3 and params['epochs'] == 5 and params['MixUp.alpha'] == 0.2


def test_missing_mlflow_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, 'mlflow.tracking', None)
    with pytest.raises(ImportError, match=r"minilearn\[mlflow\]"):
        MLflowCallback()


# ---- distributed: rank 0 alone logs -----------------------------------------------------------------------
def _worker(rank, port, store, experiment, out_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE='2')
    torch.set_num_threads(1)
    learn = new_learner(out_dir, [MLflowCallback(store, experiment)])
    with learn.distrib_ctx():
        learn.fit(2)
    if dist.is_initialized(): dist.destroy_process_group()
    torch.save({'run_id': learn.mlflow.run_id, 'history': learn.avg_stats.history},
               os.path.join(out_dir, f'rank{rank}.pt'))


def test_only_rank_0_logs_under_ddp(store, experiment, tmp_path):
    torch.optim.SGD(mlp().parameters(), lr=0.1)  # imports the optimizer machinery once, before forking
    run_two_processes(_worker, (free_port(), store, experiment, str(tmp_path)), timeout=180)
    results = [torch.load(tmp_path / f'rank{r}.pt', weights_only=False) for r in range(2)]
    (run,) = runs_of(store, experiment)
    assert results[0]['run_id'] == run.info.run_id and results[1]['run_id'] is None
    assert run.info.status == 'FINISHED'
    assert_epochs_logged(store, run.info.run_id, results[0]['history'])
