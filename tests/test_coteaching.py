"""CoTeaching and JoCoR (issue 21, item 3) against hand-written loops that follow the authors' code
(bhanML/Co-teaching loss.py and main.py, hongxin001/JoCoR algorithm/loss.py and algorithm/jocor.py): the same
initial weights and the same batches give the same weights after several epochs; plus the schedules, a mid-epoch
resume, the LR finder, and errors on bad input."""
import copy
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import forbid_host_reads, same_weights, weights
from minilearn.callback import Callback, Order
from minilearn.callbacks.checkpoint import CheckpointCallback
from minilearn.callbacks.coteaching import CoTeaching, JoCoR, forget_rate_schedule
from minilearn.callbacks.device import DeviceCallback
from minilearn.callbacks.mixup import MixUp
from minilearn.callbacks.recorder import Recorder
from minilearn.data.core import DataBunch
from minilearn.learner import Learner
from minilearn.serialization import CheckpointError

N_TRAIN, BS, EPOCHS, LR = 90, 16, 4, 1e-2  # 6 training batches per epoch, the last one short (10 items)
FORGET, GRADUAL = 0.3, 3


def tensors():
    """A linear 3-class problem with 30% of the labels moved to the next class; also the clean mask."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_TRAIN + 30, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(1)
    flip = torch.rand(len(y), generator=g) < 0.3
    noisy = torch.where(flip, (y + 1) % 3, y)
    return x, noisy, ~flip


def net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(0.2), nn.Linear(16, 3))


def data():
    x, y, _ = tensors()
    return DataBunch.from_tensors(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], bs=BS, seed=0, c_out=3)


def learner(cb_factory, opt_func=torch.optim.Adam, model_seed=1, peer_seed=2, cbs=(), path='.'):
    model, peer = net(model_seed), net(peer_seed)
    cb = cb_factory(peer)
    learn = Learner(model, data(), F.cross_entropy, opt_func=opt_func, lr=LR, cbs=[cb, *cbs], path=path)
    learn.logger = lambda *args: None
    return learn, cb


class Hypers(Callback):
    """The learner's and the peer's optimizer hyper-parameters at every training step (after the peer's step)."""
    _order = Order.CHECKPOINT

    def __init__(self, peer_cb):
        self.peer_cb, self.learner, self.peer = peer_cb, [], []

    def after_step(self):
        pick = lambda opt: [{k: v for k, v in g.items() if k != 'params'} for g in opt.param_groups]
        self.learner.append(pick(self.run.opt))
        self.peer.append(pick(self.peer_cb.peer_opt))


# ---- the authors' formulas, written as in their code -------------------------------------------------------
def rate_schedule(n_epoch, forget_rate, num_gradual, exponent):
    """bhanML/Co-teaching main.py."""
    rates = np.ones(n_epoch) * forget_rate
    rates[:num_gradual] = np.linspace(0, forget_rate ** exponent, num_gradual)
    return rates


def loss_coteaching(y_1, y_2, t, forget_rate):
    """bhanML/Co-teaching loss.py, returning the means (without the extra division by num_remember, issue #9)."""
    loss_1 = F.cross_entropy(y_1, t, reduction='none')
    ind_1_sorted = np.argsort(loss_1.data.cpu().numpy())
    loss_2 = F.cross_entropy(y_2, t, reduction='none')
    ind_2_sorted = np.argsort(loss_2.data.cpu().numpy())
    remember_rate = 1 - forget_rate
    num_remember = int(remember_rate * len(ind_1_sorted))
    ind_1_update, ind_2_update = ind_1_sorted[:num_remember], ind_2_sorted[:num_remember]
    loss_1_update = F.cross_entropy(y_1[ind_2_update], t[ind_2_update])
    loss_2_update = F.cross_entropy(y_2[ind_1_update], t[ind_1_update])
    return loss_1_update, loss_2_update, (ind_1_update, ind_2_update)


def kl_loss_compute(pred, soft_targets):
    """hongxin001/JoCoR algorithm/loss.py, reduce=False."""
    kl = F.kl_div(F.log_softmax(pred, dim=1), F.softmax(soft_targets, dim=1), reduction='none')
    return torch.sum(kl, 1)


def loss_jocor(y_1, y_2, t, forget_rate, co_lambda=0.1):
    """hongxin001/JoCoR algorithm/loss.py."""
    loss_pick_1 = F.cross_entropy(y_1, t, reduction='none') * (1 - co_lambda)
    loss_pick_2 = F.cross_entropy(y_2, t, reduction='none') * (1 - co_lambda)
    loss_pick = (loss_pick_1 + loss_pick_2 + co_lambda * kl_loss_compute(y_1, y_2)
                 + co_lambda * kl_loss_compute(y_2, y_1))
    ind_sorted = np.argsort(loss_pick.data.cpu().numpy())
    num_remember = int((1 - forget_rate) * len(ind_sorted))
    ind_update = ind_sorted[:num_remember]
    return torch.mean(loss_pick[ind_update]), (ind_update,)


def set_hypers(opts, hypers):
    for opt in opts:
        for group, values in zip(opt.param_groups, hypers): group.update(values)


def reference(method, model1, model2, opt_func, epochs, hypers=None, clean=None, co_lambda=0.1):
    """The authors' train loop over the learner's batches (read from its loader's order), optionally with the
    learner's hyper-parameters at every step; returns the per-epoch pooled pure ratios when `clean` is given."""
    x, y, _ = tensors()
    dl = data().train_dl
    rates = rate_schedule(epochs, FORGET, GRADUAL, 1.0)
    if method == 'coteaching':
        opts = [opt_func(model1.parameters(), lr=LR), opt_func(model2.parameters(), lr=LR)]
    else:
        opts = [opt_func(list(model1.parameters()) + list(model2.parameters()), lr=LR)]
    step, ratios = 0, []
    for epoch in range(epochs):
        model1.train(); model2.train()
        order = dl.order(epoch)
        clean_kept, kept = None, 0
        for start in range(0, N_TRAIN, BS):
            ind = order[start:start + BS]
            images, labels = x[ind], y[ind]
            logits1 = model1(images)
            logits2 = model2(images)
            if hypers is not None: set_hypers(opts, hypers[step])
            if method == 'coteaching':
                loss_1, loss_2, picks = loss_coteaching(logits1, logits2, labels, rates[epoch])
                opts[0].zero_grad(); loss_1.backward(); opts[0].step()
                opts[1].zero_grad(); loss_2.backward(); opts[1].step()
            else:
                loss, picks = loss_jocor(logits1, logits2, labels, rates[epoch], co_lambda)
                opts[0].zero_grad(); loss.backward(); opts[0].step()
            if clean is not None:
                counts = np.array([clean[ind[p]].sum().item() for p in picks])
                clean_kept, kept = (counts if clean_kept is None else clean_kept + counts), kept + len(picks[0])
            step += 1
        if clean is not None: ratios.append((clean_kept / kept).tolist())
        with torch.no_grad():  # the learner validates here; in eval mode with no dropout draw
            model1.eval()
    return ratios


# ---- the schedule ---------------------------------------------------------------------------------------
@pytest.mark.parametrize('forget_rate,num_gradual,exponent', [(0.2, 10, 1.), (0.45, 5, 0.5), (0.8, 15, 2.),
                                                             (0.3, 1, 1.), (0., 3, 1.)])
def test_forget_rate_schedule_is_the_authors(forget_rate, num_gradual, exponent):
    expected = rate_schedule(num_gradual + 3, forget_rate, num_gradual, exponent)
    assert [forget_rate_schedule(forget_rate, e, num_gradual, exponent) for e in range(num_gradual + 3)] \
        == expected.tolist()


# ---- against the authors' loops ---------------------------------------------------------------------------
@pytest.mark.parametrize('opt_func', [torch.optim.Adam, partial(torch.optim.SGD, momentum=0.9)],
                         ids=['adam', 'sgd_momentum'])
def test_coteaching_equals_the_authors_loop(opt_func):
    learn, cb = learner(lambda peer: CoTeaching(peer, FORGET, num_gradual=GRADUAL), opt_func)
    model1, model2 = copy.deepcopy(learn.model), copy.deepcopy(cb.peer)
    torch.manual_seed(5)
    learn.fit(EPOCHS)
    torch.manual_seed(5)
    reference('coteaching', model1, model2, opt_func, EPOCHS)
    assert same_weights(weights(learn.model), weights(model1))
    assert same_weights(weights(learn.co_teaching.peer), weights(model2))
    assert not same_weights(weights(model1), weights(net(1)))  # both trained
    assert cb.rate == FORGET  # the last epoch forgot forget_rate


@pytest.mark.parametrize('opt_func', [torch.optim.Adam, partial(torch.optim.SGD, momentum=0.9)],
                         ids=['adam', 'sgd_momentum'])
def test_jocor_equals_the_authors_loop_with_one_optimizer_over_both(opt_func):
    learn, cb = learner(lambda peer: JoCoR(peer, FORGET, co_lambda=0.3, num_gradual=GRADUAL), opt_func)
    model1, model2 = copy.deepcopy(learn.model), copy.deepcopy(cb.peer)
    torch.manual_seed(5)
    learn.fit(EPOCHS)
    torch.manual_seed(5)
    reference('jocor', model1, model2, opt_func, EPOCHS, co_lambda=0.3)
    for mine, theirs in ((learn.model, model1), (learn.jocor.peer, model2)):
        for k, v in weights(mine).items(): torch.testing.assert_close(v, weights(theirs)[k], rtol=0, atol=1e-6)
    assert not same_weights(weights(model2), weights(net(2)))


@pytest.mark.parametrize('method', ['coteaching', 'jocor'])
def test_the_peer_follows_the_one_cycle_schedule_at_every_step(method):
    factory = (lambda peer: CoTeaching(peer, FORGET, num_gradual=GRADUAL)) if method == 'coteaching' else \
        (lambda peer: JoCoR(peer, FORGET, num_gradual=GRADUAL))
    learn, cb = learner(factory)
    hypers = Hypers(cb)
    model1, model2 = copy.deepcopy(learn.model), copy.deepcopy(cb.peer)
    torch.manual_seed(5)
    learn.fit_one_cycle(EPOCHS, max_lr=0.05, cbs=[hypers])
    assert len(hypers.learner) == EPOCHS * 6 and hypers.peer == hypers.learner
    lrs = [h[0]['lr'] for h in hypers.learner]
    betas = [h[0]['betas'][0] for h in hypers.learner]
    assert len(set(lrs)) == len(lrs) and max(lrs) == pytest.approx(0.05, rel=0.05)
    assert min(betas) == pytest.approx(0.85, abs=0.01) and max(betas) == pytest.approx(0.95, abs=0.01)
    # and the authors' loop driven by those hyper-parameters gives the same weights
    torch.manual_seed(5)
    reference(method, model1, model2, torch.optim.Adam, EPOCHS, hypers=[h for h in hypers.learner])
    for mine, theirs in ((learn.model, model1), (cb.peer, model2)):
        for k, v in weights(mine).items(): torch.testing.assert_close(v, weights(theirs)[k], rtol=0, atol=1e-6)
    # the learner's optimizer is back to its own hyper-parameters; the peer's still follows the last step's
    assert learn.opt.param_groups[0]['lr'] == LR


@pytest.mark.parametrize('method', ['coteaching', 'jocor'])
def test_the_pure_ratio_is_the_label_precision_of_the_kept_items(method):
    _, _, clean = tensors()
    factory = (lambda peer: CoTeaching(peer, FORGET, num_gradual=GRADUAL, clean=clean[:N_TRAIN])) \
        if method == 'coteaching' else (lambda peer: JoCoR(peer, FORGET, num_gradual=GRADUAL, clean=clean[:N_TRAIN]))
    learn, cb = learner(factory)
    model1, model2 = copy.deepcopy(learn.model), copy.deepcopy(cb.peer)
    torch.manual_seed(5)
    learn.fit(EPOCHS)
    torch.manual_seed(5)
    expected = reference(method, model1, model2, torch.optim.Adam, EPOCHS, clean=clean)
    names = ['pure_ratio_1', 'pure_ratio_2'] if method == 'coteaching' else ['pure_ratio']
    assert [row['epoch'] for row in cb.history] == list(range(EPOCHS))
    assert [[row[n] for n in names] for row in cb.history] == expected  # the same counts, the same division
    assert cb.history[0][names[0]] == pytest.approx(clean[:N_TRAIN].float().mean().item())  # epoch 0 keeps all


def test_a_fit_that_failed_inside_an_epoch_leaves_no_counts_to_the_next():
    clean = tensors()[2][:N_TRAIN]
    learn, cb = learner(lambda peer: CoTeaching(peer, FORGET, num_gradual=GRADUAL, clean=clean))

    class CrashAt2(Callback):
        def after_batch(self):
            if self.run.in_train and self.run.iter == 2: raise RuntimeError('stop')

    with pytest.raises(RuntimeError, match='stop'):
        learn.fit(1, cbs=[CrashAt2()])
    learn.fit(1)
    expected = clean.float().mean().item()  # epoch 0 forgets nothing: every item is kept, once
    assert [cb.history[-1]['pure_ratio_1'], cb.history[-1]['pure_ratio_2']] == [pytest.approx(expected)] * 2


def test_the_pure_ratio_needs_the_batch_indices_and_one_flag_per_item():
    _, _, clean = tensors()
    x, y, _ = tensors()
    loader = torch.utils.data.DataLoader(list(zip(x[:N_TRAIN], y[:N_TRAIN])), batch_size=BS)
    peer = net(2)
    learn = Learner(net(1), DataBunch(loader, None), F.cross_entropy, lr=LR,
                    cbs=[CoTeaching(peer, 0.2, clean=clean[:N_TRAIN])])
    check_refused_before_any_step(learn, peer, ValueError, r'CoTeaching .*needs each batch\'s dataset indices')
    learn, cb = learner(lambda peer: JoCoR(peer, 0.2, clean=clean))
    check_refused_before_any_step(learn, cb.peer, ValueError, 'clean has 120 entries for a training set of 90')
    learn, cb = learner(lambda peer: JoCoR(peer, 0.2))
    learn.data.train_dl = loader  # without `clean`, the indices are not needed
    learn.fit(1)


def test_validation_and_predictions_use_the_learners_model_alone():
    learn, cb = learner(lambda peer: CoTeaching(peer, FORGET, num_gradual=GRADUAL))
    calls = []
    cb.peer.register_forward_hook(lambda *args: calls.append(cb.peer.training))
    cb.peer.eval()
    learn.fit(2)
    assert calls == [True] * 12  # one forward per training batch (in training mode), none in validation
    assert not cb.peer.training  # its modes are put back after the fit
    preds, targets = learn.get_preds()
    x, y, _ = tensors()
    learn.model.eval()
    with torch.no_grad(): expected = F.softmax(learn.model(x[N_TRAIN:]), 1)
    torch.testing.assert_close(preds, expected)
    assert len(calls) == 12
    assert isinstance(learn.loss, torch.Tensor)


def test_no_host_reads_on_the_batch_path(monkeypatch):
    for factory in (lambda peer: CoTeaching(peer, FORGET, num_gradual=GRADUAL), lambda peer: JoCoR(peer, FORGET)):
        learn, cb = learner(factory, opt_func=partial(torch.optim.SGD, momentum=0.9))  # CPU Adam reads its step
        learn.data.valid_dl = None

        class Forbid(Callback):
            def begin_batch(self):  # after the first batch's pre-flight checks, which read the data once
                if self.run.n_iter > 0: forbid_host_reads(monkeypatch)

            def after_batch(self): monkeypatch.undo()

        learn.fit(2, cbs=[Forbid()])
        assert not same_weights(weights(cb.peer), weights(net(2)))


def test_the_lr_finder_leaves_the_peer_alone():
    learn, cb = learner(lambda peer: CoTeaching(peer, FORGET, num_gradual=GRADUAL), cbs=[Recorder()])
    before = weights(cb.peer)
    model_before = weights(learn.model)
    learn.lr_find(max_iter=8)
    assert same_weights(weights(cb.peer), before) and same_weights(weights(learn.model), model_before)
    assert cb.peer_opt is None and learn.co_teaching is cb  # stood aside during the sweep, attached again
    learn.fit(1)
    assert not same_weights(weights(cb.peer), before)


def test_a_second_fit_keeps_the_peer_optimizer_unless_the_learners_is_rebuilt():
    learn, cb = learner(lambda peer: CoTeaching(peer, FORGET, num_gradual=GRADUAL))
    learn.fit(1)
    opt = cb.peer_opt
    learn.fit(1)
    assert cb.peer_opt is opt and opt.state  # Adam's moments carry over, as the learner's do
    learn.fit(1, reset_opt=True)
    assert cb.peer_opt is not opt


# ---- mid-epoch resume ---------------------------------------------------------------------------------
class Crash(Callback):
    def after_pred(self):
        if self.run.in_train and (self.run.epoch, self.run.iter) == (1, 4): raise RuntimeError('node lost')


@pytest.mark.parametrize('method', ['coteaching', 'jocor'])
def test_a_mid_epoch_resume_equals_the_uninterrupted_run(method, tmp_path):
    clean = tensors()[2][:N_TRAIN]
    factory = (lambda peer: CoTeaching(peer, FORGET, num_gradual=GRADUAL, clean=clean)) if method == 'coteaching' \
        else (lambda peer: JoCoR(peer, FORGET, num_gradual=GRADUAL, clean=clean))
    torch.manual_seed(0)
    straight, straight_cb = learner(factory, path=tmp_path / 'straight')
    straight.fit_one_cycle(3)
    torch.manual_seed(0)
    ckpt = CheckpointCallback('ckpt', every_n_batches=3, signals=None)
    crashing, _ = learner(factory, cbs=[ckpt, Crash()], path=tmp_path / 'crashed')
    with pytest.raises(RuntimeError, match='node lost'):
        crashing.fit_one_cycle(3)
    torch.manual_seed(7)
    resumed, resumed_cb = learner(factory, model_seed=11, peer_seed=12, path=tmp_path / 'resumed')
    resumed.fit_one_cycle(3, resume=ckpt.path)
    assert (resumed.start_epoch, resumed.start_iter) == (1, 3)
    assert same_weights(weights(resumed.model), weights(straight.model))
    assert same_weights(weights(resumed_cb.peer), weights(straight_cb.peer))
    theirs = straight_cb.peer_opt.state_dict()['state']
    for key, value in resumed_cb.peer_opt.state_dict()['state'].items():
        for name, tensor in value.items(): assert torch.equal(tensor, theirs[key][name])
    assert resumed_cb.history == straight_cb.history and len(straight_cb.history) == 3  # the purity counts resumed


@pytest.mark.filterwarnings('ignore:checkpoint .* was written by a fit of 1 epochs')
def test_a_checkpoint_of_another_peer_is_refused_and_changes_nothing(tmp_path):
    learn, cb = learner(lambda peer: CoTeaching(peer, FORGET), path=tmp_path)
    learn.fit(1, cbs=[CheckpointCallback('ckpt', signals=None)])
    other_peer = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 3))
    other = Learner(net(1), data(), F.cross_entropy, opt_func=torch.optim.Adam, lr=LR,
                    cbs=[CoTeaching(other_peer, FORGET)])
    model_before, peer_before = weights(other.model), weights(other_peer)
    with pytest.raises(CheckpointError, match="CoTeaching: the checkpoint's peer weights"):
        other.fit(2, resume=tmp_path / 'models' / 'ckpt.pth')
    assert same_weights(weights(other.model), model_before) and same_weights(weights(other_peer), peer_before)
    assert other.co_teaching.peer_opt is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_on_cuda_the_peer_follows_the_model_to_the_device():
    _, _, clean = tensors()
    learn, cb = learner(lambda peer: CoTeaching(peer, FORGET, num_gradual=GRADUAL, clean=clean[:N_TRAIN]),
                        cbs=[DeviceCallback('cuda')])
    learn.fit(2)
    assert next(cb.peer.parameters()).device.type == 'cuda' and len(cb.history) == 2


