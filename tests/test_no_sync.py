"""No device→host read per batch in the training loop and its callbacks (issue: performance and scale).

During a fit, the Tensor methods that read a value back to the host are patched; calls made by
minilearn's own code (the first caller outside torch is a file of the package) during the batches after
the first training batch are recorded with their file and line. Only the throttled progress display may
read, and at most about ten times a second.
"""
import contextlib
import io
import os
import sys
import time
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

import minilearn
from helpers import READ_BACK, small_cnn
from minilearn.callbacks.checkpoint import CheckpointCallback, TerminateOnNaNCallback
from minilearn.callbacks.augment import RandomCropPad, RandomFlip, RandomResizedCrop
from minilearn.callbacks.device import ChannelsLast, DeviceCallback
from minilearn.callbacks.metrics import (AccumMetric, AvgStatsCallback, accuracy, balanced_accuracy, f1_score,
                                         top_k_accuracy)
from minilearn.callbacks.mixup import CutMix, MixUp, MixUpCutMix
from minilearn.callbacks.precision import GradientAccumulation, GradientClipping, MixedPrecision
from minilearn.callbacks.progress import ProgressCallback
from minilearn.callbacks.recorder import Recorder
from minilearn.callbacks.transforms import BatchTransformXCallback, Normalize
from minilearn.data.core import DataBunch, Dataset
from minilearn.data.sampler import ResumableLoader
from minilearn.learner import Callback, Learner
from minilearn.losses import (GeneralizedCrossEntropy, HardBootstrappingLoss, LabelSmoothingCrossEntropy,
                              SoftBootstrappingLoss, SymmetricCrossEntropy)

PACKAGE_DIR = os.path.dirname(minilearn.__file__) + os.sep
TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


LOSSES = {'cross_entropy': lambda: F.cross_entropy, 'LabelSmoothingCrossEntropy': LabelSmoothingCrossEntropy,
          'SoftBootstrappingLoss': SoftBootstrappingLoss, 'HardBootstrappingLoss': HardBootstrappingLoss,
          'GeneralizedCrossEntropy': GeneralizedCrossEntropy, 'SymmetricCrossEntropy': SymmetricCrossEntropy}


class ReadCounter:
    """Patched Tensor methods record who called them while `armed`."""

    def __init__(self):
        self.armed, self.calls = False, []

    def wrap(self, name, original):
        def counted(tensor, *args, **kwargs):
            if self.armed:
                frame = sys._getframe(1)
                while frame is not None and frame.f_code.co_filename.startswith(TORCH_DIR): frame = frame.f_back
                if frame is not None and frame.f_code.co_filename.startswith(PACKAGE_DIR):
                    where = os.path.relpath(frame.f_code.co_filename, os.path.dirname(PACKAGE_DIR.rstrip(os.sep)))
                    self.calls.append((f'Tensor.{name}', f'{where}:{frame.f_lineno}'))
            return original(tensor, *args, **kwargs)
        return counted

    def install(self, monkeypatch):
        for name in READ_BACK: monkeypatch.setattr(torch.Tensor, name, self.wrap(name, getattr(torch.Tensor, name)))


class Arm(Callback):
    """Arms the counter for every batch (training and validation) after the first training batch of the fit."""
    _order = -1000

    def __init__(self, counter, on_arm=None, on_disarm=None):
        self.counter, self.on_arm, self.on_disarm, self.first_done = counter, on_arm, on_disarm, False

    def begin_fit(self): self.first_done = False

    def begin_batch(self):
        if self.first_done:
            self.counter.armed = True
            if self.on_arm: self.on_arm()

    def disarm(self):
        if self.counter.armed and self.on_disarm: self.on_disarm()
        self.counter.armed = False
        if self.in_train: self.first_done = True


class Disarm(Callback):
    _order = 1000

    def __init__(self, arm): self.arm = arm
    def after_batch(self): self.arm.disarm()


