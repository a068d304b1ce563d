"""ClassificationInterpretation against hand counts, and its plots rendered headless."""
import io

import matplotlib.figure
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from minilearn.callbacks.transforms import BatchTransformXCallback, normalize_chan
from minilearn.data.core import DataBunch, Dataset
from minilearn.interpret import ClassificationInterpretation
from minilearn.predictions import get_preds
from minilearn.learner import Learner
from test_inference import IMAGE_STATS, colour_learner

VOCAB = ['blue', 'green', 'red']


@pytest.fixture(scope='module')
def interp_and_learner(tmp_path_factory):
    learn = colour_learner(tmp_path_factory.mktemp('colours'), n_valid=6, confusing_every=2)
    return ClassificationInterpretation.from_learner(learn), learn


def hand_confusion(actual, predicted, n):
    counts = [[0] * n for _ in range(n)]
    for a, p in zip(actual, predicted): counts[a][p] += 1
    return counts


def png_bytes(fig):
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png')
    return buffer.getvalue()


def test_confusion_matrix_against_a_hand_count(interp_and_learner):
    interp, learn = interp_and_learner
    preds, targets = get_preds(learn)
    cm = interp.confusion_matrix()
    assert cm.tolist() == hand_confusion(targets.tolist(), preds.argmax(1).tolist(), 3)
    assert cm.sum() == len(targets) == 18
    assert cm.diag().sum() < 18  # the confusing images are misclassified: an interesting matrix


def test_confusion_matrix_rows_actual_columns_predicted():
    preds = F.one_hot(torch.tensor([1, 1, 2, 0]), 3).float()
    interp = ClassificationInterpretation(None, preds, torch.tensor([0, 1, 2, 0]), torch.zeros(4), VOCAB)
    assert interp.confusion_matrix().tolist() == [[1, 1, 0], [0, 1, 0], [0, 0, 1]]
    assert interp.most_confused() == [('blue', 'green', 1)]


def test_most_confused_sorted_and_thresholded(interp_and_learner):
    interp, _ = interp_and_learner
    cm = interp.confusion_matrix()
    expected = sorted(((VOCAB[a], VOCAB[p], int(cm[a, p])) for a in range(3) for p in range(3)
                       if a != p and cm[a, p] >= 1), key=lambda t: -t[2])
    assert interp.most_confused() == expected and expected
    top = expected[0][2]
    assert interp.most_confused(min_val=top) == [t for t in expected if t[2] >= top]
    assert interp.most_confused(min_val=top + 1) == []


def test_top_losses_order_and_values(interp_and_learner):
    interp, learn = interp_and_learner
    preds, targets = get_preds(learn, act=lambda t: t)
    per_item = F.cross_entropy(preds, targets, reduction='none')
    losses, indices = interp.top_losses(5)
    torch.testing.assert_close(losses, per_item[indices])
    assert losses.tolist() == sorted(per_item.tolist(), reverse=True)[:5]
    smallest, _ = interp.top_losses(3, largest=False)
    assert smallest.tolist() == sorted(per_item.tolist())[:3]
    assert len(interp.top_losses()[0]) == 18


def test_plot_confusion_matrix_shows_names_and_counts(interp_and_learner):
    interp, _ = interp_and_learner
    fig = interp.plot_confusion_matrix()
    assert isinstance(fig, matplotlib.figure.Figure)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == VOCAB
    texts = [t.get_text() for t in ax.texts]
    assert sorted(map(int, texts)) == sorted(interp.confusion_matrix().flatten().tolist())
    normalized = interp.plot_confusion_matrix(normalize=True)
    row0 = [float(t.get_text()) for t in normalized.axes[0].texts[:3]]
    assert sum(row0) == pytest.approx(1, abs=0.02)
    assert png_bytes(fig).startswith(b'\x89PNG')


def test_plot_top_losses_titles_and_denormalized_images(interp_and_learner):
    interp, learn = interp_and_learner
    fig = interp.plot_top_losses(4)
    assert isinstance(fig, matplotlib.figure.Figure)
    losses, indices = interp.top_losses(4)
    shown = [ax for ax in fig.axes if ax.images]
    assert len(shown) == 4
    for ax, loss, i in zip(shown, losses.tolist(), indices.tolist()):
        predicted, actual = int(interp.preds[i].argmax()), int(interp.targets[i])
        first, second = ax.get_title().split('\n')
        assert first == f'{VOCAB[predicted]}/{VOCAB[actual]}'
        assert second == f'{loss:.2f} / {float(interp.preds[i, predicted]):.2f}'
        mean, std = (torch.tensor(s).reshape(3, 1, 1) for s in IMAGE_STATS)
        raw = interp.inputs[i] * std + mean  # the item before normalization
        torch.testing.assert_close(torch.as_tensor(ax.images[0].get_array()), raw.permute(1, 2, 0))
    assert png_bytes(fig).startswith(b'\x89PNG')


def test_plot_top_losses_single_channel_with_normalize_chan_partial():
    from functools import partial
    x, y = torch.rand(6, 1, 5, 5), torch.tensor([0, 1, 0, 1, 0, 1])
    data = DataBunch(DataLoader(Dataset(x, y), batch_size=3), DataLoader(Dataset(x, y), batch_size=3))
    model = nn.Sequential(nn.Flatten(), nn.Linear(25, 2))
    learn = Learner(model, data, F.cross_entropy,
                    cbs=[BatchTransformXCallback(partial(normalize_chan, mean=torch.tensor([0.3]), std=torch.tensor([0.2])))])
    interp = ClassificationInterpretation.from_learner(learn)
    fig = interp.plot_top_losses(2)
    _, indices = interp.top_losses(2)
    image = next(ax for ax in fig.axes if ax.images).images[0]
    assert image.get_cmap().name == 'gray'
    torch.testing.assert_close(torch.as_tensor(image.get_array()), x[indices[0], 0])


def test_from_learner_needs_a_classification_loss():
    x, y = torch.randn(4, 2), torch.randn(4, 1)
    data = DataBunch(DataLoader(Dataset(x, y), batch_size=2), DataLoader(Dataset(x, y), batch_size=2))
    with pytest.raises(ValueError, match='classification loss'):
        ClassificationInterpretation.from_learner(Learner(nn.Linear(2, 1), data, F.mse_loss))
