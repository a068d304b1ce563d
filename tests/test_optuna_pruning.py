"""OptunaPruningCallback inside real Optuna studies: what the study records (issue 25)."""
import sys

import optuna
import pytest
import torch
import torch.nn.functional as F

from helpers import linear_data, mlp
from minilearn.callbacks.metrics import AvgStatsCallback, accuracy
from minilearn.callbacks.optuna_pruning import OptunaPruningCallback
from minilearn.callbacks.recorder import Recorder
from minilearn.learner import Learner

optuna.logging.set_verbosity(optuna.logging.WARNING)


class AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial):
        return True


def run_study(pruner, epochs=3, monitor='valid_loss'):
    learners = []

    def objective(trial):
        torch.manual_seed(0)
        learn = Learner(mlp(), linear_data(n_train=64, n_valid=32), F.cross_entropy, lr=trial.suggest_float('lr', 0.05, 0.1),
                        cbs=[AvgStatsCallback([accuracy]), Recorder()])
        learn.logger = lambda *a: None
        learners.append(learn)
        learn.fit(epochs, cbs=[OptunaPruningCallback(trial, monitor)])
        return learn.avg_stats.history[-1][monitor]

    study = optuna.create_study(pruner=pruner)
    study.optimize(objective, n_trials=1)
    return study.trials[0], learners[0]


def test_a_pruner_that_always_prunes_stops_after_one_epoch_and_the_trial_is_pruned():
    trial, learn = run_study(AlwaysPrune())
    assert trial.state == optuna.trial.TrialState.PRUNED
    history = learn.avg_stats.history
    assert len(history) == 1 and trial.intermediate_values == {0: history[0]['valid_loss']}
    # the fit was stopped the learner's way: its callbacks' after_fit ran, the fit's own callback is gone
    assert learn.find_cb(OptunaPruningCallback) is None and len(learn.recorder.losses) == 4
    assert learn.opt is not None and learn.n_iter == 4


def test_a_study_that_never_prunes_completes_with_one_value_per_epoch():
    trial, learn = run_study(optuna.pruners.NopPruner(), epochs=3, monitor='valid_accuracy')
    assert trial.state == optuna.trial.TrialState.COMPLETE
    history = learn.avg_stats.history
    assert trial.intermediate_values == {r['epoch']: r['valid_accuracy'] for r in history} and len(history) == 3
    assert trial.value == history[-1]['valid_accuracy']


def test_the_median_pruner_prunes_a_trial_worse_than_the_others():
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0))
    lrs = iter([0.1, 0.1, 1e-6])  # the third learns nothing: its loss stays above the median from epoch 0

    def objective(trial):
        torch.manual_seed(0)
        learn = Learner(mlp(), linear_data(n_train=64, n_valid=32), F.cross_entropy, lr=next(lrs),
                        cbs=[AvgStatsCallback()])
        learn.logger = lambda *a: None
        learn.fit(3, cbs=[OptunaPruningCallback(trial)])
        return learn.avg_stats.history[-1]['valid_loss']

    study.optimize(objective, n_trials=3)
    states = [t.state.name for t in study.trials]
    assert states[:2] == ['COMPLETE', 'COMPLETE'] and states[2] == 'PRUNED'
    assert len(study.trials[2].intermediate_values) < 3


def test_a_wrong_monitor_is_refused_before_any_step_naming_the_columns():
    trial = optuna.trial.FixedTrial({})
    learn = Learner(mlp(), linear_data(n_train=32, n_valid=16), F.cross_entropy, cbs=[AvgStatsCallback([accuracy])])
    learn.logger = lambda *a: None
    with pytest.raises(ValueError, match="unknown monitor 'valid_acc'.*valid_accuracy"):
        learn.fit(1, cbs=[OptunaPruningCallback(trial, 'valid_acc')])
    assert learn.n_iter == 0


def test_not_a_trial_and_missing_optuna_are_named(monkeypatch):
    with pytest.raises(TypeError, match='optuna Trial'):
        OptunaPruningCallback(object())
    monkeypatch.setitem(sys.modules, 'optuna', None)
    with pytest.raises(ImportError, match=r"minilearn\[optuna\]"):
        OptunaPruningCallback(object())
