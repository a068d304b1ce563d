"""The Learner's loop and callback protocol (issue: foundation)."""
import functools

import pytest
import torch
import torch.nn.functional as F

from helpers import linear_data, mlp, same_weights, weights
from minilearn.learner import (EVENTS, Callback, CancelBatchException, CancelEpochException, CancelTrainException,
                               Learner, TrainEvalCallback)


class Probe(Callback):
    """Records every event it receives (overrides dispatch, like the course's DebugCallback)."""
    _order = 50

    def __init__(self):
        self.events = []

    def __call__(self, event_name):
        self.events.append(event_name)
        return False


def batch_events(train):
    events = ['begin_batch', 'after_pred', 'after_loss']
    if train: events += ['after_backward', 'after_step']
    return events + ['after_batch']


def expected_events(epochs, n_train, n_valid):
    events = ['begin_fit']
    for _ in range(epochs):
        events += ['begin_epoch'] + batch_events(True) * n_train
        events += ['begin_validate'] + batch_events(False) * n_valid + ['after_epoch']
    return events + ['after_fit']


def make_learner(cbs=None, **kwargs):
    data = kwargs.pop('data', None) or linear_data(n_train=48, n_valid=32, bs=16)  # 3 train, 1 valid batches
    kwargs.setdefault('lr', 0.1)
    return Learner(mlp(), data, F.cross_entropy, cbs=cbs, **kwargs)


def test_event_order_matches_the_protocol():
    probe = Probe()
    learn = make_learner([probe])
    learn.fit(2)
    assert probe.events == expected_events(2, 3, 1)


class RaiseAt(Callback):
    _order = 100  # after the probe, so the probe sees the event in which it raises

    def __init__(self, event, exc, when=lambda run: True):
        self.event, self.exc, self.when = event, exc, when

    def __call__(self, event_name):  # handlers come from the class: one event chosen per instance overrides dispatch
        if event_name == self.event and self.when(self.run): raise self.exc()


def test_cancel_batch_skips_rest_of_batch_and_continues():
    probe = Probe()
    learn = make_learner([probe, RaiseAt('after_loss', CancelBatchException, lambda r: r.in_train and r.iter == 1)])
    learn.fit(1)
    train_batch_1 = ['begin_batch', 'after_pred', 'after_loss', 'after_cancel_batch', 'after_batch']
    expected = (['begin_fit', 'begin_epoch'] + batch_events(True) + train_batch_1 + batch_events(True)
                + ['begin_validate'] + batch_events(False) + ['after_epoch', 'after_fit'])
    assert probe.events == expected


def test_cancel_epoch_ends_the_pass_and_validation_still_runs():
    probe = Probe()
    learn = make_learner([probe, RaiseAt('after_batch', CancelEpochException, lambda r: r.in_train and r.iter == 0)])
    learn.fit(2)
    one_epoch = (['begin_epoch'] + batch_events(True) + ['after_cancel_epoch', 'begin_validate']
                 + batch_events(False) + ['after_epoch'])
    assert probe.events == ['begin_fit'] + one_epoch * 2 + ['after_fit']


def test_cancel_train_stops_and_runs_after_cancel_train_then_after_fit():
    probe = Probe()
    learn = make_learner([probe, RaiseAt('after_step', CancelTrainException, lambda r: r.iter == 1)])
    learn.fit(3)
    assert probe.events == (['begin_fit', 'begin_epoch'] + batch_events(True)
                            + batch_events(True)[:-1] + ['after_cancel_train', 'after_fit'])
    assert learn.epoch == 0


def test_returning_true_from_begin_epoch_and_begin_validate_skips_the_pass():
    class SkipTraining(Callback):
        def begin_epoch(self): return True

    class SkipValidation(Callback):
        def begin_validate(self): return True

    probe = Probe()
    learn = make_learner([probe, SkipTraining()])
    before = weights(learn.model)
    learn.fit(1)
    assert 'after_backward' not in probe.events and probe.events.count('after_loss') == 1  # validation only
    assert same_weights(before, weights(learn.model))
    probe2 = Probe()
    make_learner([probe2, SkipValidation()]).fit(1)
    assert probe2.events == ['begin_fit', 'begin_epoch'] + batch_events(True) * 3 + ['begin_validate',
                                                                                     'after_epoch', 'after_fit']


