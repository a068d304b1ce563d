"""Metrics over the whole epoch: AccumMetric, the ready metrics, duck-typed (torchmetrics-style) objects, and
their columns in the loggers, trackers, progress table and checkpoints (issue 16, section 2)."""
import contextlib
import functools
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from helpers import linear_data, mlp
from minilearn.callbacks.checkpoint import CheckpointCallback, EarlyStoppingCallback, SaveModelCallback
from minilearn.callbacks.loggers import CSVLogger
from minilearn.callbacks.metrics import (AccumMetric, AvgStats, AvgStatsCallback, accuracy, balanced_accuracy,
                                         f1_score, is_epoch_metric, precision_score, recall_score, top_k_accuracy)
from minilearn.callbacks.progress import ProgressCallback
from minilearn.callback import Position
from minilearn.data.core import DataBunch, Dataset, TensorLoader
from minilearn.learner import CancelBatchException, Callback, Learner


# ---- fixed scores: the model passes its input through, so every prediction is known in advance ---------------
class PassThrough(nn.Module):
    """Returns its input (the scores); one parameter that no gradient moves, so the optimizer has something."""
    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x): return x + 0 * self.unused


def scores_and_targets(n=96, n_classes=4, seed=0):
    """Imbalanced targets (class 0 most of the time) and scores that are right about 60 % of the time."""
    g = torch.Generator().manual_seed(seed)
    targets = torch.multinomial(torch.tensor([0.55, 0.25, 0.15, 0.05]), n, replacement=True, generator=g)
    scores = torch.randn(n, n_classes, generator=g)
    right = torch.rand(n, generator=g) < 0.6
    scores[right, targets[right]] += 3.
    return scores, targets


def sorted_by_class(scores, targets):
    """Items sorted by target: batches of very uneven class mix (the first ones hold class 0 only)."""
    order = torch.argsort(targets, stable=True)
    return scores[order], targets[order]


def fixed_learner(scores, targets, metrics, bs=16, cbs=()):
    ds = Dataset(scores, targets)
    data = DataBunch(DataLoader(ds, batch_size=bs), DataLoader(ds, batch_size=bs), c_in=scores.shape[1],
                     c_out=scores.shape[1])
    learn = Learner(PassThrough(), data, F.cross_entropy, lr=0.1, cbs=[AvgStatsCallback(metrics), *cbs])
    learn.logger = lambda *a: None
    return learn


# ---- hand computations on the whole set --------------------------------------------------------------------
# 8 items, 3 classes. Predicted (argmax): [0, 0, 1, 1, 2, 0, 2, 2]; targets: [0, 0, 0, 1, 1, 1, 2, 2].
HAND_SCORES = torch.tensor([[3., 1, 0], [2, 0, 1], [0, 2, 1], [1, 3, 0], [0, 1, 2], [2, 1, 0], [0, 1, 4], [1, 0, 2]])
HAND_TARGETS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2])
# Confusion (rows target, columns predicted): [[2, 1, 0], [1, 1, 1], [0, 0, 2]].
# precision per class: 2/3, 1/2, 2/3      recall per class: 2/3, 1/3, 1      F1 = 2tp/(2tp+fp+fn): 4/6, 2/5, 4/5
HAND = {'precision_score': (2 / 3 + 1 / 2 + 2 / 3) / 3, 'recall_score': (2 / 3 + 1 / 3 + 1) / 3,
        'f1_score': (4 / 6 + 2 / 5 + 4 / 5) / 3, 'balanced_accuracy': (2 / 3 + 1 / 3 + 1) / 3,
        'f1_score_weighted': (3 * 4 / 6 + 3 * 2 / 5 + 2 * 4 / 5) / 8, 'f1_score_micro': 5 / 8,
        # top-2: the target is among the two highest scores for every item but item 2 ([0, 2, 1], target 0)
        'top_2_accuracy': 7 / 8}


def compute(metric, scores, targets, batches=3):
    """Feed `metric` the rows in `batches` chunks, as a pass would, and return compute()."""
    metric.reset()
    for s, t in zip(scores.chunk(batches), targets.chunk(batches)): metric.update(s, t)
    return float(metric.compute())


