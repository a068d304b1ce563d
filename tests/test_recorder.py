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


def test_suggest_lr_steep_is_the_steepest_descent_of_the_curve():
    lrs = list(np.logspace(-5, 0, 41))
    log_lr = np.log10(lrs)
    losses = list(1.5 - np.tanh(3 * (log_lr + 2)))  # steepest fall at lr = 1e-2
    assert suggest_lr(lrs, losses, beta=0., method='steep') == pytest.approx(1e-2)
    smoothed = suggest_lr(lrs, losses, method='steep')  # the default smoothing lags: same region, never outside
    assert 1e-2 <= smoothed <= 1e-1 and smoothed in lrs


# A sweep of 51 lrs from 1e-5 to 1: flat loss up to 1e-3, a straight fall (in log lr) to 1e-1, then divergence.
SWEEP_LRS = list(np.logspace(-5, 0, 51))
_i = np.arange(51)
FLAT_FALL_DIVERGE = np.where(_i < 20, 2.0, np.where(_i <= 40, 2.0 - 1.6 * (_i - 20) / 20, 0.4 + 0.5 * (_i - 40) ** 2))


def test_suggest_lr_valley_is_halfway_along_the_fall():
    # Unsmoothed, the longest decreasing run is the fall from 1e-3 to 1e-1: halfway along it (in log lr) is 1e-2.
    assert suggest_lr(SWEEP_LRS, list(FLAT_FALL_DIVERGE), beta=0.) == pytest.approx(1e-2)
    assert suggest_lr(SWEEP_LRS, list(FLAT_FALL_DIVERGE), beta=0., method='valley') == pytest.approx(1e-2)
    for seed in range(5):  # noise on every point, default smoothing: still inside the fall, never on the flat start
        noisy = FLAT_FALL_DIVERGE + np.random.default_rng(seed).normal(0, 0.05, 51)
        assert 1e-3 <= suggest_lr(SWEEP_LRS, list(noisy)) <= 1e-1


# A recorded sweep (the quick-start notebook's: shapes data, the course CNN, Adam, lr 1e-4 -> 1 over 60
# batches) whose start is flat and noisy: steepest descent of the smoothed loss lands there (7.4e-04), while
# the loss falls between 1e-2 and 1e-1.
RECORDED_LRS = [1e-4 * 1e4 ** (i / 60) for i in range(60)]
RECORDED_LOSSES = [
    2.422, 2.4466, 2.4755, 2.4572, 2.55, 2.5594, 2.5456, 2.5224, 2.553, 2.5749, 2.4816, 2.5274, 2.4163, 2.2589,
    2.3247, 2.5541, 2.3952, 2.4738, 2.5247, 2.3716, 2.4315, 2.5666, 2.243, 2.2341, 2.3815, 2.2162, 2.1653, 2.4066,
    2.2058, 2.2937, 2.4103, 2.1963, 2.3416, 2.2248, 2.4197, 2.1598, 2.1786, 2.3033, 2.2864, 2.1757, 2.3017, 2.1826,
    2.0951, 2.266, 2.4865, 2.2497, 2.2583, 2.0387, 2.2154, 2.0746, 2.0971, 2.2327, 1.9912, 2.2277, 2.4366, 2.3784,
    2.5139, 3.0556, 3.903, 7.3367]


def test_suggest_lr_does_not_land_on_the_flat_noisy_start_of_a_real_sweep():
    assert suggest_lr(RECORDED_LRS, RECORDED_LOSSES, method='steep') < 1e-3  # the old rule's answer
    for skip_last in (0, 3, 5):
        assert 5e-3 <= suggest_lr(RECORDED_LRS, RECORDED_LOSSES, skip_last=skip_last) <= 1e-1


def test_suggest_lr_ignores_non_finite_tail_and_skip_last():
    lrs = [10 ** (-4 + i / 4) for i in range(20)]
    losses = [2.] * 8 + [2. - 0.1 * i for i in range(1, 9)] + [1.5, 5., math.inf, math.nan]
    for method in ('valley', 'steep'):
        assert suggest_lr(lrs, losses, beta=0., method=method) in lrs[8:16]
    spiky = losses[:16] + [-100., math.nan, 1., 1.]  # a spurious drop just before the blow-up
    assert suggest_lr(lrs, spiky, beta=0., method='steep') == lrs[16]
    assert suggest_lr(lrs, spiky, skip_last=4, beta=0., method='steep') in lrs[8:16]
    with pytest.raises(ValueError, match='too few finite losses'):
        suggest_lr(lrs[:4], [1., math.nan, 1., 1.])
    with pytest.raises(ValueError, match='skip_last'):
        suggest_lr(lrs, losses, skip_last=-2)
    with pytest.raises(ValueError, match="method must be one of \\('valley', 'steep'\\)"):
        suggest_lr(lrs, losses, method='fastest')


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


def test_plot_loss_draws_the_validation_loss_per_epoch_beside_the_training_loss():
    from minilearn.callbacks.metrics import AvgStatsCallback
    learn = Learner(mlp(), linear_data(n_train=64, n_valid=32, bs=16), F.cross_entropy, lr=0.1,
                    cbs=[AvgStatsCallback(), Recorder()])
    learn.logger = lambda *a: None
    learn.fit(3)
    ax = learn.recorder.plot_loss().axes[0]
    train, valid = ax.lines
    assert len(train.get_ydata()) == 12 and train.get_label() == 'train' and valid.get_label() == 'valid'
    assert list(valid.get_xdata()) == [3, 7, 11]  # the last training batch of each epoch
    expected = [row['valid_loss'] for row in learn.avg_stats.history]
    assert list(valid.get_ydata()) == pytest.approx(expected, rel=1e-6)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ['train', 'valid']
    assert len(learn.recorder.plot_loss(with_valid=False).axes[0].lines) == 1
    # kept through a checkpoint (weights_only), and not drawn for an LR-finder sweep (no validation there)
    buffer = io.BytesIO()
    torch.save(learn.recorder.state_dict(), buffer)
    buffer.seek(0)
    copy = Recorder()
    copy.load_state_dict(torch.load(buffer, weights_only=True))
    assert copy.valid_losses == ([4, 8, 12], pytest.approx(expected, rel=1e-6))
    learn.lr_find(max_iter=8)
    assert learn.recorder.valid_losses == ([], []) and len(learn.recorder.plot_loss().axes[0].lines) == 1


def test_plot_loss_without_validation_statistics_draws_the_training_loss_only():
    rec = _trained().recorder  # no AvgStatsCallback
    assert rec.valid_losses == ([], []) and len(rec.plot_loss().axes[0].lines) == 1
