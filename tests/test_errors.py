"""Bad input: a clear error naming the problem, raised before any optimizer step, the user's objects unchanged.

Every test asserts the error type, words of the message, and that the model's weights (buffers included),
the optimizer (identity, state, hyper-parameters) and the loss function (identity, attributes) are as
before. Fit-time cases start from a learner that has trained one epoch, so there is optimizer state to lose.
"""
import copy
import math
from functools import partial

import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from helpers import linear_data, mlp, same_weights, weights
from minilearn.callbacks.checkpoint import EarlyStoppingCallback
from minilearn.callbacks.metrics import AvgStatsCallback, accuracy
from minilearn.callbacks.mixup import MixUp
from minilearn.callbacks.recorder import Recorder
from minilearn.callbacks.schedule import ParamScheduler, sched_lin
from minilearn.data.core import DataBunch, Dataset
from minilearn.data.items import label_image_folder
from minilearn.data.transforms import ResizeFixed, make_rgb, to_byte_tensor, to_float_tensor
from minilearn.learner import Callback, Learner
from minilearn.losses import LabelSmoothingCrossEntropy
from minilearn.serialization import CheckpointError


# ---- the "unchanged" contract -------------------------------------------------------------------------
def model_with_bn(n_features=8, n_classes=3):
    return nn.Sequential(nn.Linear(n_features, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, n_classes))


def trained_learner(model=None, loss_func=None, data=None, cbs=(), **kwargs):
    """A learner after one epoch: SGD with momentum buffers."""
    learn = Learner(model or model_with_bn(), data or linear_data(n_train=48, n_valid=32, bs=16),
                    loss_func or nn.CrossEntropyLoss(), opt_func=partial(torch.optim.SGD, momentum=0.9), lr=0.1,
                    cbs=list(cbs), cb_funcs=[partial(AvgStatsCallback, accuracy), Recorder], **kwargs)
    learn.logger = lambda *args: None
    learn.fit(1)
    return learn


def snapshot(learn):
    opt = learn.opt
    return {'weights': weights(learn.model), 'training': [m.training for m in learn.model.modules()],
            'opt': opt, 'opt_state': None if opt is None else copy.deepcopy(opt.state_dict()),
            'loss_func': learn.loss_func, 'loss_vars': dict(vars(learn.loss_func)) if hasattr(learn.loss_func,
                                                                                               '__dict__') else None,
            'cbs': list(learn.cbs)}


def assert_unchanged(learn, before):
    after = snapshot(learn)
    assert same_weights(before['weights'], after['weights']), 'model weights or buffers changed'
    assert after['training'] == before['training'], 'train/eval modes changed'
    assert after['opt'] is before['opt'], 'optimizer replaced'
    if before['opt_state'] is not None:
        old, new = before['opt_state'], after['opt_state']
        assert [{k: v for k, v in g.items() if k != 'params'} for g in old['param_groups']] == \
               [{k: v for k, v in g.items() if k != 'params'} for g in new['param_groups']]
        assert old['state'].keys() == new['state'].keys()
        assert all(torch.equal(old['state'][i]['momentum_buffer'], new['state'][i]['momentum_buffer'])
                   for i in old['state'])
    assert after['loss_func'] is before['loss_func'], 'loss function replaced'
    assert after['loss_vars'] == before['loss_vars'], 'loss function attributes changed'
    assert after['cbs'] == before['cbs'], 'callbacks added or removed'


def fit_fails(learn, error_type, *words, epochs=1, **fit_kwargs):
    """fit raises `error_type` whose message holds every one of `words`; the learner is left as it was."""
    before = snapshot(learn)
    with pytest.raises(error_type) as info:
        learn.fit(epochs, **fit_kwargs)
    for word in words: assert word in str(info.value), f'{word!r} not in: {info.value}'
    assert_unchanged(learn, before)
    return info.value