@pytest.mark.parametrize('factory', [f1_score, precision_score, recall_score, balanced_accuracy,
                                     functools.partial(f1_score, average='weighted'),
                                     functools.partial(f1_score, average='micro'),
                                     functools.partial(top_k_accuracy, 2)])
def test_ready_metrics_equal_a_hand_computation_on_the_whole_set(factory):
    metric = factory()
    assert isinstance(metric, AccumMetric) and is_epoch_metric(metric)
    assert compute(metric, HAND_SCORES, HAND_TARGETS) == pytest.approx(HAND[metric.__name__], abs=1e-12)


def test_top_k_accuracy_by_hand_for_k_1_and_k_3():
    assert compute(top_k_accuracy(1), HAND_SCORES, HAND_TARGETS) == pytest.approx(5 / 8)  # = accuracy
    assert compute(top_k_accuracy(3), HAND_SCORES, HAND_TARGETS) == 1.


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_ready_metrics_equal_scikit_learn(seed):
    sklearn_metrics = pytest.importorskip('sklearn.metrics')
    scores, targets = scores_and_targets(n=203, seed=seed)
    scores[:, 3] -= 10  # class 3 is never predicted: precision's zero division, F1 over the union of labels
    predicted = scores.argmax(1).numpy()
    y = targets.numpy()
    for average in ('macro', 'weighted', 'micro'):
        assert compute(f1_score(average), scores, targets) == pytest.approx(
            sklearn_metrics.f1_score(y, predicted, average=average, zero_division=0), abs=1e-12)
        assert compute(precision_score(average), scores, targets) == pytest.approx(
            sklearn_metrics.precision_score(y, predicted, average=average, zero_division=0), abs=1e-12)
        assert compute(recall_score(average), scores, targets) == pytest.approx(
            sklearn_metrics.recall_score(y, predicted, average=average, zero_division=0), abs=1e-12)
    assert compute(balanced_accuracy(), scores, targets) == pytest.approx(
        sklearn_metrics.balanced_accuracy_score(y, predicted), abs=1e-12)
    for k in (1, 2, 3):
        assert compute(top_k_accuracy(k), scores, targets) == pytest.approx(
            sklearn_metrics.top_k_accuracy_score(y, scores.numpy(), k=k, labels=[0, 1, 2, 3]), abs=1e-12)


def test_a_class_absent_from_targets_and_predictions_does_not_count():
    # 4 outputs, class 3 never seen: macro averages over classes 0-2 only (as scikit-learn's labels=union)
    scores = torch.cat([HAND_SCORES, torch.full((8, 1), -9.)], dim=1)
    assert compute(f1_score(), scores, HAND_TARGETS) == pytest.approx(HAND['f1_score'])
    assert compute(balanced_accuracy(), scores, HAND_TARGETS) == pytest.approx(HAND['balanced_accuracy'])


def test_targets_outside_the_classes_are_left_out_like_ignore_index():
    targets = torch.cat([HAND_TARGETS, torch.tensor([-100, -100])])
    scores = torch.cat([HAND_SCORES, torch.zeros(2, 3)])
    assert compute(f1_score(), scores, targets) == pytest.approx(HAND['f1_score'])


# ---- AccumMetric in a fit ------------------------------------------------------------------------------------
def per_batch_f1(pred, yb):
    """The old way: F1 of each batch, then AvgStats' batch-size-weighted mean."""
    return torch.tensor(float(_f1_macro(pred.argmax(1), yb)))


def _f1_macro(predicted, targets):
    classes = torch.unique(torch.cat([predicted, targets]))
    f1 = [2 * ((predicted == c) & (targets == c)).sum().double() / ((predicted == c).sum() + (targets == c).sum())
          for c in classes]
    return torch.stack(f1).mean()


