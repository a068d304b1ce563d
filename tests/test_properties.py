"""Property-based tests (hypothesis) where hand-picked cases leave gaps: the losses' reduction contract against
F.cross_entropy, the mixers on any batch shape, the loaders' orders for any size, shard count and resume position,
the whole-pass metrics against scikit-learn, and checkpoints with any byte changed.

Derandomized, so CI runs the same cases every time; each property runs `max_examples` cases."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as sklearn_metrics

from minilearn.callbacks.metrics import balanced_accuracy, f1_score, precision_score, recall_score, top_k_accuracy
from minilearn.callbacks.mixup import CutMix, MixUp
from minilearn.data.core import Dataset, TensorLoader
from minilearn.data.sampler import ResumableLoader
from minilearn.losses import LabelSmoothingCrossEntropy
from minilearn.serialization import CheckpointError, read_checkpoint, save_learner

CASES = settings(max_examples=30, deadline=None, derandomize=True)


# ---- losses ------------------------------------------------------------------------------------------------
@CASES
@given(n=st.integers(1, 7), c=st.integers(2, 6), eps=st.floats(0, 0.95), weighted=st.booleans(),
       n_ignored=st.integers(0, 7), reduction=st.sampled_from(['mean', 'sum', 'none']), seed=st.integers(0, 2 ** 16))
def test_label_smoothing_matches_f_cross_entropy(n, c, eps, weighted, n_ignored, reduction, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64)
    target = torch.randint(0, c, (n,), generator=g)
    target[:min(n_ignored, n)] = -1
    weight = torch.rand(c, generator=g, dtype=torch.float64) + 0.1 if weighted else None
    ours = LabelSmoothingCrossEntropy(eps, reduction=reduction, ignore_index=-1, weight=weight)(logits, target)
    theirs = F.cross_entropy(logits, target, weight=weight, ignore_index=-1, reduction=reduction, label_smoothing=eps)
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, equal_nan=True)  # all ignored with 'mean': NaN in both


@CASES
@given(n=st.integers(1, 7), c=st.integers(2, 6), eps=st.floats(0, 0.95), reduction=st.sampled_from(['mean', 'sum']),
       seed=st.integers(0, 2 ** 16))
def test_label_smoothing_with_probability_targets_matches_f_cross_entropy(n, c, eps, reduction, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64)
    probs = torch.rand(n, c, generator=g, dtype=torch.float64).softmax(1)
    ours = LabelSmoothingCrossEntropy(eps, reduction=reduction)(logits, probs)
    theirs = F.cross_entropy(logits, probs, reduction=reduction, label_smoothing=eps)
    assert torch.allclose(ours, theirs)


# ---- mixers --------------------------------------------------------------------------------------------------
@CASES
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=4), alpha=st.floats(0.05, 4),
       per_sample=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_mixup_mixes_any_batch_shape_item_by_item(shape, alpha, per_sample, seed):
    torch.manual_seed(seed)
    xb = torch.randn(*shape, dtype=torch.float64)
    perm = torch.randperm(shape[0])
    mixer = MixUp(alpha, per_sample=per_sample)
    drawn = mixer.draw(xb)
    mixed, lam = mixer.mix(xb, xb[perm], drawn)
    assert mixed.shape == xb.shape and lam.shape == (shape[0],) and bool(((lam >= 0) & (lam <= 1)).all())
    if per_sample: assert bool((lam >= 0.5).all())  # max(λ, 1−λ): each mix dominated by its own sample
    for i in range(shape[0]):
        assert torch.allclose(mixed[i], lam[i].to(xb.dtype) * xb[i] + (1 - lam[i].to(xb.dtype)) * xb[perm[i]])


@CASES
@given(n=st.integers(1, 5), c=st.integers(1, 3), h=st.integers(1, 9), w=st.integers(1, 9), alpha=st.floats(0.05, 4),
       seed=st.integers(0, 2 ** 16))
def test_cutmix_pastes_one_box_whose_share_is_one_minus_lambda(n, c, h, w, alpha, seed):
    torch.manual_seed(seed)
    xb, other = torch.zeros(n, c, h, w), torch.ones(n, c, h, w)
    mixer = CutMix(alpha)
    mixed, lam = mixer.mix(xb, other, mixer.draw(xb))
    assert mixed.shape == xb.shape and lam.shape == (n,)
    assert bool(((mixed == 0) | (mixed == 1)).all())  # each pixel from one image or the other
    box = mixed[0, 0] == 1
    assert torch.equal(mixed, box.expand_as(mixed).float())  # the same box in every item and channel
    assert abs(float(lam[0]) - (1 - float(box.float().mean()))) < 1e-6  # exact_area: λ is the kept share
    if box.any():  # one rectangle
        rows, cols = box.any(1).nonzero().flatten(), box.any(0).nonzero().flatten()
        assert int(box.sum()) == len(rows) * len(cols)
        assert len(rows) == int(rows[-1] - rows[0]) + 1 and len(cols) == int(cols[-1] - cols[0]) + 1


# ---- loaders -------------------------------------------------------------------------------------------------
def _loader(kind, n, bs, shuffle, drop_last, seed):
    x = torch.arange(n).float().unsqueeze(1)
    y = torch.arange(n)
    if kind == 'tensor': return TensorLoader(x, y, bs=bs, shuffle=shuffle, drop_last=drop_last, seed=seed)
    return ResumableLoader(Dataset(x, y), batch_size=bs, shuffle=shuffle, drop_last=drop_last, seed=seed)


def _epoch(dl):
    return [yb.tolist() for _, yb in dl]


@CASES
@given(kind=st.sampled_from(['tensor', 'resumable']), n=st.integers(1, 40), bs=st.integers(1, 12),
       shuffle=st.booleans(), drop_last=st.booleans(), epoch=st.integers(0, 3), resume_at=st.integers(0, 40),
       seed=st.integers(0, 1000))
def test_loader_epochs_hold_every_item_once_and_resume_in_the_same_order(kind, n, bs, shuffle, drop_last, epoch,
                                                                       resume_at, seed):
    dl = _loader(kind, n, bs, shuffle, drop_last, seed)
    dl.set_epoch(epoch)
    batches = _epoch(dl)
    items = [i for b in batches for i in b]
    assert len(batches) == len(dl) and all(len(b) == bs for b in batches[:-1])
    if drop_last: assert len(items) == n - n % bs and len(set(items)) == len(items)
    else: assert sorted(items) == list(range(n))  # every item exactly once
    # a fresh loader given the position after `done` batches yields the rest, the same batches
    done = min(resume_at, len(batches))
    state = {'seed': seed, 'epoch': epoch, 'batches_done': done, 'n_items': n, 'batch_size': bs, 'shuffle': shuffle}
    resumed = _loader(kind, n, bs, shuffle, drop_last, seed=12345)
    resumed.load_state_dict(state)
    rest = _epoch(resumed)
    if done < len(batches): assert rest == batches[done:]
    else: assert len(rest) == len(batches)  # the epoch was complete: the next one starts


@CASES
@given(kind=st.sampled_from(['tensor', 'resumable']), n=st.integers(1, 40), bs=st.integers(1, 8),
       world=st.integers(1, 4), epoch=st.integers(0, 3), resume_at=st.integers(0, 12), seed=st.integers(0, 1000))
def test_training_shards_cover_every_item_and_each_rank_resumes_its_own(kind, n, bs, world, epoch, resume_at, seed):
    full = _loader(kind, n, bs, True, False, seed)
    full.set_epoch(epoch)
    shard = (lambda r: full.shard(r, world, train=True)) if kind == 'tensor' else (lambda r: full.shard(r, world))
    per_rank = [_epoch(shard(r)) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # every rank runs as many steps (padded)
    items = [i for batches in per_rank for b in batches for i in b]
    assert set(items) == set(range(n)) and len(items) == -(-n // world) * world
    counts = np.bincount(items, minlength=n)
    assert counts.max() - counts.min() <= 1  # the padding repeats the fewest items possible
    for r in range(world):  # a restart after `done` batches: each rank's shard continues where it was
        done = min(resume_at, len(per_rank[r]))
        state = {'seed': seed, 'epoch': epoch, 'batches_done': done, 'n_items': n, 'batch_size': bs, 'shuffle': True}
        restarted = _loader(kind, n, bs, True, False, seed=777)
        restarted.load_state_dict(state)
        sharded = restarted.shard(r, world, train=True) if kind == 'tensor' else restarted.shard(r, world)
        rest = _epoch(sharded)
        if done < len(per_rank[r]): assert rest == per_rank[r][done:]


# ---- whole-pass metrics against scikit-learn ---------------------------------------------------------------
def _compute(metric, scores, targets, batches):
    metric.reset()
    for s, t in zip(scores.chunk(batches), targets.chunk(batches)): metric.update(s, t)
    return float(metric.compute())


@CASES
@given(n=st.integers(1, 60), c=st.integers(2, 6), batches=st.integers(1, 4), never=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_whole_pass_metrics_equal_scikit_learn_on_random_predictions(n, c, batches, never, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(n, c, generator=g, dtype=torch.float64)
    if never: scores[:, -1] -= 100  # a class never predicted: zero divisions
    targets = torch.randint(0, c, (n,), generator=g)
    predicted, y = scores.argmax(1).numpy(), targets.numpy()
    for average in ('macro', 'weighted', 'micro'):
        for ours, theirs in ((f1_score, sklearn_metrics.f1_score), (precision_score, sklearn_metrics.precision_score),
                             (recall_score, sklearn_metrics.recall_score)):
            assert _compute(ours(average), scores, targets, batches) == pytest.approx(
                theirs(y, predicted, average=average, zero_division=0), abs=1e-12), (ours.__name__, average)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # scikit-learn warns when a predicted class never occurs in y
        expected = sklearn_metrics.balanced_accuracy_score(y, predicted)
    assert _compute(balanced_accuracy(), scores, targets, batches) == pytest.approx(expected, abs=1e-12)
    if c == 2:  # scikit-learn takes two-class scores as one column only: top-1 is the accuracy
        assert _compute(top_k_accuracy(1), scores, targets, batches) == pytest.approx(
            sklearn_metrics.accuracy_score(y, predicted), abs=1e-12)
    for k in range(1, c if c > 2 else 1):
        assert _compute(top_k_accuracy(k), scores, targets, batches) == pytest.approx(
            sklearn_metrics.top_k_accuracy_score(y, scores.numpy(), k=k, labels=list(range(c))), abs=1e-12)


# ---- checkpoints with any byte changed -------------------------------------------------------------------------
@pytest.fixture(scope='module')
def checkpoint_bytes(tmp_path_factory):
    from helpers import linear_data, mlp
    from minilearn.learner import Learner
    torch.manual_seed(0)
    learn = Learner(mlp(), linear_data(n_train=32, n_valid=16), F.cross_entropy, lr=0.1,
                    path=tmp_path_factory.mktemp('ckpt'))
    learn.fit(1)
    path = save_learner(learn, 'ckpt')
    return path, path.read_bytes(), read_checkpoint(path).state


@settings(max_examples=80, deadline=None, derandomize=True)
@given(where=st.floats(0, 1, exclude_max=True), xor=st.integers(1, 255))
def test_any_changed_byte_is_refused_or_changes_nothing(checkpoint_bytes, tmp_path_factory, where, xor):
    from test_faults import same_tree
    path, good, state = checkpoint_bytes
    data = bytearray(good)
    data[int(where * len(data))] ^= xor
    damaged = path.with_name('damaged.pth')
    damaged.write_bytes(bytes(data))
    try:
        loaded = read_checkpoint(damaged).state
    except CheckpointError as e:
        assert str(damaged) in str(e)
        return
    assert same_tree(loaded, state)  # a byte the contents do not depend on (zip padding, a header field)