def test_callbacks_run_sorted_by_order_and_stable_for_ties():
    calls = []

    def make(name, order):
        cls = type(name, (Callback,), {'_order': order, 'begin_fit': lambda self: calls.append(name)})
        return cls()

    learn = make_learner([make('Late', 10), make('First', -3), make('TieA', 5), make('TieB', 5)])
    learn.fit(1)
    assert calls == ['First', 'TieA', 'TieB', 'Late']


def test_callback_name_attribute_and_learner_exposure():
    class AvgStatsCallback(Callback): pass

    class MyFancyThing(Callback): pass

    learn = make_learner([AvgStatsCallback(), MyFancyThing()])
    assert learn.avg_stats.name == 'avg_stats' and isinstance(learn.my_fancy_thing, MyFancyThing)
    assert learn.train_eval.name == 'train_eval'


def test_cb_funcs_build_callbacks_including_partials():
    class Scaled(Callback):
        def __init__(self, factor=1): self.factor = factor

    learn = make_learner(cb_funcs=[functools.partial(Scaled, factor=3)])
    assert learn.scaled.factor == 3 and learn.scaled.run is learn


def test_fit_cbs_are_removed_afterwards_even_on_error():
    probe = Probe()
    learn = make_learner()
    learn.fit(1, cbs=[probe])
    assert probe not in learn.cbs and not hasattr(learn, 'probe')
    bad = RaiseAt('after_pred', RuntimeError)
    with pytest.raises(RuntimeError):
        learn.fit(1, cbs=[bad])
    assert bad not in learn.cbs and not hasattr(learn, 'raise_at')


def test_duplicate_callback_names_are_an_error():
    with pytest.raises(ValueError, match="already attached"):
        make_learner([Probe(), Probe()])


def test_unknown_event_is_an_error_naming_the_valid_ones():
    learn = make_learner()
    with pytest.raises(ValueError, match="unknown event 'begin_fitt'.*begin_fit"):
        learn('begin_fitt')


def test_exception_in_callback_names_callback_and_event_and_keeps_type():
    class Broken(Callback):
        def after_loss(self): raise KeyError('boom')

    learn = make_learner([Broken()])
    with pytest.raises(KeyError) as info:
        learn.fit(1)
    assert "'broken'" in str(info.value) and 'after_loss' in str(info.value)
    assert isinstance(info.value.__cause__, KeyError)


def test_keyboard_interrupt_propagates_unchanged_and_after_fit_runs():
    interrupt = KeyboardInterrupt()
    after_fit_ran = []

    class Interrupt(Callback):
        def after_batch(self):
            if self.in_train and self.iter == 1: raise interrupt

        def after_fit(self): after_fit_ran.append(True)

    learn = make_learner([Interrupt()])
    with pytest.raises(KeyboardInterrupt) as info:
        learn.fit(2)
    assert info.value is interrupt and after_fit_ran == [True]


class CourseStyleCallback(Callback):
    """Written like a course-v3 callback: reads learner state directly, writes through self.run."""

    def __init__(self): self.seen_train, self.seen_valid = 0, 0

    def begin_fit(self):
        self.old_loss_func = self.run.loss_func
        self.run.loss_func = self.doubled_loss

    def doubled_loss(self, pred, yb): return 2 * self.old_loss_func(pred, yb)

    def begin_batch(self):
        if self.in_train: self.seen_train += self.xb.shape[0]
        else: self.seen_valid += self.xb.shape[0]
        self.run.xb = self.xb * 0  # inputs replaced through the learner

    def after_fit(self): self.run.loss_func = self.old_loss_func


def test_course_style_callback_reads_state_and_writes_through_run():
    cb = CourseStyleCallback()
    learn = make_learner([cb])
    original = learn.loss_func
    seen = []

    class Spy(Callback):
        _order = 10
        def after_loss(self): seen.append((self.xb.abs().sum().item(), self.loss.item(), self.pred))

    learn.fit(1, cbs=[Spy()])
    assert cb.seen_train == 48 and cb.seen_valid == 32
    assert all(xsum == 0 for xsum, _, _ in seen)  # the model saw the zeroed inputs
    _, loss, pred = seen[-1]
    assert loss == pytest.approx(2 * F.cross_entropy(pred, learn.yb).item())
    assert learn.loss_func is original