def test_f1_over_batches_of_uneven_class_mix_is_the_whole_set_value_not_the_mean_of_batches():
    scores, targets = sorted_by_class(*scores_and_targets())
    learn = fixed_learner(scores, targets, [f1_score(), balanced_accuracy(), per_batch_f1])
    learn.fit(2)
    whole = float(_f1_macro(scores.argmax(1), targets))
    for row in learn.avg_stats.history:
        for prefix in ('train', 'valid'):
            assert row[f'{prefix}_f1_score'] == pytest.approx(whole, abs=1e-12)
            assert abs(row[f'{prefix}_per_batch_f1'] - whole) > 0.05  # what averaging per-batch values gave
    recall = [((scores.argmax(1) == c) & (targets == c)).sum().item() / (targets == c).sum().item() for c in range(4)]
    assert learn.avg_stats.history[-1]['valid_balanced_accuracy'] == pytest.approx(sum(recall) / 4, abs=1e-12)


def test_accum_metric_calls_func_once_per_pass_with_every_prediction_and_the_activation():
    calls = []

    def spy(preds, targets):
        calls.append((preds.clone(), targets.clone()))
        return preds.sum(1).mean()

    scores, targets = scores_and_targets(n=40)
    learn = fixed_learner(scores, targets, [AccumMetric(spy, name='prob_sum', activation='softmax')], bs=16)
    learn.fit(1)
    assert len(calls) == 2  # training and validation, once each (3 batches of 16, 16, 8)
    for preds, seen in calls:
        torch.testing.assert_close(preds, scores.softmax(1))
        assert torch.equal(seen, targets)
    assert learn.avg_stats.history[0]['valid_prob_sum'] == pytest.approx(1.)
    argmax = AccumMetric(lambda p, t: (p == t).double().mean(), name='acc', activation='argmax')
    assert compute(argmax, HAND_SCORES, HAND_TARGETS) == pytest.approx(5 / 8)
    assert compute(AccumMetric(lambda p, t: p.max(), activation=torch.sigmoid), HAND_SCORES, HAND_TARGETS) == \
        pytest.approx(torch.sigmoid(torch.tensor(4.)).item())


