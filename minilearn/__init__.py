"""minilearn: a small, fast, fastai-style callback training framework for PyTorch."""
from .callbacks.device import CudaCallback, DeviceCallback, default_device
from .callbacks.hooks import ActivationStats, Hook, Hooks
from .callbacks.mixup import MixUp, MixUpLoss
from .callbacks.metrics import AvgStats, AvgStatsCallback, accuracy, format_time
from .callbacks.progress import ProgressCallback
from .callbacks.recorder import Recorder, smooth_ema, suggest_lr
from .callbacks.schedule import (LR_Find, ParamScheduler, annealer, combine_scheds, cos_1cycle_anneal, create_phases,
                                 fit_one_cycle, lr_find, sched_cos, sched_exp, sched_lin, sched_no)
from .callbacks.transforms import BatchTransformXCallback, Normalize, channel_stats, normalize_chan, view_tfm
from .core import camel2snake, listify, to_device
from .data.core import DataBunch, Dataset, get_dls
from .losses import (HardBootstrappingLoss, LabelSmoothingCrossEntropy, NoneReduce, SoftBootstrappingLoss,
                     SoftTargetCrossEntropy, lin_comb, loss_reduction, reduce_loss, smooth_one_hot)
from .models import (GeneralRelu, Lambda, adapt_model, conv_layer, flatten, get_cnn_layers, get_cnn_model, init_cnn,
                     resnet18_cifar, resnet34_cifar)
from .learner import (EVENTS, Callback, CancelBatchException, CancelEpochException, CancelTrainException, Learner,
                      TrainEvalCallback, param_getter)

__version__ = '0.1.0'

__all__ = [
    # learner
    'Learner', 'Callback', 'TrainEvalCallback', 'EVENTS', 'CancelTrainException', 'CancelEpochException',
    'CancelBatchException', 'param_getter',
    # core callbacks
    'DeviceCallback', 'CudaCallback', 'default_device', 'BatchTransformXCallback', 'normalize_chan', 'Normalize',
    'channel_stats', 'view_tfm', 'AvgStats', 'AvgStatsCallback', 'accuracy', 'format_time', 'ProgressCallback',
    'Recorder', 'suggest_lr', 'smooth_ema',
    # schedules and telemetry
    'annealer', 'sched_lin', 'sched_cos', 'sched_no', 'sched_exp', 'combine_scheds', 'cos_1cycle_anneal',
    'create_phases', 'ParamScheduler', 'LR_Find', 'fit_one_cycle', 'lr_find', 'Hook', 'Hooks', 'ActivationStats',
    # models
    'Lambda', 'flatten', 'GeneralRelu', 'conv_layer', 'get_cnn_layers', 'get_cnn_model', 'init_cnn',
    'resnet18_cifar', 'resnet34_cifar', 'adapt_model',
    # regularization
    'MixUp', 'MixUpLoss', 'lin_comb', 'reduce_loss', 'loss_reduction', 'NoneReduce', 'smooth_one_hot',
    'LabelSmoothingCrossEntropy', 'SoftTargetCrossEntropy', 'SoftBootstrappingLoss', 'HardBootstrappingLoss',
    # data
    'Dataset', 'DataBunch', 'get_dls',
    # helpers
    'listify', 'camel2snake', 'to_device',
]