# ---- bad input ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kwargs,match', [
    (dict(forget_rate=1.0), 'forget_rate must be a number in \\[0, 1\\)'),
    (dict(forget_rate=-0.1), 'forget_rate'), (dict(forget_rate=float('nan')), 'forget_rate'),
    (dict(forget_rate=True), 'forget_rate'), (dict(forget_rate=0.2, num_gradual=0), 'num_gradual'),
    (dict(forget_rate=0.2, num_gradual=2.5), 'num_gradual'), (dict(forget_rate=0.2, exponent=0), 'exponent'),
])
@pytest.mark.parametrize('cls', [CoTeaching, JoCoR])
def test_bad_arguments_are_refused_when_built(cls, kwargs, match):
    with pytest.raises(ValueError, match=f'{cls.__name__} {match}'):
        cls(net(2), **kwargs)


def test_bad_co_lambda_and_peer_are_refused():
    with pytest.raises(ValueError, match='JoCoR co_lambda must be a number in \\[0, 1\\]'):
        JoCoR(net(2), 0.2, co_lambda=1.5)
    with pytest.raises(TypeError, match='CoTeaching peer must be the second network'):
        CoTeaching(lambda x: x, 0.2)
    with pytest.raises(TypeError, match='1-D bool mask'):
        CoTeaching(net(2), 0.2, clean=torch.ones(10))


