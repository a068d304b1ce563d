"""get_preds, predict and tta against hand-written references."""
import io
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from minilearn.callbacks.device import DeviceCallback
from minilearn.callbacks.mixup import MixUp
from minilearn.callbacks.transforms import BatchTransformXCallback, Normalize, normalize_chan
from minilearn.data.core import DataBunch, Dataset
from minilearn.data.items import label_image_folder
from minilearn.data.transforms import ResizeFixed, make_rgb, to_byte_tensor, to_float_tensor
from minilearn.inference import get_preds, predict, show_results, tta
from minilearn.learner import Callback, Learner

MEAN, STD = torch.tensor([0.5, -0.2]), torch.tensor([2.0, 0.5])
COLOURS = ('red', 'green', 'blue')  # channel order; the vocab is sorted: blue, green, red


# ---- a generated image folder whose class is the dominant colour (shared with the other test modules) ----
def colour_folder(root: Path, n_train: int = 3, n_valid: int = 4, size: int = 10, confusing_every: int = 0) -> Path:
    """train/<colour>/*.png and valid/<colour>/*.png; every `confusing_every`-th valid image leans to the next colour."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (('train', n_train), ('valid', n_valid)):
        for c, name in enumerate(COLOURS):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = torch.rand(size, size, 3, generator=g) * 0.5
                pixels[..., c] += 0.4
                if split == 'valid' and confusing_every and i % confusing_every == 0: pixels[..., (c + 1) % 3] += 0.5
                Image.fromarray((pixels.clamp(0, 1) * 255).byte().numpy()).save(folder / f'{i:02d}.png')
    return root


def channel_model() -> nn.Module:
    """Scores each class by its colour channel's mean, in vocab order (blue, green, red)."""
    model = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3, bias=False))
    with torch.no_grad(): model[2].weight.copy_(10 * torch.tensor([[0., 0, 1], [0, 1, 0], [1, 0, 0]]))
    return model


IMAGE_STATS = ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])


def colour_learner(root: Path, model: nn.Module | None = None, **folder_kwargs) -> Learner:
    tfms = [make_rgb, ResizeFixed(8), to_byte_tensor, to_float_tensor]
    data = label_image_folder(colour_folder(root, **folder_kwargs), tfms=tfms).to_databunch(bs=4, c_in=3)
    return Learner(model or channel_model(), data, F.cross_entropy,
                   cbs=[DeviceCallback('cpu'), BatchTransformXCallback(Normalize(*IMAGE_STATS))])


def small_model() -> nn.Module:
    # BatchNorm and Dropout make eval mode observable.
    return nn.Sequential(nn.Linear(2, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3))


def make_learner(n: int = 37, shuffle_valid: bool = False, loss_func=F.cross_entropy, cbs=None):
    x, y = torch.randn(n, 2), torch.randint(0, 3, (n,))
    train = DataLoader(Dataset(x, y), batch_size=8, shuffle=True)
    valid = DataLoader(Dataset(x, y), batch_size=10, shuffle=shuffle_valid)
    cbs = [DeviceCallback('cpu'), BatchTransformXCallback(Normalize(MEAN, STD))] if cbs is None else cbs
    learn = Learner(small_model(), DataBunch(train, valid, c_in=2, c_out=3), loss_func, cbs=cbs)
    learn.model[1].running_mean.normal_()  # non-trivial BatchNorm statistics
    return learn, x, y


def reference_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        out = torch.cat([model((xb - MEAN) / STD) for xb in x.split(10)])
    model.train()
    return out


class FakeMixUp(Callback):
    """Mixes the inputs at begin_batch like MixUp; must never run during prediction."""
    _order = 90

    def begin_batch(self):
        self.run.xb = self.run.xb.flip(0) * 0.3 + self.run.xb * 0.7


def test_get_preds_equals_hand_loop_in_dataset_order():
    learn, x, y = make_learner(shuffle_valid=True)
    out = reference_outputs(learn.model, x)
    preds, targets = get_preds(learn)
    assert torch.equal(targets, y)
    torch.testing.assert_close(preds, F.softmax(out, dim=1))
    assert not preds.is_inference() and preds.device.type == 'cpu'