def test_accum_metric_keeps_predictions_on_their_device_and_to_cpu_on_the_host():
    metric = AccumMetric(lambda p, t: p.mean())
    metric.update(HAND_SCORES, HAND_TARGETS)
    assert metric.preds[0].device.type == 'cpu' and not metric.preds[0].requires_grad
    assert metric.__name__ == '<lambda>' and 'AccumMetric' in repr(metric)
    assert compute(AccumMetric(lambda p, t: p.mean(), to_cpu=True), HAND_SCORES, HAND_TARGETS) == \
        pytest.approx(HAND_SCORES.mean().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_accum_metric_on_cuda_keeps_the_device_or_copies_to_pinned_host_memory():
    scores, targets = HAND_SCORES.cuda(), HAND_TARGETS.cuda()
    on_device, on_host = f1_score(), AccumMetric(f1_score().func, to_cpu=True)
    for metric in (on_device, on_host):
        for s, t in zip(scores.chunk(3), targets.chunk(3)): metric.update(s, t)
    assert on_device.preds[0].is_cuda and not on_host.preds[0].is_cuda and on_host.preds[0].is_pinned()
    assert float(on_device.compute()) == pytest.approx(HAND['f1_score'])
    assert float(on_host.compute()) == pytest.approx(HAND['f1_score'])


# ---- duck-typed metrics (torchmetrics' protocol) ---------------------------------------------------------------
class CountingF1:
    """A metric object with torchmetrics' protocol and no torchmetrics: confusion counts updated per batch."""
    def __init__(self, n_classes):
        self.n_classes, self.moves = n_classes, []
        self.reset()

    def reset(self): self.confusion = torch.zeros(self.n_classes, self.n_classes, dtype=torch.long)

    def to(self, device):
        self.moves.append(torch.device(device))
        self.confusion = self.confusion.to(device)
        return self

    def update(self, preds, target):
        index = target * self.n_classes + preds.argmax(1)
        self.confusion += torch.bincount(index, minlength=self.n_classes ** 2).reshape(self.n_classes, -1)

    def compute(self):
        tp, seen = self.confusion.diag(), self.confusion.sum(0) + self.confusion.sum(1)
        return (2 * tp[seen > 0] / seen[seen > 0]).mean()


def test_a_duck_typed_metric_object_is_updated_per_batch_moved_to_the_device_and_computed_per_pass():
    scores, targets = sorted_by_class(*scores_and_targets())
    mine = CountingF1(4)
    learn = fixed_learner(scores, targets, [mine, accuracy])
    learn.fit(2)
    whole = float(_f1_macro(scores.argmax(1), targets))
    assert [n for n in learn.avg_stats.metric_names if 'Counting' in n] == ['train_CountingF1', 'valid_CountingF1']
    for row in learn.avg_stats.history:
        assert row['train_CountingF1'] == pytest.approx(whole) and row['valid_CountingF1'] == pytest.approx(whole)
        assert row['valid_accuracy'] == pytest.approx(float((scores.argmax(1) == targets).double().mean()))
    # each pass works on its own copy, moved once to the batches' device (not per batch); the user's object is
    # left as it was
    copies = [s.metrics[0] for s in (learn.avg_stats.train_stats, learn.avg_stats.valid_stats)]
    assert copies[0] is not copies[1] and mine not in copies
    assert all(c.moves == [torch.device('cpu')] for c in copies)
    assert mine.moves == [] and mine.confusion.sum() == 0


def test_what_is_not_a_metric_is_refused_with_the_fix():
    with pytest.raises(TypeError, match=r'f1_score builds a metric: pass f1_score\(\)'):
        AvgStatsCallback([accuracy, f1_score])
    with pytest.raises(TypeError, match=r'balanced_accuracy builds a metric: pass balanced_accuracy\(\)'):
        AvgStatsCallback(balanced_accuracy)
    with pytest.raises(TypeError, match=r'metric CountingF1 is a class: pass an instance'):
        AvgStatsCallback([CountingF1])
    with pytest.raises(TypeError, match='averaged over batches, or an object with update'):
        AvgStatsCallback(['accuracy'])
    with pytest.raises(ValueError, match="two metrics are named 'f1_score'.*name="):
        AvgStatsCallback([f1_score(), f1_score()])
    AvgStatsCallback([f1_score(), f1_score('weighted'), AccumMetric(f1_score().func, name='f1_again')])
    with pytest.raises(ValueError, match="average must be one of"):
        f1_score('binary')
    with pytest.raises(ValueError, match='k must be a positive int'):
        top_k_accuracy(0)
    with pytest.raises(ValueError, match='activation must be None'):
        AccumMetric(accuracy, activation='tanh')
    with pytest.raises(TypeError, match='func must be callable'):
        AccumMetric('f1')


def test_unsuitable_predictions_are_named_when_the_pass_ends():
    with pytest.raises(ValueError, match=r'top_k_accuracy\(k=5\) needs at least 5 classes; the model outputs 3'):
        compute(top_k_accuracy(5), HAND_SCORES, HAND_TARGETS)
    with pytest.raises(ValueError, match=r'needs scores of shape \(N, C, ...\) with C >= 2 classes, got shape \(8,\)'):
        compute(f1_score(), HAND_SCORES[:, 0], HAND_TARGETS)
    with pytest.raises(ValueError, match='integer class indices of shape'):
        compute(balanced_accuracy(), HAND_SCORES, HAND_TARGETS.float())
    with pytest.raises(TypeError, match='keeps tensors'):
        f1_score().update((HAND_SCORES,), HAND_TARGETS)
    stats = AvgStats([AccumMetric(lambda p, t: p.mean(0), name='per_class')], in_train=False)

    class Run: pass
    run = Run()
    run.xb, run.yb, run.pred, run.loss = HAND_SCORES, HAND_TARGETS, HAND_SCORES, torch.tensor(1.)
    stats.accumulate(run)
    with pytest.raises(ValueError, match=r"metric 'per_class' returned a tensor of shape \(3,\); a column holds one"):
        stats.avg_stats


def test_before_any_batch_the_values_are_nan():
    stats = AvgStats([accuracy, f1_score()], in_train=True)
    assert all(math.isnan(v) for v in stats.avg_stats) and len(stats.avg_stats) == 3
    assert math.isnan(f1_score().compute())


# ---- the columns everywhere -----------------------------------------------------------------------------------
def test_loggers_trackers_and_the_progress_table_see_the_new_columns(tmp_path):
    scores, targets = sorted_by_class(*scores_and_targets())
    learn = fixed_learner(scores, targets, [accuracy, f1_score(), top_k_accuracy(2)], cbs=[
        CSVLogger(tmp_path / 'history.csv'), ProgressCallback(interactive=False),
        SaveModelCallback(monitor='valid_f1_score', mode='max'),
        EarlyStoppingCallback(monitor='valid_f1_score', mode='max', patience=2)])
    learn.path = tmp_path
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.warns(UserWarning, match='no improvement of valid_f1_score'):
        learn.fit(10)  # fixed predictions: F1 never improves after the first epoch, so it stops after epoch 2
    history = learn.avg_stats.history
    assert len(history) == 3 and learn.early_stopping.best == pytest.approx(history[0]['valid_f1_score'])
    rows = learn.csv_logger.read()
    assert [r['valid_f1_score'] for r in rows] == pytest.approx([r['valid_f1_score'] for r in history], rel=1e-6)
    assert [r['train_top_2_accuracy'] for r in rows] == pytest.approx([r['train_top_2_accuracy'] for r in history])
    header = out.getvalue().splitlines()[0].split()
    assert {'train_f1_score', 'valid_f1_score', 'valid_top_2_accuracy'} <= set(header)
    assert f"{history[0]['valid_f1_score']:.6f}" in out.getvalue()
    assert (tmp_path / 'models' / 'model.pth').is_file()
    learn.remove_cbs(learn.early_stopping)
    with pytest.raises(ValueError, match="unknown monitor 'valid_f1'.*valid_f1_score"):
        learn.fit(1, cbs=[EarlyStoppingCallback(monitor='valid_f1')])


def test_tensorboard_writes_the_new_columns(tmp_path):
    pytest.importorskip('tensorboard')
    from minilearn.callbacks.loggers import TensorBoardCallback
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    scores, targets = sorted_by_class(*scores_and_targets())
    learn = fixed_learner(scores, targets, [f1_score()], cbs=[TensorBoardCallback(tmp_path / 'runs')])
    learn.fit(2)
    events = EventAccumulator(str(tmp_path / 'runs'))
    events.Reload()
    values = [e.value for e in events.Scalars('epoch/valid_f1_score')]
    assert values == pytest.approx([r['valid_f1_score'] for r in learn.avg_stats.history], rel=1e-6)


# ---- checkpoints -------------------------------------------------------------------------------------------------
class SaveAt(Callback):
    """learn.save() after training batch `batch` of epoch `epoch` (a mid-epoch checkpoint)."""
    _order = 100

    def __init__(self, path, epoch, batch): self.path, self.epoch_at, self.batch_at = path, epoch, batch

    def after_batch(self):
        if self.in_train and self.epoch == self.epoch_at and self.iter == self.batch_at: self.run.save(self.path)


def metrics_for_resume():
    return [accuracy, f1_score(), balanced_accuracy(), AccumMetric(f1_score().func, name='f1_host', to_cpu=True)]


def resume_learner():
    torch.manual_seed(0)
    shuffled = linear_data(n_train=160, n_valid=48)
    data = DataBunch(TensorLoader(shuffled.train_ds.x, shuffled.train_ds.y, bs=16),  # in order, resumable
                     DataLoader(shuffled.valid_ds, batch_size=16))
    learn = Learner(mlp(), data, F.cross_entropy, lr=0.3, cbs=[AvgStatsCallback(metrics_for_resume())])
    learn.logger = lambda *a: None
    return learn


def test_a_mid_epoch_checkpoint_holds_the_pass_so_far_and_a_resume_gives_the_same_figures(tmp_path):
    AvgStats.fold_every, saved_fold = 4, AvgStats.fold_every  # folds before and after the checkpoint
    try:
        straight = resume_learner()
        straight.fit(3, cbs=[SaveAt(tmp_path / 'mid.pth', epoch=1, batch=5)])
        state = torch.load(tmp_path / 'mid.pth', weights_only=True)['callbacks']['avg_stats']
        assert state['partial']['epoch'] == 1 and state['partial']['train']['n_batches'] == 6
        assert state['partial']['train']['count'] == 96 and state['partial']['valid']['count'] == 0
        kept = state['partial']['train']['metrics'][1]
        assert kept['preds'].shape == (96, 3) and torch.equal(kept['targets'], straight.data.train_ds.y[:96])

        resumed = resume_learner()
        resumed.fit(3, resume=tmp_path / 'mid.pth')
        assert resumed.position == Position(epoch=1, batches_done=6)
    finally:
        AvgStats.fold_every = saved_fold
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != 'time'} for r in rows]
    assert drop_time(resumed.avg_stats.history) == drop_time(straight.avg_stats.history)  # bit for bit


