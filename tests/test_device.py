"""minilearn.callbacks.device: DeviceCallback/CudaCallback put the model, the loss, the optimizer state and every
batch on the fit's device; ChannelsLast converts the model and batches during the fit and restores the model after."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import images, linear_data, mlp, quiet_fit, small_cnn
from minilearn.callbacks.device import ChannelsLast, CudaCallback, DeviceCallback
from minilearn.data.core import DataBunch
from minilearn.learner import Callback, Learner


# ---- DeviceCallback, CudaCallback ---------------------------------------------------------------------------
def test_model_and_batches_land_on_the_callback_device():
    where = []

    class Where(Callback):
        _order = 10
        def after_pred(self):
            where.append((self.xb.device, self.yb.device, next(self.model.parameters()).device, self.pred.device))

    device = 'cuda' if torch.cuda.is_available() else 'cpu'
    learn = Learner(mlp(), linear_data(), F.cross_entropy, cbs=[DeviceCallback(device), Where()])
    learn.fit(1)
    assert where and all(d.type == device for row in where for d in row)


def test_device_callback_sets_the_fit_device_and_defers_to_one_already_chosen():
    seen = []

    class Where(Callback):
        _order = 10
        def after_pred(self): seen.append((self.fit_device, self.xb.device, next(self.model.parameters()).device))

    class ChoosesCpu(Callback):  # as DistributedCallback chooses this process's device, before DeviceCallback
        _order = -6
        def begin_fit(self): self.run.fit_device = torch.device('cpu')
        def after_fit(self): self.run.fit_device = None

    cpu = torch.device('cpu')
    data = linear_data(n_train=32, n_valid=16, bs=16)
    learn = Learner(mlp(), data, F.cross_entropy, cbs=[DeviceCallback(cpu), Where()])
    assert learn.fit_device is None
    learn.fit(1)
    assert seen == [(cpu, cpu, cpu)] * 3 and learn.fit_device is None
    # Its own device would fail the fit (meta tensors hold no data): the device chosen first is used instead.
    seen.clear()
    meta = DeviceCallback('meta')
    learn = Learner(mlp(), data, F.cross_entropy, cbs=[meta, Where()])
    learn.fit(1, cbs=[ChoosesCpu()])
    assert seen == [(cpu, cpu, cpu)] * 3 and learn.fit_device is None and meta.device == torch.device('meta')


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_cuda_callback_moves_to_gpu_with_pinned_memory():
    data = linear_data(pin_memory=True)
    learn = Learner(mlp(), data, F.cross_entropy, cbs=[CudaCallback()])
    learn.fit(1)
    assert next(learn.model.parameters()).is_cuda and learn.xb.is_cuda


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the fallback on machines without CUDA')
def test_cuda_callback_warns_and_trains_on_cpu_without_cuda():
    with pytest.warns(UserWarning, match='CUDA is not available'):
        cb = CudaCallback()
    learn = Learner(mlp(), linear_data(), F.cross_entropy, cbs=[cb])
    learn.fit(1)
    assert cb.device.type == 'cpu'


def test_device_callback_moves_a_loss_module_with_class_weights():
    from minilearn.losses import LabelSmoothingCrossEntropy
    loss = LabelSmoothingCrossEntropy(0.1, weight=torch.tensor([1., 2., 3.], dtype=torch.float64))
    learn = Learner(mlp(), linear_data(), loss, cbs=[DeviceCallback('cpu')])
    learn.fit(1)
    assert loss.weight.device.type == 'cpu' and learn.loss_func is loss


def test_begin_fit_moves_the_optimizer_state_but_its_step_count_and_begin_batch_moves_the_batch_and_idx():
    learn = Learner(mlp(), linear_data(), F.cross_entropy, opt_func=torch.optim.Adam)
    quiet_fit(learn, 1)  # Adam state (exp_avg, exp_avg_sq, step) on the CPU
    meta = DeviceCallback('meta')  # meta tensors keep their device and shape, no data: the moves are visible
    learn.add_cb(meta)
    meta.begin_fit()
    assert learn.fit_device == torch.device('meta') and next(learn.model.parameters()).is_meta
    states = list(learn.opt.state.values())
    assert states and all(s['exp_avg'].is_meta and s['exp_avg_sq'].is_meta and s['step'].device.type == 'cpu'
                          for s in states)
    learn.xb, learn.yb, learn.idx = torch.zeros(4, 8), torch.zeros(4, dtype=torch.long), torch.arange(4)
    meta.begin_batch()
    assert learn.xb.is_meta and learn.yb.is_meta and learn.idx.is_meta
    meta.after_fit()
    assert learn.fit_device is None


# ---- ChannelsLast -----------------------------------------------------------------------------------------
class FormatProbe(Callback):
    _order = 50

    def begin_fit(self): self.formats = set()

    def begin_batch(self):
        conv = self.model[0].weight
        self.formats.add((self.xb.is_contiguous(memory_format=torch.channels_last),
                          conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()))


def test_channels_last_during_the_fit_and_the_model_restored_after():
    x, y = images(24)
    torch.manual_seed(0)
    learn = Learner(small_cnn(), DataBunch.from_tensors(x, y, x[:8], y[:8], bs=8, seed=0), F.cross_entropy)
    probe = FormatProbe()
    quiet_fit(learn, 1, cbs=[ChannelsLast(), probe])
    assert probe.formats == {(True, True)}
    assert all(p.is_contiguous() for p in learn.model.parameters())  # NCHW again
    cl_model = small_cnn().to(memory_format=torch.channels_last)  # a channels-last model stays channels-last
    learn = Learner(cl_model, DataBunch.from_tensors(x, y, bs=8, seed=0), F.cross_entropy)
    quiet_fit(learn, 1, cbs=[ChannelsLast()])
    weight = cl_model[0].weight
    assert not weight.is_contiguous() and weight.is_contiguous(memory_format=torch.channels_last)


def test_channels_last_restores_4d_buffers_too():
    # model.to(memory_format=...) replaces buffers by new tensors: they are restored through their module.
    x, y = images(16)
    model = small_cnn()
    model[0].register_buffer('mask', torch.rand(4, 3, 2, 2))
    mask = model[0].mask.clone()
    learn = Learner(model, DataBunch.from_tensors(x, y, bs=8, seed=0), F.cross_entropy)
    quiet_fit(learn, 1, cbs=[ChannelsLast()])
    assert model[0].mask.is_contiguous() and torch.equal(model[0].mask, mask)


def test_channels_last_outputs_equal_nchw():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3)).eval()
    x = torch.randn(5, 3, 10, 10)
    expected = model(x)
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, expected, rtol=1e-4, atol=1e-5)
    learn = Learner(model, DataBunch.from_tensors(x, torch.zeros(5, dtype=torch.long), bs=5, seed=0), F.cross_entropy)
    cb = ChannelsLast()
    learn.add_cb(cb)
    cb.begin_fit()
    learn.xb = x
    cb.begin_batch()
    torch.testing.assert_close(learn.model(learn.xb), expected, rtol=1e-4, atol=1e-5)
    cb.after_fit()
    assert all(p.is_contiguous() for p in model.parameters())


def test_channels_last_warns_once_for_inputs_that_are_not_images():
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    learn = Learner(nn.Linear(6, 3), DataBunch.from_tensors(x, y, bs=8, seed=0), F.cross_entropy)
    with pytest.warns(UserWarning, match='not \\(N, C, H, W\\)') as record:
        quiet_fit(learn, 2, cbs=[ChannelsLast()])
    assert len([w for w in record if 'ChannelsLast' in str(w.message)]) == 1
