"""learn.summary(): every layer, its output shape, parameter counts, optimizer, loss and callbacks."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from minilearn.callbacks.device import DeviceCallback
from minilearn.callbacks.metrics import AvgStatsCallback, accuracy
from minilearn.callbacks.transforms import BatchTransformXCallback, view_tfm
from minilearn.data.core import DataBunch, Dataset
from minilearn.model_summary import ModelSummary, summary
from minilearn.learner import Learner


class Scaled(nn.Module):
    """A container with a parameter of its own besides its children."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.inner = nn.Sequential(nn.Linear(16, 6), nn.ReLU())

    def forward(self, x):
        return self.inner(x) * self.scale


def make_learner():
    x, y = torch.rand(20, 1, 4, 4), torch.randint(0, 3, (20,))
    data = DataBunch(DataLoader(Dataset(x.flatten(1), y), batch_size=5, shuffle=True),
                     DataLoader(Dataset(x.flatten(1), y), batch_size=10))
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(32, 16),
                          Scaled(), nn.Linear(6, 3))
    model[0].requires_grad_(False)
    cbs = [DeviceCallback('cpu'), BatchTransformXCallback(view_tfm(1, 4, 4)), AvgStatsCallback(accuracy)]
    return Learner(model, data, F.cross_entropy, opt_func=torch.optim.Adam, cbs=cbs)


def test_every_layer_with_shape_and_counts():
    learn = make_learner()
    text = learn.summary()
    assert isinstance(text, str) and isinstance(text, ModelSummary) and repr(text) == str(text)
    leaves = [name for name, m in learn.model.named_modules() if not list(m.children())]
    assert [r['name'] for r in text.rows] == ['0', '1', '2', '3', '4', '4.inner.0', '4.inner.1', '5']
    assert set(leaves) <= {r['name'] for r in text.rows}
    for row in text.rows: assert f"{row['name']} ({row['type']})" in text
    shapes = {r['name']: r['output_shape'] for r in text.rows}
    assert shapes == {'0': '[5, 2, 4, 4]', '1': '[5, 2, 4, 4]', '2': '[5, 32]', '3': '[5, 16]', '4': '[5, 6]',
                      '4.inner.0': '[5, 6]', '4.inner.1': '[5, 6]', '5': '[5, 3]'}
    total = sum(p.numel() for p in learn.model.parameters())
    assert text.total_params == total == sum(r['n_params'] for r in text.rows)
    frozen = sum(p.numel() for p in learn.model[0].parameters())
    assert text.trainable_params == total - frozen
    assert f'Total params: {total:,}' in text and f'Frozen params: {frozen:,}' in text
    trainable = {r['name']: r['trainable'] for r in text.rows}
    assert trainable['0'] == 'no' and trainable['3'] == 'yes' and trainable['2'] == '-' and trainable['4'] == 'yes'


def test_optimizer_loss_and_callbacks_listed():
    learn = make_learner()
    text = summary(learn)
    assert 'Optimizer: Adam (created at the first fit)' in text and 'Loss: cross_entropy' in text
    lines = text.splitlines()
    callbacks = lines[lines.index('Callbacks (in _order):') + 1:]
    assert callbacks == ['  DeviceCallback (_order=-5)', '  TrainEvalCallback (_order=0)',
                         '  AvgStatsCallback (_order=0)', '  BatchTransformXCallback (_order=2)']
    learn.logger = lambda *a: None
    learn.fit(1)
    assert 'Optimizer: Adam (1 param group(s))' in learn.summary()


def test_summary_leaves_model_and_rng_untouched():
    learn = make_learner()
    learn.model.train()
    rng = torch.get_rng_state()
    running_mean = learn.model[1].running_mean.clone()
    learn.summary()
    assert torch.equal(torch.get_rng_state(), rng)  # no shuffled draw from the training loader
    assert torch.equal(learn.model[1].running_mean, running_mean)  # ran in eval mode
    assert learn.model.training
    assert all(not m._forward_hooks for m in learn.model.modules())


def test_hooks_removed_when_the_forward_fails():
    learn = make_learner()
    learn.model[5] = nn.Linear(7, 3)  # wrong input size: the forward fails at the last layer
    try:
        learn.summary()
    except RuntimeError:
        pass
    else:
        raise AssertionError('the forward should have failed')
    assert all(not m._forward_hooks for m in learn.model.modules())


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_summary_on_cuda():
    learn = make_learner()
    learn.model.cuda()
    learn.remove_cbs(learn.device)
    learn.add_cb(DeviceCallback('cuda'))
    text = learn.summary()
    assert text.total_params == sum(p.numel() for p in learn.model.parameters())