def test_a_batch_cancelled_before_the_loss_does_not_make_a_resume_drop_the_saved_part(tmp_path):
    class SkipFirst(Callback):
        def begin_batch(self):
            if self.in_train and (self.epoch, self.iter) == (0, 0): raise CancelBatchException()

    class Stop(Callback):
        def after_batch(self):
            if self.in_train and (self.epoch, self.iter) == (0, 3): raise KeyboardInterrupt

    def learner(folder, cbs=()):
        torch.manual_seed(0)
        learn = Learner(mlp(), linear_data(n_train=96, bs=16), F.cross_entropy, lr=0.3, path=folder,
                        cbs=[AvgStatsCallback(metrics_for_resume()), SkipFirst(), *cbs,
                             CheckpointCallback(every_n_batches=2, signals=None)])
        learn.logger = lambda *a: None
        return learn

    straight = learner(tmp_path / 'straight')
    straight.fit(1)
    stopped = learner(tmp_path / 'stopped', [Stop()])
    with pytest.raises(KeyboardInterrupt):
        stopped.fit(1)
    saved = torch.load(tmp_path / 'stopped' / 'models' / 'checkpoint.pth', weights_only=True)
    assert saved['iter'] == 2 and saved['callbacks']['avg_stats']['partial']['train']['n_batches'] == 1
    resumed = learner(tmp_path / 'stopped')
    resumed.fit(1, resume=tmp_path / 'stopped' / 'models' / 'checkpoint.pth')
    assert resumed.avg_stats.train_stats.count == 96 - 16  # the batch done before the stop is counted
    drop_time = lambda rows: [{k: v for k, v in r.items() if k != 'time'} for r in rows]
    assert drop_time(resumed.avg_stats.history) == drop_time(straight.avg_stats.history)


def test_a_fit_that_starts_the_epoch_again_drops_the_saved_part(tmp_path):
    straight = resume_learner()
    straight.fit(2, cbs=[SaveAt(tmp_path / 'mid.pth', epoch=1, batch=5)])
    again = resume_learner()
    with pytest.warns(UserWarning, match=r'resume=path'):
        again.load(tmp_path / 'mid.pth')
    again.fit(2, start_epoch=1)  # the loop runs epoch 1 from its first batch
    assert again.avg_stats.train_stats.count == 160 and again.avg_stats.train_stats.metrics[1].preds[0].shape[0] == 160


def test_at_an_epoch_boundary_only_the_history_is_saved(tmp_path):
    learn = resume_learner()
    learn.path = tmp_path
    learn.fit(2, cbs=[SaveModelCallback(every_epoch=True)])
    state = torch.load(tmp_path / 'models' / 'model_0.pth', weights_only=True)['callbacks']['avg_stats']
    assert set(state) == {'history'} and set(learn.avg_stats.state_dict()) == {'history'}