def construction_fails(error_type, *words, model=None, loss_func=None, **kwargs):
    """Learner(...) raises; the model and loss function handed to it are unchanged."""
    model = model or model_with_bn()
    loss_func = loss_func or nn.CrossEntropyLoss()
    before, loss_vars = weights(model), dict(vars(loss_func)) if hasattr(loss_func, '__dict__') else None
    kwargs.setdefault('data', linear_data(n_train=48, n_valid=32, bs=16))
    with pytest.raises(error_type) as info:
        Learner(model, loss_func=loss_func, **kwargs)
    for word in words: assert word in str(info.value), f'{word!r} not in: {info.value}'
    assert same_weights(before, weights(model))
    assert loss_vars is None or dict(vars(loss_func)) == loss_vars
    return info.value


# ---- learning rate ------------------------------------------------------------------------------------
@pytest.mark.parametrize('lr', [0, -0.1, math.nan, math.inf, '0.1', None])
def test_bad_lr_at_construction(lr):
    construction_fails(ValueError, 'lr must be a positive finite number', repr(lr), lr=lr)


def test_a_list_of_lrs_points_to_per_group_schedules():
    construction_fails(ValueError, 'lr must be one positive number', 'fit_one_cycle(max_lr=[...])', lr=[0.1, 0.01])


def test_bad_lr_set_after_construction_is_caught_at_fit():
    learn = trained_learner()
    learn.lr = math.nan
    fit_fails(learn, ValueError, 'lr must be a positive finite number', 'nan')


# ---- construction -------------------------------------------------------------------------------------
def test_model_that_is_not_a_module():
    with pytest.raises(TypeError, match='model must be a torch.nn.Module, got function'):
        Learner(lambda x: x, linear_data(), F.cross_entropy)


def test_loss_that_is_not_callable():
    construction_fails(TypeError, 'loss_func must be callable', "'cross_entropy'", loss_func='cross_entropy')


def test_data_without_loaders():
    dl = DataLoader(Dataset(torch.randn(8, 8), torch.zeros(8).long()), batch_size=4)
    construction_fails(TypeError, 'DataBunch', "'train_dl'", data=(dl, dl))


def test_non_callable_cb_funcs_entry():
    construction_fails(TypeError, 'cb_funcs entries must be callables', "'accuracy'", cb_funcs=['accuracy'])


def test_callback_instance_given_as_cb_funcs():
    construction_fails(TypeError, 'pass callback instances through `cbs`', cb_funcs=[Recorder()])


def test_callback_class_given_as_cbs():
    construction_fails(TypeError, 'Recorder is a class', 'Recorder()', cbs=[Recorder])


def test_something_else_given_as_a_callback():
    construction_fails(TypeError, 'is not a callback', cbs=[accuracy])


def test_two_callbacks_with_the_same_name():
    construction_fails(ValueError, "a callback named 'recorder' is already attached", cbs=[Recorder(), Recorder()])


def test_two_callbacks_with_the_same_name_passed_to_fit():
    learn = trained_learner()
    fit_fails(learn, ValueError, "'recorder' is already attached", cbs=[Recorder()])


def test_callback_named_like_a_learner_attribute():
    class Model(Callback):
        pass

    construction_fails(ValueError, "callback name 'model' clashes", cbs=[Model()])


def test_unknown_event_name():
    learn = trained_learner()
    before = snapshot(learn)
    with pytest.raises(ValueError, match="unknown event 'begin_fitt'; valid events: begin_fit, begin_epoch"):
        learn('begin_fitt')
    assert_unchanged(learn, before)


def test_callback_method_named_like_a_missing_event_warns():
    class Typo(Callback):
        def after_predict(self): pass

    with pytest.warns(UserWarning, match=r"\['after_predict'\].*valid events"):
        Learner(mlp(), linear_data(), F.cross_entropy, cbs=[Typo()])