def check_refused_before_any_step(learn, peer, error, match, **fit_kwargs):
    model_before, peer_before = weights(learn.model), weights(peer)
    with pytest.raises(error, match=match):
        learn.fit(2, **fit_kwargs)
    assert same_weights(weights(learn.model), model_before) and same_weights(weights(peer), peer_before)
    assert learn.opt is None or not learn.opt.state  # no step was taken


@pytest.mark.parametrize('cls', [CoTeaching, JoCoR])
def test_the_learners_own_model_as_peer_is_refused(cls):
    model = net(1)
    learn = Learner(model, data(), F.cross_entropy, opt_func=torch.optim.Adam, lr=LR, cbs=[cls(model, 0.2)])
    check_refused_before_any_step(learn, model, ValueError, "peer is the learner's model")
    shared = nn.Sequential(model[0], nn.ReLU(), nn.Linear(16, 3))
    learn = Learner(model, data(), F.cross_entropy, lr=LR, cbs=[cls(shared, 0.2)])
    check_refused_before_any_step(learn, shared, ValueError, 'shares parameters')


@pytest.mark.parametrize('cls', [CoTeaching, JoCoR])
def test_a_peer_with_another_output_width_is_refused_before_any_step(cls):
    peer = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    learn = Learner(net(1), data(), F.cross_entropy, opt_func=torch.optim.Adam, lr=LR, cbs=[cls(peer, 0.2)])
    check_refused_before_any_step(learn, peer, ValueError, r"peer's outputs have shape \(16, 4\).*\(16, 3\)")


