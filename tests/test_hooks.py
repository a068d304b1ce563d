"""Hooks and the ActivationStats telemetry callback (issue 5)."""
import pytest
import torch
import torch.nn.functional as F
from helpers import image_data, linear_data, small_cnn
from torch import nn

from minilearn.callbacks.hooks import ActivationStats, Hook, Hooks
from minilearn.learner import Callback, Learner


def no_hooks(model):
    return all(not m._forward_hooks and not m._backward_hooks for m in model.modules())


def test_hook_and_hooks_call_the_function_and_remove_themselves():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    seen = []

    def record(hook, module, inputs, output): seen.append((hook, type(module).__name__, tuple(output.shape)))

    with Hooks(model, record) as hooks:
        assert len(hooks) == 3 and all(isinstance(h, Hook) for h in hooks)
        model(torch.randn(5, 4))
        assert [s[1:] for s in seen] == [('Linear', (5, 3)), ('ReLU', (5, 3)), ('Linear', (5, 2))]
        assert [s[0] for s in seen] == list(hooks)
        del hooks[1]
        assert len(hooks) == 2 and not model[1]._forward_hooks
    assert no_hooks(model)
    with Hook(model[0], record):
        model(torch.randn(1, 4))
    assert no_hooks(model) and len(seen) == 4

    grads = []
    with Hook(model[2], lambda hook, m, grad_in, grad_out: grads.append(grad_out[0].shape), is_forward=False):
        model(torch.randn(5, 4)).sum().backward()
    assert grads == [(5, 2)] and no_hooks(model)


def _tiny_learner(**kwargs):
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    return Learner(model, linear_data(n_train=48, bs=16), F.cross_entropy, lr=0.1, **kwargs)


def test_activation_stats_match_a_hand_computation():
    learn = _tiny_learner(cbs=[ActivationStats(n_bins=5, hist_range=(0., 1.))])
    expected = []

    class Reference(Callback):  # recompute the first layers by hand, with the weights used by the forward
        def begin_batch(self):
            if not self.in_train: return
            lin = self.model[0]
            x = F.relu(self.xb @ lin.weight.detach().T + lin.bias.detach())
            expected.append((x.mean(), x.std(), [((x >= i / 5) & (x < (i + 1) / 5)).sum() for i in range(5)]))

    learn.fit(2, cbs=[Reference()])
    stats = learn.activation_stats
    assert stats.means.shape == (3, 6) and stats.hists.shape == (3, 5, 6)  # 3 layers, 6 training batches
    relu_means, relu_stds, relu_hists = stats.means[1], stats.stds[1], stats.hists[1]
    for i, (mean, std, counts) in enumerate(expected):
        assert relu_means[i] == pytest.approx(mean.item(), abs=1e-6)
        assert relu_stds[i] == pytest.approx(std.item(), abs=1e-6)
        assert relu_hists[:, i].tolist() == pytest.approx([float(c) for c in counts], abs=1)  # bin edges
        assert relu_hists[:, i].sum() == sum(counts)
    fraction = relu_hists[:2].sum(0) / relu_hists.sum(0)
    assert torch.allclose(stats.near_zero(2)[1], fraction)
    assert no_hooks(learn.model)


def test_activation_stats_keep_statistics_on_the_device_during_training():
    learn = _tiny_learner(cbs=[ActivationStats()])
    learn.fit(1)
    rows = learn.activation_stats._rows
    assert len(rows) == 3 and all(isinstance(t, torch.Tensor) and t.shape == (42,) for layer in rows for t in layer)
    assert len(rows[0]) == 3  # training batches only


def test_hooks_are_removed_after_fit_and_after_an_exception():
    learn = Learner(small_cnn(), image_data(n_train=64, n_valid=32), F.cross_entropy, cbs=[ActivationStats()])
    learn.fit(1)
    assert no_hooks(learn.model)

    class Boom(Callback):
        def after_loss(self):
            if self.iter == 1: raise RuntimeError('boom')

    seen_hooks = []

    class Spy(Callback):
        def begin_batch(self): seen_hooks.append(sum(len(m._forward_hooks) for m in self.model.modules()))

    with pytest.raises(RuntimeError, match='boom'):
        learn.fit(1, cbs=[Boom(), Spy()])
    assert seen_hooks == [7, 7] and no_hooks(learn.model)

    class Interrupt(Callback):
        def after_batch(self): raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        learn.fit(1, cbs=[Interrupt()])
    assert no_hooks(learn.model)


def test_activation_stats_chosen_modules_and_errors():
    model = small_cnn()
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    learn = Learner(model, image_data(n_train=64, n_valid=32), F.cross_entropy, cbs=[ActivationStats(convs)])
    learn.fit(1)
    assert learn.activation_stats.means.shape == (2, 2)
    by_function = ActivationStats(lambda m: [m[1], m[3]])
    learn.remove_cbs(learn.activation_stats)
    learn.fit(1, cbs=[by_function])
    assert by_function.means.shape == (2, 2) and (by_function.means >= 0).all()  # ReLU outputs

    stranger = ActivationStats([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match='not part of the learner'):
        learn.fit(1, cbs=[stranger])
    assert no_hooks(learn.model)
    with pytest.raises(ValueError, match='no activations recorded yet'):
        stranger.means
    with pytest.raises(ValueError, match='hist_range'):
        ActivationStats(hist_range=(1., 0.))


def test_plots_render_headless(tmp_path):
    learn = Learner(small_cnn(), image_data(n_train=96, n_valid=32), F.cross_entropy, lr=0.3,
                    cbs=[ActivationStats()])
    learn.fit(1)
    stats = learn.activation_stats
    for name, fig in (('stats', stats.plot_stats()), ('near_zero', stats.plot_near_zero()),
                      ('hist', stats.plot_hist())):
        path = tmp_path / f'{name}.png'
        fig.savefig(path)
        assert path.read_bytes()[:4] == b'\x89PNG' and path.stat().st_size > 1000
    near_zero_fig = stats.plot_near_zero(max_layers=2)
    assert len(near_zero_fig.axes) == 2 and near_zero_fig.axes[0].get_ylim() == (0, 1)
    assert list(near_zero_fig.axes[1].lines[0].get_ydata()) == pytest.approx(stats.near_zero()[1].tolist())


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_activation_stats_on_cuda():
    from minilearn.callbacks.device import DeviceCallback
    learn = Learner(small_cnn(), image_data(n_train=64, n_valid=32), F.cross_entropy,
                    cbs=[DeviceCallback('cuda'), ActivationStats()])
    learn.fit(1)
    assert learn.activation_stats._rows[0][0].device.type == 'cuda'
    assert learn.activation_stats.hists.device.type == 'cpu'