# ---- epochs and loaders -------------------------------------------------------------------------------
@pytest.mark.parametrize('epochs, error_type', [(0, ValueError), (-2, ValueError), (2.0, TypeError),
                                                (True, TypeError), ('3', TypeError), (None, TypeError)])
def test_epochs_not_a_positive_int(epochs, error_type):
    fit_fails(trained_learner(), error_type, 'epochs must be a positive int', epochs=epochs)


@pytest.mark.parametrize('start_epoch', [3, 5, -1, 1.0])
def test_start_epoch_out_of_range(start_epoch):
    fit_fails(trained_learner(), ValueError, 'start_epoch must be an int in [0, epochs=3)', repr(start_epoch),
              epochs=3, start_epoch=start_epoch)


def test_empty_train_loader():
    learn = trained_learner()
    learn.data.train_dl = DataLoader(Dataset(torch.zeros(0, 8), torch.zeros(0).long()), batch_size=4)
    fit_fails(learn, ValueError, 'training DataLoader is empty')


def test_drop_last_dropping_every_batch():
    learn = trained_learner()
    learn.data.train_dl = DataLoader(Dataset(torch.zeros(5, 8), torch.zeros(5).long()), batch_size=8,
                                     drop_last=True)
    fit_fails(learn, ValueError, 'drop_last=True')


def test_train_loader_without_length():
    learn = trained_learner()
    learn.data.train_dl = iter([(torch.zeros(4, 8), torch.zeros(4).long())])
    fit_fails(learn, TypeError, 'must have a length')


def test_batch_that_is_not_an_input_target_pair():
    learn = trained_learner()
    learn.data.train_dl = DataLoader(torch.randn(16, 8), batch_size=4)
    fit_fails(learn, ValueError, 'each batch must be an (xb, yb) pair', 'Tensor of length 4')


def test_no_validation_set_is_allowed_and_stats_say_so():
    logged = []
    learn = trained_learner()
    learn.logger = logged.append
    learn.data.valid_dl = None
    learn.fit(1)
    row = learn.avg_stats.history[-1]
    assert row['valid_loss'] is None and row['valid_accuracy'] is None and row['train_loss'] > 0
    assert logged[-1][3:5] == ['-', '-']


# ---- targets vs model output (the pre-flight check on the loop's first batch) ----------------------
def data_with_targets(y, n_features=8, stored=True, shuffle=True):
    """A loader over (x, y); `stored=False` hides the labels (TensorDataset), so only batches can be checked."""
    x = torch.randn(len(y), n_features)
    dataset = Dataset(x, y) if stored else TensorDataset(x, y)
    return DataBunch(DataLoader(dataset, batch_size=8, shuffle=shuffle), None)


def learner_on(y, loss_func=None, cbs=(), **data_kwargs):
    learn = trained_learner(loss_func=loss_func, cbs=cbs)
    learn.data = data_with_targets(y, **data_kwargs)
    return learn


@pytest.mark.parametrize('loss_func', [None, F.cross_entropy, LabelSmoothingCrossEntropy()])
def test_class_index_too_large_in_the_first_batch_names_value_and_output_width(loss_func):
    y = torch.tensor([7, 0, 1, 2] + [0, 1, 2, 1] * 3)
    learn = learner_on(y, loss_func, stored=False, shuffle=False)
    fit_fails(learn, ValueError, 'target class index 7 is out of range for a model with 3 outputs', 'c_out')


def test_class_index_too_large_in_a_later_batch_is_found_in_the_stored_labels():
    y = torch.tensor([0, 1, 2, 1] * 3 + [0, 9, 1, 2])
    learn = learner_on(y, shuffle=False)
    fit_fails(learn, ValueError, 'target class index 9 (in the training set) is out of range', '3 outputs')