def test_course_style_swap_is_undone_after_keyboard_interrupt_mid_epoch():
    class Interrupt(Callback):
        _order = 5
        def after_batch(self):
            if self.in_train and self.iter == 1: raise KeyboardInterrupt

    learn = make_learner([CourseStyleCallback(), Interrupt()])
    original = learn.loss_func
    with pytest.raises(KeyboardInterrupt):
        learn.fit(2)
    assert learn.loss_func is original


def test_train_eval_counters_and_modes():
    seen = []

    class Watch(Callback):
        def after_batch(self): seen.append((self.in_train, self.model.training, self.n_epochs, self.n_iter))

    learn = make_learner([Watch()])
    learn.fit(2)
    train = [s for s in seen if s[0]]
    assert all(training for _, training, _, _ in train) and not any(s[1] for s in seen if not s[0])
    assert [round(s[2], 6) for s in train] == [round(x, 6) for x in (1/3, 2/3, 1, 4/3, 5/3, 2)]
    assert [s[3] for s in train] == [1, 2, 3, 4, 5, 6]
    assert learn.n_epochs == pytest.approx(2.0) and learn.n_iter == 6


def test_optimizer_is_built_on_first_fit_kept_and_rebuilt_on_reset():
    learn = make_learner()
    assert learn.opt is None
    learn.fit(1)
    opt = learn.opt
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]['lr'] == 0.1
    learn.fit(1)
    assert learn.opt is opt
    learn.fit(1, reset_opt=True)
    assert learn.opt is not opt


def test_splitter_gives_parameter_groups():
    learn = make_learner(splitter=lambda m: [m[0].parameters(), m[2].parameters()])
    learn.fit(1)
    assert len(learn.opt.param_groups) == 2
    assert sum(len(g['params']) for g in learn.opt.param_groups) == 4


def test_valid_dl_none_skips_validation():
    data = linear_data(n_train=48, n_valid=32, bs=16)
    data.valid_dl = None
    probe = Probe()
    make_learner([probe], data=data).fit(1)
    assert 'begin_validate' not in probe.events and probe.events.count('after_step') == 3


def test_show_callbacks_lists_handlers_per_event_in_order(capsys):
    class A(Callback):
        _order = 3
        def begin_fit(self): pass

    class B(Callback):
        _order = -2
        def begin_fit(self): pass

    make_learner([A(), B()]).show_callbacks()
    out = capsys.readouterr().out.splitlines()
    begin_fit = next(line for line in out if line.startswith('begin_fit'))
    assert begin_fit.index('B(-2)') < begin_fit.index('TrainEvalCallback(0)') < begin_fit.index('A(3)')
    assert len(out) == len(EVENTS)


def test_misspelled_event_method_warns():
    class Typo(Callback):
        def after_bacth(self): pass

    with pytest.warns(UserWarning, match='after_bacth'):
        make_learner([Typo()])


def test_logger_prints_by_default_and_can_be_replaced(capsys):
    learn = make_learner()
    default = learn.logger
    default('a line')
    assert capsys.readouterr().out == 'a line\n'  # the default prints (lists as table rows: test_core_callbacks)
    lines = []

    class Log(Callback):
        def begin_fit(self):
            self.old, self.run.logger = self.run.logger, lines.append
        def after_epoch(self): self.logger(f'epoch {self.epoch}')
        def after_fit(self): self.run.logger = self.old

    learn.fit(2, cbs=[Log()])
    assert lines == ['epoch 0', 'epoch 1'] and learn.logger is default


def test_after_fit_runs_in_reverse_order_so_nested_swaps_unwind():
    class Swap(Callback):
        def __init__(self, order): self._order = order
        @property
        def name(self): return f'swap_{self._order}'
        def begin_fit(self):
            self.saved = self.run.loss_func
            self.run.loss_func = lambda pred, yb, inner=self.saved: inner(pred, yb)
        def after_fit(self): self.run.loss_func = self.saved

    learn = make_learner([Swap(0), Swap(90)])
    original = learn.loss_func
    learn.fit(1)
    assert learn.loss_func is original
    with pytest.raises(KeyboardInterrupt):
        learn.fit(1, cbs=[RaiseAt('after_batch', KeyboardInterrupt)])
    assert learn.loss_func is original


def test_cancel_epoch_raised_in_begin_epoch_skips_the_pass():
    probe = Probe()
    learn = make_learner([probe, RaiseAt('begin_epoch', CancelEpochException)])
    learn.fit(1)
    assert probe.events[:3] == ['begin_fit', 'begin_epoch', 'after_cancel_epoch']
    assert probe.events.count('after_step') == 0 and 'begin_validate' in probe.events