def make_data(device_type='cpu', loader=DataLoader):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(160, 3, 12, 12, generator=g), torch.randint(0, 4, (160,), generator=g)
    pin = device_type == 'cuda'
    train = loader(Dataset(x[:96], y[:96]), batch_size=16, shuffle=True, pin_memory=pin)
    valid = DataLoader(Dataset(x[96:], y[96:]), batch_size=32, pin_memory=pin)
    return DataBunch(train, valid, c_in=3, c_out=4)


def make_tensor_data(device_type='cpu'):
    """Images and labels like `make_data`'s as uint8 tensors served by DataBunch.from_tensors, on the device."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (160, 3, 12, 12), dtype=torch.uint8, generator=g)
    y = torch.randint(0, 4, (160,), generator=g)
    return DataBunch.from_tensors(x[:96], y[:96], x[96:], y[96:], bs=16, device=device_type, c_out=4, seed=0)


def fit_and_count(monkeypatch, loss_func, extra_cbs=(), device_type='cpu', progress_cls=ProgressCallback,
                  on_arm=None, on_disarm=None, mixer=None, data=None):
    counter = ReadCounter()
    arm = Arm(counter, on_arm, on_disarm)
    # whole-pass metrics keep each batch's predictions on the device (or copy them to pinned memory, to_cpu)
    metrics = [accuracy, f1_score(), balanced_accuracy(), top_k_accuracy(2),
               AccumMetric(f1_score().func, name='f1_host', to_cpu=True)]
    cbs = [DeviceCallback(device_type), BatchTransformXCallback(Normalize([0.5] * 3, [0.3] * 3)),
           AvgStatsCallback(metrics), Recorder(), progress_cls(interactive=True), arm, Disarm(arm), *extra_cbs]
    cbs += [MixUp(0.4) if mixer is None else mixer, TerminateOnNaNCallback()]
    learn = Learner(small_cnn(), data or make_data(device_type), loss_func, lr=0.05, cbs=cbs)
    counter.install(monkeypatch)
    start = time.time()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        learn.fit_one_cycle(2, 0.05)
    monkeypatch.undo()
    return counter.calls, time.time() - start, learn


def check_reads(calls, elapsed, learn):
    progress_reads = [c for c in calls if c[1].startswith('minilearn/callbacks/progress.py')]
    others = [c for c in calls if c not in progress_reads]
    assert others == [], f"host reads per batch in minilearn: {sorted(set(others))}"
    n_passes = 2 * 2  # training and validation, two epochs
    assert len(progress_reads) <= 10 * elapsed + n_passes + 1  # throttled to about ten a second
    assert len(learn.recorder.losses) == 2 * 6 and len(learn.avg_stats.history) == 2


@pytest.mark.parametrize('loss_name', list(LOSSES))
def test_no_host_read_per_batch_on_cpu(monkeypatch, loss_name):
    check_reads(*fit_and_count(monkeypatch, LOSSES[loss_name]()))


# The other mixing callbacks; stop_pct=0.25 leaves the last 3 of 12 batches unmixed, so both branches run.
MIXERS = {'CutMix': lambda: CutMix(1.0, stop_pct=0.25), 'MixUpCutMix': lambda: MixUpCutMix(stop_pct=0.25)}


@pytest.mark.parametrize('mixer', list(MIXERS))
def test_no_host_read_per_batch_with_cutmix_and_the_switch(monkeypatch, mixer):
    check_reads(*fit_and_count(monkeypatch, LOSSES['LabelSmoothingCrossEntropy'](), mixer=MIXERS[mixer]()))


def test_no_host_read_per_batch_with_bf16_clipping_and_accumulation(monkeypatch):
    extra = [MixedPrecision(torch.bfloat16), GradientClipping(1.), GradientAccumulation(2)]
    check_reads(*fit_and_count(monkeypatch, F.cross_entropy, extra))


def fast_path_cbs():
    return [ChannelsLast(), RandomCropPad(2), RandomFlip(), RandomResizedCrop(12)]


def test_no_host_read_per_batch_on_the_fast_data_path(monkeypatch):
    check_reads(*fit_and_count(monkeypatch, F.cross_entropy, fast_path_cbs(), data=make_tensor_data()))


def test_no_host_read_per_batch_with_reflect_padding(monkeypatch):
    check_reads(*fit_and_count(monkeypatch, F.cross_entropy, [RandomCropPad(2, mode='reflect')],
                               data=make_tensor_data()))


def test_no_host_read_per_batch_with_the_resume_checkpoint_callback_and_loader(monkeypatch, tmp_path):
    # Checkpoint writes read tensors back (once per write); the per-batch path of the callback reads nothing.
    ckpt = CheckpointCallback(tmp_path / 'c.pth', every_n_batches=None, every_epoch=False)
    check_reads(*fit_and_count(monkeypatch, F.cross_entropy, [ckpt, GradientAccumulation(2)],
                               data=make_data(loader=ResumableLoader)))


def test_the_counter_sees_a_read_in_a_callback(monkeypatch):
    # The probe itself must be able to fail: a callback of the package reading the loss is caught.
    class ReadsLoss(Callback):
        def after_loss(self): float(self.loss.detach())

    calls, _, _ = fit_and_count(monkeypatch, F.cross_entropy, [ReadsLoss()])
    assert not [c for c in calls if c[0] == 'Tensor.__float__']  # defined in this test file, not in the package
    code = compile("def after_loss(self): float(self.loss.detach())\n", os.path.join(PACKAGE_DIR, 'probe.py'), 'exec')
    namespace = {}
    exec(code, namespace)
    ReadsLoss.after_loss = namespace['after_loss']
    calls, _, _ = fit_and_count(monkeypatch, F.cross_entropy, [ReadsLoss()])
    assert ('Tensor.__float__', 'minilearn/probe.py:1') in calls


def fit_and_check_on_cuda(monkeypatch, loss_func, mixer=None, extra_cbs=(), data=None):
    """A fit on CUDA with synchronisations raising, but for the throttled progress read."""
    class PausingProgress(ProgressCallback):
        """The throttled progress read is the one allowed synchronisation: not armed while it runs."""
        def after_batch(self):
            mode = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode(0)
            try:
                super().after_batch()
            finally:
                torch.cuda.set_sync_debug_mode(mode)

    PausingProgress.__name__ = 'ProgressCallback'
    arm, disarm = partial(torch.cuda.set_sync_debug_mode, 'error'), partial(torch.cuda.set_sync_debug_mode, 0)
    try:
        calls, elapsed, learn = fit_and_count(monkeypatch, loss_func, extra_cbs, device_type='cuda',
                                              progress_cls=PausingProgress, on_arm=arm, on_disarm=disarm, mixer=mixer,
                                              data=data)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    check_reads(calls, elapsed, learn)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA (torch.cuda.set_sync_debug_mode)')
@pytest.mark.parametrize('loss_name', list(LOSSES))
def test_no_device_sync_per_batch_on_cuda(monkeypatch, loss_name):
    fit_and_check_on_cuda(monkeypatch, LOSSES[loss_name]())


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA (torch.cuda.set_sync_debug_mode)')
@pytest.mark.parametrize('mixer', list(MIXERS))
def test_no_device_sync_per_batch_on_cuda_with_cutmix_and_the_switch(monkeypatch, mixer):
    fit_and_check_on_cuda(monkeypatch, F.cross_entropy, MIXERS[mixer]())


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA (torch.cuda.set_sync_debug_mode)')
def test_no_device_sync_per_batch_on_cuda_on_the_fast_data_path(monkeypatch):
    fit_and_check_on_cuda(monkeypatch, F.cross_entropy, extra_cbs=fast_path_cbs(), data=make_tensor_data('cuda'))