def test_stored_labels_of_a_dataset_that_maps_them_are_not_trusted():
    class OneBased(Dataset):
        """Stores labels 1..3 and returns 0..2: only the batches tell the truth."""
        def __getitem__(self, i): return self.x[i], self.y[i] - 1

    learn = trained_learner()
    learn.data = DataBunch(DataLoader(OneBased(torch.randn(16, 8), torch.tensor([1, 2, 3, 2] * 4)), batch_size=8),
                           None)
    learn.fit(1)  # no false alarm about the stored 3s
    assert len(learn.avg_stats.history) == 1


def test_class_index_too_large_in_the_validation_set():
    learn = trained_learner()
    learn.data.valid_dl.dataset.y[5] = 4
    fit_fails(learn, ValueError, 'target class index 4 (in the validation set) is out of range')


def test_class_index_too_large_with_mixup_on():
    learn = learner_on(torch.tensor([0, 1, 2, 5] * 4), LabelSmoothingCrossEntropy(), cbs=[MixUp(0.4)])
    fit_fails(learn, ValueError, 'target class index 5', 'out of range for a model with 3 outputs')


def test_negative_class_index():
    learn = learner_on(torch.tensor([-3, 1, 2, 0] * 4), stored=False)
    fit_fails(learn, ValueError, 'target class index -3 is negative', 'ignore_index=-100')


def test_ignore_index_is_allowed_but_other_negatives_are_not():
    learn = learner_on(torch.tensor([0, 1, -1, 2] * 4), nn.CrossEntropyLoss(ignore_index=-1))
    learn.fit(1)  # -1 is ignore_index: fine
    learn.data = data_with_targets(torch.tensor([0, 1, 2, 2] * 3 + [0, 1, -2, 2]), shuffle=False)  # not in batch 0
    fit_fails(learn, ValueError, 'target class index -2 (in the training set) is negative', 'ignore_index=-1')


def test_float_targets_to_a_class_index_loss():
    learn = learner_on(torch.tensor([0., 1., 2., 1.] * 4))
    fit_fails(learn, TypeError, 'float targets', 'torch.float32', 'yb.long()')


def test_target_shape_mismatch():
    learn = learner_on(torch.tensor([[0], [1], [2], [1]] * 4))
    fit_fails(learn, ValueError, 'target shape (8, 1) does not match the model output (8, 3)')


@pytest.mark.parametrize('loss_func', [F.mse_loss, nn.MSELoss(), partial(F.l1_loss), nn.HuberLoss()])
def test_an_elementwise_loss_with_class_index_targets_names_shapes_and_fix(loss_func):
    # torch would only warn, then fail inside the loss with a broadcasting error (or broadcast silently)
    learn = trained_learner()
    learn.loss_func, learn.data = loss_func, data_with_targets(torch.tensor([0, 1, 2, 1] * 4))
    fit_fails(learn, ValueError, 'target shape (8,) does not match the model output (8, 3)', 'class indices',
              'F.cross_entropy', 'F.one_hot(yb, 3).float()')


def test_an_elementwise_loss_with_targets_that_would_broadcast():
    learn = trained_learner()
    learn.model = nn.Sequential(learn.model, nn.Linear(3, 1))
    learn.loss_func, learn.data = F.mse_loss, data_with_targets(torch.tensor([0., 1., 2., 1.] * 4))
    learn.opt = None  # the new layer's parameters
    fit_fails(learn, ValueError, 'target shape (8,) does not match the model output (8, 1)', 'yb.view(-1, 1)')


def test_model_output_without_a_class_dimension():
    learn = learner_on(torch.tensor([0, 1, 2, 1] * 4))
    learn.model = nn.Sequential(learn.model, nn.Flatten(0))
    fit_fails(learn, ValueError, 'needs model outputs of shape (N, C, ...)', 'returned shape (24,)')


def test_model_forward_failing_on_the_first_batch_names_the_input_shape():
    learn = trained_learner()
    learn.data = DataBunch(DataLoader(Dataset(torch.randn(16, 5), torch.zeros(16).long()), batch_size=8), None)
    error = fit_fails(learn, RuntimeError, "the model's forward failed on the first batch, input shape (8, 5)")
    assert isinstance(error.__cause__, RuntimeError) and 'mat1 and mat2' in str(error.__cause__)