def test_a_callback_attached_to_another_learner_is_refused():
    probe = Probe()
    make_learner([probe])
    with pytest.raises(ValueError, match='already attached to another Learner'):
        make_learner([probe])


def test_errors_before_the_first_step_surface_unchanged():
    with pytest.raises(TypeError, match='opt_func must build the optimizer'):
        make_learner(opt_func=torch.optim.SGD(mlp().parameters(), lr=0.1))
    with pytest.raises(ValueError, match='lr must be one positive number'):
        make_learner(lr=[0.1, 0.01])
    learn = make_learner(splitter=lambda m: [m[0], m[2]])  # modules, not parameters
    with pytest.raises(TypeError) as info:
        learn.fit(1)
    assert '_stepped' not in str(info.value)


def test_callback_errors_keep_the_exception_attributes():
    class Missing(Callback):
        def begin_fit(self): raise FileNotFoundError(2, 'No such file', 'data.csv')

    with pytest.raises(FileNotFoundError) as info:
        make_learner([Missing()]).fit(1)
    assert info.value.errno == 2 and info.value.filename == 'data.csv'
    assert any('missing' in note for note in getattr(info.value, '__notes__', []))


def test_fit_keeps_the_last_batch_values_but_not_its_graph():
    learn = make_learner()
    learn.fit(1)
    assert learn.loss.grad_fn is None and learn.pred.grad_fn is None and learn.xb is not None


def test_star_import_gives_the_public_api():
    import minilearn
    namespace = {}
    exec('from minilearn import *', namespace)
    assert set(minilearn.__all__) <= namespace.keys()
    for name in ('Learner', 'Callback', 'CudaCallback', 'BatchTransformXCallback', 'normalize_chan', 'AvgStatsCallback',
                 'ProgressCallback', 'Recorder', 'DataBunch', 'MixUp', 'LabelSmoothingCrossEntropy', 'ImageList',
                 'SplitData', 'label_by_func', 'ParamScheduler', 'combine_scheds', 'partial'):
        assert name in namespace, name


def test_find_cb_finds_by_class_subclass_and_the_course_attribute_name():
    from minilearn.callbacks.metrics import AvgStatsCallback
    from minilearn.callbacks.recorder import Recorder

    class MyStats(AvgStatsCallback):
        pass

    class CourseRecorder(Callback):  # a course-style class attached under our Recorder's attribute name
        name = 'recorder'

    stats, course = MyStats([]), CourseRecorder()
    learn = Learner(mlp(), linear_data(), F.cross_entropy, cbs=[stats, course])
    assert learn.find_cb(AvgStatsCallback) is stats and learn.find_cb(MyStats) is stats
    assert learn.find_cb(Recorder) is course
    assert learn.find_cb(TrainEvalCallback) is learn.train_eval
    learn.remove_cbs([course])
    learn.recorder = object()  # an attribute that is no attached callback is not found
    assert learn.find_cb(Recorder) is None


def test_old_import_paths_keep_working():
    import minilearn
    from minilearn.callbacks.transforms import Normalize, channel_stats, norm_stats, normalize_chan
    from minilearn.datasets import ShapesDataset, URLs, untar_data
    from minilearn.learner import Callback as OldCallback, TrainEvalCallback as OldTrainEval
    assert OldCallback is minilearn.callback.Callback and OldTrainEval is minilearn.callback.TrainEvalCallback
    assert (Normalize, channel_stats, norm_stats, normalize_chan) == (
        minilearn.Normalize, minilearn.channel_stats, minilearn.norm_stats, minilearn.normalize_chan)
    assert ShapesDataset is minilearn.data.shapes.ShapesDataset and untar_data is minilearn.untar_data
    assert URLs is minilearn.URLs


def test_order_table_places_the_library_callbacks():
    from minilearn.callback import Order
    from minilearn.callbacks.device import DeviceCallback
    from minilearn.callbacks.mixup import MixUp
    from minilearn.callbacks.transforms import BatchTransformXCallback
    assert DeviceCallback._order == Order.DEVICE < BatchTransformXCallback._order == Order.BATCH_TRANSFORM
    assert BatchTransformXCallback._order < MixUp._order == Order.MIX
