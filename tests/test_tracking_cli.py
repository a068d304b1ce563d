"""`minilearn train --mlflow` and `minilearn tune` against MLflow's sqlite store and Optuna's (issue 25)."""
import json
import os
import signal
import subprocess
import sys

import optuna
import pytest
from mlflow.tracking import MlflowClient

from minilearn.callback import Callback
from minilearn.cli import main
from minilearn.learner import Learner

TINY = ['--epochs', '2', '--n-per-class', '12', '--bs', '32', '--quiet']


def _metrics(out):
    return json.loads((out / 'metrics.json').read_text())


def _history(uri, run_id, key):
    return sorted((m.step, m.value) for m in MlflowClient(uri).get_metric_history(run_id, key))


@pytest.fixture
def store(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # MLflow's default artifact root (./mlruns) lands in the test's folder
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


def _only_run(uri):
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name('minilearn').experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    return runs[0]


@pytest.mark.slow
def test_train_mlflow_logs_its_arguments_metrics_plots_and_metrics_json(store, tmp_path):
    out = tmp_path / 'run'
    assert main(['train', *TINY, '--mixup', '0.3', '--out', str(out), '--mlflow', store]) == 0
    run, metrics = _only_run(store), _metrics(out)
    assert run.info.status == 'FINISHED' and run.info.run_name == 'run'
    params = run.data.params
    assert params['args.epochs'] == '2' and params['args.mixup'] == '0.3' and params['args.mlflow'] == store
    assert params['MixUp.alpha'] == '0.3' and params['opt_func.weight_decay'] == '0.0005' and params['lr'] == '0.1'
    for key in ('train_loss', 'valid_loss', 'valid_accuracy'):
        assert _history(store, run.info.run_id, key) == [(r['epoch'], pytest.approx(r[key], rel=1e-12))
                                                         for r in metrics['history']]
    artifacts = {a.path for a in MlflowClient(store).list_artifacts(run.info.run_id)}
    assert artifacts == {'loss.png', 'lr.png', 'confusion.png', 'metrics.json'}


class _SigtermAt(Callback):
    def after_batch(self):
        if self.run.in_train and (self.run.epoch, self.run.iter) == (1, 1): os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.slow
def test_train_stopped_by_sigterm_and_resumed_continues_the_same_mlflow_run(store, tmp_path, monkeypatch, capsys):
    out = tmp_path / 'run'
    fit = Learner.fit
    monkeypatch.setattr(Learner, 'fit', lambda learn, *a, cbs=None, **k: fit(learn, *a, cbs=[_SigtermAt()], **k))
    assert main(['train', *TINY, '--checkpoint-every', '2', '--out', str(out), '--mlflow', store]) == 143
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    run = _only_run(store)
    assert run.info.status == 'KILLED' and [s for s, _ in _history(store, run.info.run_id, 'valid_loss')] == [0]
    assert [s for s, _ in _history(store, run.info.run_id, 'train_loss_step')] == [0, 1, 2, 3, 4, 5]
    assert main(['train', '--resume', str(out), '--quiet']) == 0  # --mlflow comes from the run's run.json
    resumed, metrics = _only_run(store), _metrics(out)
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == 'FINISHED'
    assert metrics['resumed_from'] == {'epoch': 1, 'batch': 2}
    for key in ('train_loss', 'valid_loss', 'valid_accuracy'):  # each epoch once
        assert _history(store, run.info.run_id, key) == [(r['epoch'], pytest.approx(r[key], rel=1e-12))
                                                         for r in metrics['history']]
    n_steps = len(_history(store, run.info.run_id, 'lr_group0'))
    assert [s for s, _ in _history(store, run.info.run_id, 'train_loss_step')] == list(range(n_steps))
    assert n_steps == 2 * 4  # 2 epochs of 120 / 32 = 4 batches


@pytest.mark.slow
def test_tune_runs_stores_continues_and_prints_a_command_that_reproduces_the_best(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / 'tune'
    argv = ['tune', '--trials', '3', *TINY[:-1], '--out', str(out)]  # not --quiet: a line per trial
    assert main(argv) == 0
    printed = capsys.readouterr().out
    storage = f"sqlite:///{out / 'optuna.db'}"
    study = optuna.load_study(study_name='minilearn', storage=storage)
    assert len(study.trials) == 3 and printed.count('\ntrial ') == 3
    for trial in study.trials:
        assert trial.state.name in ('COMPLETE', 'PRUNED') and trial.intermediate_values
        assert _metrics(out / f'trial_{trial.number}')['status'] == trial.state.name.lower()  # complete, pruned
        assert 1e-3 <= trial.params['lr'] <= 1 and 1e-6 <= trial.params['wd'] <= 1e-2
    # Run again: the same study goes on
    assert main(['tune', '--trials', '1', *TINY[:-1], '--out', str(out)]) == 0
    printed = capsys.readouterr().out
    assert 'continuing after 3 trial(s)' in printed
    study = optuna.load_study(study_name='minilearn', storage=storage)
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert study.trials[3].params != study.trials[0].params  # a continued study draws new points
    # The printed command reproduces the best trial.
    command = printed.split('reproduce it with: ')[1].strip()
    words = command.split()
    assert words[:2] == ['minilearn', 'train'] and '--lr' in words and '--wd' in words
    assert main(words[1:]) == 0
    best = study.best_trial
    assert _metrics(out / 'best')['final']['valid_accuracy'] == best.value
    untimed = [[{k: v for k, v in row.items() if k != 'time'} for row in _metrics(folder)['history']]
               for folder in (out / 'best', out / f'trial_{best.number}')]
    assert untimed[0] == untimed[1]


# Which heavy modules a command loaded: `tune` mistakes and --help need none; importing minilearn needs no tracker.
FAST_CHILD = r"""
import json, sys
from minilearn.cli import main
code = main(json.loads(sys.argv[1]))
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'optuna', 'mlflow'))
print(json.dumps({'code': code, 'heavy': heavy}))
"""


@pytest.mark.parametrize('argv, message', [
    (['tune', '--help'], None), (['train', '--help'], None),
    (['tune', '--lr', '0.1'], 'tune chooses --lr for each trial'),
    (['tune', '--mixup', '0.2', '--wd', '0.01'], 'tune chooses --wd, --mixup for each trial'),
    (['tune', '--storage', 'study.db'], "expected an Optuna storage URL"),
    (['tune', '--trials', '0'], 'expected a positive integer'),
    (['train', '--wd', '-1'], 'expected a number >= 0'),
])
def test_tune_and_tracking_options_are_checked_before_torch(argv, message):
    result = subprocess.run([sys.executable, '-c', FAST_CHILD, json.dumps(argv)], capture_output=True, text=True,
                            timeout=120)
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {'code': 0 if message is None else 2, 'heavy': []}, result.stderr
    if message is not None: assert message in result.stderr and result.stderr.count('\n') == 1


def test_importing_minilearn_and_its_api_imports_neither_mlflow_nor_optuna():
    code = ("import sys, minilearn; minilearn.Learner, minilearn.MLflowCallback, minilearn.OptunaPruningCallback; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlflow', 'optuna')))")
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip() == '[]', result.stderr