# ---- losses -------------------------------------------------------------------------------------------
def test_unknown_reduction_at_construction():
    with pytest.raises(ValueError, match="unknown reduction 'avg'; valid reductions: 'mean', 'sum', 'none'"):
        LabelSmoothingCrossEntropy(reduction='avg')


def test_unknown_reduction_set_later_fails_on_the_first_batch():
    loss_func = LabelSmoothingCrossEntropy()
    learn = trained_learner(loss_func=loss_func)
    loss_func.reduction = 'avg'
    fit_fails(learn, ValueError, "unknown reduction 'avg'", "'mean', 'sum', 'none'")


def test_bad_mixup_alpha():
    with pytest.raises(ValueError, match='alpha must be a positive finite number'):
        MixUp(alpha=0)


def test_scheduling_a_missing_hyper_parameter():
    learn = trained_learner()
    sched = ParamScheduler('beta1', sched_lin(0.9, 0.8))
    fit_fails(learn, ValueError, "no hyper-parameter 'beta1'", 'available', 'momentum', cbs=[sched])


def test_unknown_monitored_column():
    learn = trained_learner()
    fit_fails(learn, ValueError, "unknown monitor 'valid_acc'", 'valid_accuracy',
              cbs=[EarlyStoppingCallback('valid_acc', mode='max')])


# ---- data ---------------------------------------------------------------------------------------------
def test_dataset_lengths_differ():
    with pytest.raises(ValueError, match='same length, got 3 and 2'):
        Dataset([1, 2, 3], [0, 1])


@pytest.mark.parametrize('bs', [0, -1, 2.5])
def test_bad_batch_size(bs):
    with pytest.raises(ValueError, match='batch size must be a positive int'):
        DataBunch.from_datasets(Dataset([1], [0]), None, bs=bs)


def test_dataset_item_that_cannot_be_opened_is_named(tmp_path):
    for split in ('train', 'valid'):
        for label in ('cat', 'dog'):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(2):
                PIL.Image.new('RGB', (10, 10), color=(40 * i, 90, 200)).save(folder / f'{i}.png')
    broken = tmp_path / 'train' / 'dog' / 'broken.png'
    broken.write_bytes(b'\x89PNG\r\n\x1a\n' + b'not really an image')
    tfms = [make_rgb, ResizeFixed(8), to_byte_tensor, to_float_tensor]
    data = label_image_folder(tmp_path, tfms=tfms).to_databunch(bs=8, c_in=3, c_out=2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 2))
    learn = trained_learner(model=model, data=DataBunch.from_datasets(
        Dataset(torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])), None, bs=4))
    learn.data = data
    fit_fails(learn, OSError, 'cannot open image', str(broken))


# ---- checkpoints --------------------------------------------------------------------------------------
def test_unreadable_checkpoint_is_named(tmp_path):
    learn = trained_learner(path=tmp_path)
    path = learn.save('ckpt')
    path.write_bytes(path.read_bytes()[:100])
    before = snapshot(learn)
    with pytest.raises(CheckpointError) as info:
        learn.load('ckpt')
    assert str(path) in str(info.value) and 'truncated or corrupted' in str(info.value)
    assert_unchanged(learn, before)


def test_checkpoint_of_another_architecture(tmp_path):
    other = trained_learner(model=model_with_bn(n_classes=5),
                            data=linear_data(n_train=48, n_valid=32, bs=16, n_classes=5), path=tmp_path)
    path = other.save('five_classes')
    learn = trained_learner(path=tmp_path)
    before = snapshot(learn)
    with pytest.raises(CheckpointError) as info:
        learn.load(path)
    assert '3.weight: checkpoint (5, 16) vs model (3, 16)' in str(info.value)
    assert_unchanged(learn, before)
