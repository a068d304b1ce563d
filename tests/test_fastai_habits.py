"""What a fastai user types works here too (issue 23): show_batch(data), learn.show_batch(), figsize= on the
interpretation plots, learn.export() with a default path; and the plots say what they show."""
import io

import pytest
import torch
import torch.nn.functional as F

from helpers import linear_data, mlp
from minilearn import (AvgStatsCallback, ClassificationInterpretation, Recorder, load_predictor, shapes_databunch,
                       show_batch)
from minilearn.learner import Learner
from test_export import TinyNet, trained_like, valid_files
from test_inference import colour_learner


def _titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes if ax.get_title()]


@pytest.fixture(scope='module')
def shapes():
    return shapes_databunch(n_train=32, n_valid=16, bs=16, size=16)


def test_show_batch_of_a_databunch_is_its_show_batch(shapes):
    # show_batch(data) raised "TypeError: object of type 'DataBunch' has no len()"
    titles = _titles(show_batch(shapes, n=4))
    assert titles == _titles(shapes.show_batch(n=4)) and len(titles) == 4
    assert set(titles) <= set(shapes.vocab)  # class names, not indices
    with pytest.raises(TypeError, match=r'show_batch\(xb, yb\)'):
        show_batch(shapes, torch.zeros(4))
    with pytest.raises(TypeError, match='one_batch'):
        show_batch(iter(shapes.train_dl))


def test_learner_show_batch_shows_its_data(shapes):
    learn = Learner(TinyNet(10), shapes, F.cross_entropy)
    assert _titles(learn.show_batch(n=4)) == _titles(shapes.show_batch(n=4))
    assert _titles(learn.show_batch(n=3, valid=True)) == _titles(shapes.show_batch(n=3, valid=True))


def test_interpretation_plots_take_figsize(tmp_path):
    learn = colour_learner(tmp_path, n_valid=6)
    interp = ClassificationInterpretation.from_learner(learn)
    assert tuple(interp.plot_top_losses(4, figsize=(8, 8)).get_size_inches()) == (8, 8)
    assert tuple(interp.plot_confusion_matrix(figsize=(5, 4)).get_size_inches()) == (5, 4)
    assert tuple(learn.show_results(4, figsize=(6, 3)).get_size_inches()) == (6, 3)
    # without figsize the sizes stay as they were
    assert tuple(interp.plot_top_losses(4).get_size_inches()) == (6, 6)


def test_normalized_confusion_matrix_is_titled_as_such(tmp_path):
    interp = ClassificationInterpretation.from_learner(colour_learner(tmp_path, n_valid=6))
    counts, fractions = _titles(interp.plot_confusion_matrix()), _titles(interp.plot_confusion_matrix(normalize=True))
    assert counts == ['Confusion matrix: counts']
    assert fractions == ['Confusion matrix, normalized: fraction of each actual class']


def test_export_without_a_path_writes_export_pt2(tmp_path, monkeypatch):
    learn = colour_learner(tmp_path / 'data', model=trained_like(TinyNet()))
    monkeypatch.chdir(tmp_path)
    path = learn.export()  # fastai writes export.pkl; ours is a torch.export program
    assert path.resolve() == (tmp_path / 'export.pt2').resolve() and (tmp_path / 'export.json').is_file()
    predictor = load_predictor('export.pt2')
    files = valid_files(tmp_path)
    assert files
    for f in files:
        torch.testing.assert_close(predictor.predict(f)[2], learn.predict(f)[2], rtol=0, atol=1e-6)


def _fit(epochs: int = 3) -> Learner:
    learn = Learner(mlp(), linear_data(n_train=64, n_valid=32, bs=16), F.cross_entropy, lr=0.1,
                    cbs=[AvgStatsCallback(), Recorder()])
    learn.logger = lambda *a: None
    learn.fit(epochs)
    return learn


def _epoch_marks(ax) -> list[float]:
    marks = [c for c in ax.collections if c.get_gid() == 'epoch_ends']
    assert len(marks) == 1
    return [float(segment[0][0]) for segment in marks[0].get_segments()]


def test_loss_and_lr_plots_have_titles_and_epoch_marks():
    learn = _fit(3)  # 4 training batches per epoch
    loss_ax = learn.recorder.plot_loss().axes[0]
    assert loss_ax.get_title() == 'Training loss per batch, validation loss per epoch'
    assert _epoch_marks(loss_ax) == [3.5, 7.5, 11.5]
    top = loss_ax.child_axes[0]  # the epoch numbers along the top
    assert [t.get_text() for t in top.get_xticklabels()] == ['1', '2', '3']
    lr_ax = learn.recorder.plot_lr().axes[0]
    assert lr_ax.get_title() == 'Learning rate per batch' and _epoch_marks(lr_ax) == [3.5, 7.5, 11.5]
    assert learn.recorder.plot_loss(with_valid=False).axes[0].get_title() == 'Training loss per batch'
    # kept through a checkpoint, and a second fit starts its own
    buffer = io.BytesIO()
    torch.save(learn.recorder.state_dict(), buffer)
    buffer.seek(0)
    copy = Recorder()
    copy.load_state_dict(torch.load(buffer, weights_only=True))
    assert copy.epoch_ends == [4, 8, 12]
    learn.fit(1)
    assert learn.recorder.epoch_ends == [4]
    learn.lr_find(max_iter=6)
    assert learn.recorder.plot().axes[0].get_title() == 'Learning rate finder'