def test_soft_targets_and_other_callbacks_are_refused():
    x, y, _ = tensors()
    soft = DataBunch.from_tensors(x[:N_TRAIN], F.one_hot(y[:N_TRAIN], 3).float(), bs=BS, seed=0)
    peer = net(2)
    learn = Learner(net(1), soft, F.cross_entropy, lr=LR, cbs=[CoTeaching(peer, 0.2)])
    check_refused_before_any_step(learn, peer, TypeError, 'class-index targets of shape \\(N,\\)')
    learn = Learner(net(1), data(), F.cross_entropy, lr=LR, cbs=[JoCoR(peer, 0.2), MixUp()])
    check_refused_before_any_step(learn, peer, ValueError, 'JoCoR cannot train with MixUp')


def test_a_batch_that_would_keep_nothing_is_refused_at_begin_fit():
    x, y, _ = tensors()
    tiny_last = DataBunch.from_tensors(x[:33], y[:33], bs=16, seed=0)  # the last batch holds 1 item
    peer = net(2)
    learn = Learner(net(1), tiny_last, F.cross_entropy, lr=LR, cbs=[CoTeaching(peer, 0.5, num_gradual=1)])
    check_refused_before_any_step(learn, peer, ValueError, 'would keep no item of a batch of 1 at forget rate 0.5')
    learn.data.train_dl.drop_last = True
    learn.fit(1)  # without the short batch it trains