def test_get_preds_learner_method_with_input_and_loss():
    learn, x, y = make_learner()
    out = reference_outputs(learn.model, x)
    inputs, preds, targets, losses = learn.get_preds(with_input=True, with_loss=True)
    torch.testing.assert_close(inputs, (x - MEAN) / STD)  # inputs as the model saw them (normalized)
    torch.testing.assert_close(losses, F.cross_entropy(out, y, reduction='none'))
    assert losses.shape == (len(x),)


def test_get_preds_without_reorder_follows_loader_order():
    learn, x, y = make_learner(shuffle_valid=True)
    _, targets = get_preds(learn, reorder=False)
    assert sorted(targets.tolist()) == sorted(y.tolist())
    assert not torch.equal(targets, y)  # seeded: this shuffle differs from the dataset order


def test_get_preds_reorders_custom_batch_sampler():
    learn, x, y = make_learner()
    batches = [[5, 1, 30], [0, 2], list(range(36, 2, -1))]
    batches[2] = [i for i in batches[2] if i not in (5, 1, 30)]
    dl = DataLoader(Dataset(x, y), batch_sampler=batches)
    preds, targets = get_preds(learn, dl=dl, act=lambda t: t)
    assert torch.equal(targets, y)
    torch.testing.assert_close(preds, reference_outputs(learn.model, x))


def test_get_preds_module_loss_reduction_restored_and_wrapper_unwrapped():
    loss = nn.CrossEntropyLoss()

    class Wrapper:  # like MixUp's loss wrapper during a fit
        base_loss_func = loss
        def __call__(self, pred, yb): raise AssertionError('the wrapper must not be called')

    learn, x, y = make_learner(loss_func=Wrapper())
    *_, losses = get_preds(learn, with_loss=True)
    torch.testing.assert_close(losses, F.cross_entropy(reference_outputs(learn.model, x), y, reduction='none'))
    assert loss.reduction == 'mean'


def test_get_preds_loss_without_reduction_gives_clear_error():
    learn, *_ = make_learner(loss_func=lambda p, t: F.cross_entropy(p, t))
    with pytest.raises(TypeError, match="reduction='none'"):
        get_preds(learn, with_loss=True)


def test_get_preds_never_applies_mixup():
    learn, x, y = make_learner()
    expected, _ = get_preds(learn)
    learn.add_cb(FakeMixUp())
    learn.add_cb(MixUp())
    preds, _ = get_preds(learn)
    torch.testing.assert_close(preds, expected)


def test_get_preds_restores_modes_and_learner_state():
    learn, x, y = make_learner()
    learn.model.train()
    learn.model[1].eval()  # a frozen BatchNorm stays frozen
    learn.xb, learn.yb, learn.pred, learn.in_train = 'xb', 'yb', 'pred', True
    get_preds(learn)
    assert learn.model.training and learn.model[4].training and not learn.model[1].training
    assert (learn.xb, learn.yb, learn.pred, learn.in_train) == ('xb', 'yb', 'pred', True)


def test_get_preds_regression_uses_identity_and_custom_act():
    x, y = torch.randn(20, 2), torch.randn(20, 1)
    data = DataBunch(DataLoader(Dataset(x, y), batch_size=4), DataLoader(Dataset(x, y), batch_size=6))
    model = nn.Linear(2, 1)
    learn = Learner(model, data, F.mse_loss, cbs=[BatchTransformXCallback(partial(normalize_chan, mean=MEAN, std=STD))])
    preds, targets, losses = get_preds(learn, with_loss=True)
    with torch.no_grad(): out = model((x - MEAN) / STD)
    torch.testing.assert_close(preds, out)
    torch.testing.assert_close(losses, ((out - y) ** 2).squeeze(1))
    preds, _ = get_preds(learn, act=torch.sigmoid)
    torch.testing.assert_close(preds, torch.sigmoid(out))


def test_get_preds_without_valid_loader_names_the_fix():
    learn, *_ = make_learner()
    learn.data.valid_dl = None
    with pytest.raises(ValueError, match='dl='):
        get_preds(learn)


