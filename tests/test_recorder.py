"""Recorder: hyper-parameters and losses per batch, the LR-finder suggestion and the plots (issue 5)."""
import io
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import linear_data, mlp

from minilearn.callbacks.recorder import Recorder, smooth_ema, suggest_lr
from minilearn.callbacks.schedule import ParamScheduler, sched_lin
from minilearn.learner import Learner


def test_smooth_ema_matches_a_hand_computation():
    values = [4., 2., 3.]
    beta = 0.5
    # avg1 = 2, avg2 = 0.5*2 + 0.5*2 = 2, avg3 = 0.5*2 + 0.5*3 = 2.5; bias terms 0.5, 0.75, 0.875
    assert smooth_ema(values, beta) == pytest.approx([2 / 0.5, 2 / 0.75, 2.5 / 0.875])
    assert smooth_ema(values, 0.) == values
    with pytest.raises(ValueError, match='beta'):
        smooth_ema(values, 1.)


def test_suggest_lr_is_the_steepest_descent_of_the_curve():
    lrs = list(np.logspace(-5, 0, 41))
    log_lr = np.log10(lrs)
    losses = list(1.5 - np.tanh(3 * (log_lr + 2)))  # steepest fall at lr = 1e-2
    assert suggest_lr(lrs, losses, beta=0.) == pytest.approx(1e-2)
    smoothed = suggest_lr(lrs, losses)  # the default smoothing lags: same region, never outside the sweep
    assert 1e-2 <= smoothed <= 1e-1 and smoothed in lrs


def test_suggest_lr_ignores_non_finite_tail_and_skip_last():
    lrs = [10 ** (-4 + i / 4) for i in range(20)]
    losses = [2.] * 8 + [2. - 0.1 * i for i in range(1, 9)] + [1.5, 5., math.inf, math.nan]
    assert suggest_lr(lrs, losses, beta=0.) in lrs[8:16]
    spiky = losses[:16] + [-100., math.nan, 1., 1.]  # a spurious drop just before the blow-up
    assert suggest_lr(lrs, spiky, beta=0.) == lrs[16]
    assert suggest_lr(lrs, spiky, skip_last=4, beta=0.) in lrs[8:16]
    with pytest.raises(ValueError, match='too few finite losses'):
        suggest_lr(lrs[:4], [1., math.nan, 1., 1.])
    with pytest.raises(ValueError, match='skip_last'):
        suggest_lr(lrs, losses, skip_last=-2)


def _trained(**kwargs):
    learn = Learner(mlp(), linear_data(n_train=64, bs=16), F.cross_entropy, lr=0.05, cbs=[Recorder()],
                    opt_func=torch.optim.AdamW, **kwargs)
    learn.fit(2, cbs=[ParamScheduler('lr', sched_lin(0.01, 0.05))])
    return learn


def test_recorder_records_every_scalar_hyper_parameter_per_group():
    learn = _trained(splitter=lambda m: [m[0].parameters(), m[2].parameters()])
    hypers = learn.recorder.hypers
    assert {'lr', 'weight_decay', 'eps', 'beta1'} <= set(hypers)
    assert all(len(hypers[name]) == 2 and all(len(g) == 8 for g in hypers[name]) for name in hypers)
    assert hypers['lr'][1] == pytest.approx([0.01 + 0.04 * i / 8 for i in range(8)])
    assert hypers['beta1'][0] == [0.9] * 8 and hypers['weight_decay'][1] == [0.01] * 8


def test_plots_render_headless_and_return_their_figure(tmp_path):
    rec = _trained().recorder
    figures = {'lr': rec.plot_lr(), 'beta1': rec.plot_lr('beta1', pgid=0), 'loss': rec.plot_loss(skip_last=2),
               'plot': rec.plot(skip_last=1)}
    assert len(figures['loss'].axes[0].lines[0].get_ydata()) == 6
    assert list(figures['lr'].axes[0].lines[0].get_ydata()) == rec.lrs[0]
    for name, fig in figures.items():
        path = tmp_path / f'{name}.png'
        fig.savefig(path)
        assert path.read_bytes()[:4] == b'\x89PNG' and path.stat().st_size > 1000
    ax = figures['plot'].axes[0]
    assert ax.get_xscale() == 'log'
    assert list(ax.lines[-1].get_xdata()) == [rec.suggest_lr(skip_last=1)]  # the suggestion marked
    with pytest.raises(ValueError, match='skip_last'):
        rec.plot_loss(skip_last=-1)


def test_recorder_errors_before_anything_is_recorded():
    rec = Recorder()
    with pytest.raises(ValueError, match='nothing recorded yet'):
        rec.suggest_lr()
    with pytest.raises(ValueError, match='nothing recorded yet'):
        rec.plot()
    with pytest.raises(ValueError, match="no hyper-parameter 'lr' recorded"):
        rec.plot_lr()


def test_recorder_state_dict_round_trips_through_a_weights_only_load():
    rec = _trained().recorder
    buffer = io.BytesIO()
    torch.save(rec.state_dict(), buffer)
    buffer.seek(0)
    copy = Recorder()
    copy.load_state_dict(torch.load(buffer, weights_only=True))
    assert copy.hypers == rec.hypers and copy.losses == rec.losses
    assert copy.suggest_lr() == rec.suggest_lr()


def test_recorder_joins_loaded_history_with_new_losses_on_another_device():
    from minilearn.callbacks.recorder import Recorder
    rec = Recorder()
    rec.load_state_dict({'hypers': {'lr': [[0.1, 0.1]]}, 'losses': torch.tensor([1.0, 0.5])})
    rec._losses = [torch.tensor(0.25, dtype=torch.float64)]  # this fit's losses (the device in training)
    assert rec.losses == [1.0, 0.5, 0.25]
    state = rec.state_dict()
    assert state['losses'].device.type == 'cpu' and state['losses'].tolist() == [1.0, 0.5, 0.25]