# ---- predict -------------------------------------------------------------------------------------
def test_predict_decodes_labels_on_an_image_folder(tmp_path):
    learn = colour_learner(tmp_path)
    assert learn.data.vocab == ['blue', 'green', 'red']
    files = sorted((tmp_path / 'valid').glob('*/*.png'))
    for fn in files:
        label, index, probs = learn.predict(fn)
        assert label == fn.parent.name and learn.data.vocab[index] == label
        assert probs.shape == (3,) and float(probs.sum()) == pytest.approx(1, abs=1e-6)
    # the same item as a path, a PIL image and a model-ready tensor (normalization still applied)
    from PIL import Image
    x = to_float_tensor(to_byte_tensor(ResizeFixed(8)(make_rgb(Image.open(files[0])))))
    expected = F.softmax(learn.model(((x - 0.5) / 0.25)[None]), 1)[0].detach()
    for item in (files[0], str(files[0]), Image.open(files[0]), x):
        torch.testing.assert_close(predict(learn, item)[2], expected)


def test_predict_without_vocab_returns_the_index_and_restores_state(tmp_path):
    learn = colour_learner(tmp_path)
    learn.data.vocab = None
    learn.model.train()
    label, index, _ = learn.predict(sorted((tmp_path / 'valid' / 'red').glob('*.png'))[0])
    assert label == index == 2 and learn.model.training


def test_predict_needs_item_tfms_for_raw_items(tmp_path):
    learn = colour_learner(tmp_path)
    learn.data.item_tfms = None
    with pytest.raises(ValueError, match='item_tfms'):
        learn.predict(sorted((tmp_path / 'valid' / 'red').glob('*.png'))[0])
    with pytest.raises(FileNotFoundError, match='no file'):
        learn.predict(tmp_path / 'missing.png')


# ---- tta ---------------------------------------------------------------------------------------------
def test_tta_with_no_passes_equals_plain_preds():
    learn, x, y = make_learner(shuffle_valid=True)
    preds, targets = get_preds(learn)
    tta_preds, tta_targets = tta(learn, n=0)
    assert torch.equal(tta_preds, preds) and torch.equal(tta_targets, targets)


def test_tta_blends_plain_and_flipped_predictions():
    learn, x, y = make_learner(shuffle_valid=True)
    model = learn.model.eval()
    with torch.no_grad():
        plain = F.softmax(model((x - MEAN) / STD), 1)
        flipped = F.softmax(model(((x - MEAN) / STD).flip(-1)), 1)
    model.train()
    preds, targets = learn.tta(n=3, beta=0.25)
    torch.testing.assert_close(preds, 0.25 * plain + 0.75 * flipped)
    assert torch.equal(targets, y)
    preds, _ = tta(learn, n=2, beta=0., tfm=lambda xb: xb * 0)  # any batch transform
    torch.testing.assert_close(preds, F.softmax(reference_outputs(learn.model, MEAN.expand(len(x), 2)), 1))
    with pytest.raises(ValueError, match='beta'):
        tta(learn, beta=1.5)


# ---- show_results ------------------------------------------------------------------------------------
def test_show_results_renders_a_titled_grid(tmp_path):
    import matplotlib.figure
    learn = colour_learner(tmp_path)
    fig = show_results(learn, n=5)
    assert isinstance(fig, matplotlib.figure.Figure)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert len(titles) == 5 and all(t.split('/')[0] == t.split('/')[1] for t in titles)
    assert learn.show_results(n=2).axes[0].images[0].get_array().shape == (8, 8, 3)
    buffer = io.BytesIO()
    fig.savefig(buffer, format='png')
    assert buffer.getvalue().startswith(b'\x89PNG')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_get_preds_on_cuda_returns_cpu_tensors():
    learn, x, y = make_learner(cbs=[DeviceCallback('cuda'), BatchTransformXCallback(Normalize(MEAN, STD))])
    expected = F.softmax(reference_outputs(learn.model, x), 1)
    learn.model.cuda()
    preds, targets = get_preds(learn)
    assert preds.device.type == 'cpu' and targets.device.type == 'cpu'
    torch.testing.assert_close(preds, expected, rtol=1e-4, atol=1e-5)
