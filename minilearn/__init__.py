"""minilearn: a small, fast, fastai-style callback training framework for PyTorch.

The public names below are imported on first use (PEP 562), all at once from `minilearn._api`, so
that `minilearn --help`, `--version` and a mistyped option are answered without importing torch.
`from minilearn import *` and `minilearn.Learner` work as with eager imports.
"""
import importlib
import importlib.util
from functools import partial
from typing import Any

__version__ = '0.1.0'

__all__ = [
    # learner
    'Learner', 'Callback', 'TrainEvalCallback', 'EVENTS', 'CancelTrainException', 'CancelEpochException',
    'CancelBatchException', 'param_getter', 'Order',
    # core callbacks
    'DeviceCallback', 'CudaCallback', 'default_device', 'BatchTransformXCallback', 'normalize_chan', 'Normalize',
    'channel_stats', 'view_tfm', 'AvgStats', 'AvgStatsCallback', 'accuracy', 'format_time', 'ProgressCallback',
    'Recorder', 'suggest_lr', 'smooth_ema',
    # metrics of the whole pass
    'AccumMetric', 'top_k_accuracy', 'balanced_accuracy', 'f1_score', 'precision_score', 'recall_score',
    # schedules and telemetry
    'annealer', 'sched_lin', 'sched_cos', 'sched_no', 'sched_exp', 'combine_scheds', 'cos_1cycle_anneal',
    'create_phases', 'ParamScheduler', 'LR_Find', 'fit_one_cycle', 'lr_find', 'Hook', 'Hooks', 'ActivationStats',
    # models
    'Lambda', 'flatten', 'GeneralRelu', 'conv_layer', 'get_cnn_layers', 'get_cnn_model', 'init_cnn',
    'resnet18_cifar', 'resnet34_cifar', 'adapt_model',
    # transfer learning
    'vision_learner', 'create_body', 'create_head', 'create_vision_model', 'AdaptiveConcatPool2d', 'TimmBody',
    'default_split', 'PretrainedWeightsError', 'fine_tune', 'lr_range',
    # regularization
    'MixUp', 'CutMix', 'MixUpCutMix', 'MixHandler', 'MixUpLoss', 'lin_comb', 'reduce_loss', 'loss_reduction', 'NoneReduce', 'smooth_one_hot',
    'LabelSmoothingCrossEntropy', 'SoftTargetCrossEntropy', 'SoftBootstrappingLoss', 'HardBootstrappingLoss',
    'GeneralizedCrossEntropy', 'SymmetricCrossEntropy',
    # data
    'Dataset', 'DataBunch', 'get_dls', 'TensorLoader', 'ResumableLoader', 'ResumableSampler', 'image_extensions', 'get_files', 'ItemList', 'ImageList',
    'open_image',
    'SplitData', 'split_by_func', 'grandparent_splitter', 'random_splitter', 'Processor', 'CategoryProcessor',
    'LabeledData', 'label_by_func', 'parent_labeler', 'label_image_folder', 'Transform', 'MakeRGB', 'make_rgb',
    'ResizeFixed', 'to_byte_tensor', 'to_float_tensor', 'order_tfms', 'compose', 'show_image', 'show_batch',
    'norm_stats', 'URLs', 'DownloadError', 'ChecksumError', 'UnsafeArchiveError', 'default_data_dir',
    'download_url', 'untar_data', 'read_idx', 'read_mnist', 'read_cifar10', 'CIFAR10_CLASSES', 'cifar10_data',
    'cifar10_databunch', 'mnist_data', 'mnist_databunch',
    'SHAPE_NAMES', 'make_shapes', 'ShapesDataset', 'shapes_datasets', 'shapes_databunch', 'save_shapes_folder',
    # label noise
    'inject_label_noise', 'add_label_noise', 'NoisyLabels', 'find_label_issues', 'LabelIssues',
    'NOISE_KINDS', 'ASYMMETRIC_MAPPINGS', 'check_noise_kind',
    'out_of_fold_probs', 'stratified_folds', 'dataset_labels', 'clean_dataset', 'RelabeledDataset',
    'ELR', 'ELRLoss', 'AreaUnderMargin', 'CoTeaching', 'JoCoR', 'forget_rate_schedule',
    # performance and scale
    'ChannelsLast', 'RandomCropPad', 'RandomFlip', 'RandomResizedCrop',
    'MixedPrecision', 'GradientClipping', 'GradientAccumulation', 'Compile', 'DistributedCallback', 'distrib_ctx',
    'rank_distrib', 'num_distrib', 'shard_loader', 'ShardSampler',
    # reliability
    'SaveModelCallback', 'EarlyStoppingCallback', 'TerminateOnNaNCallback', 'TrackerCallback', 'CheckpointError',
    'CorruptCheckpointError', 'safe_load', 'atomic_write', 'CheckpointCallback', 'TrainingInterrupted',
    # after training
    'get_preds', 'predict', 'tta', 'hflip', 'show_results', 'summary', 'ModelSummary',
    'ClassificationInterpretation', 'LoggerCallback', 'CSVLogger', 'TensorBoardCallback', 'fit_hyperparameters',
    'MLflowCallback', 'OptunaPruningCallback', 'export_learner', 'load_predictor',
    'load_learner', 'Predictor', 'UnsafeArtifactError',
    # helpers
    'listify', 'camel2snake', 'to_device', 'partial', 'datasets',
]


def __getattr__(name: str) -> Any:
    """One of minilearn's modules, or a public name (importing the whole API on first use)."""
    if not name.startswith('_'):
        if importlib.util.find_spec(f'{__name__}.{name}') is not None:  # a module (`from . import models`): just it
            return importlib.import_module(f'{__name__}.{name}')
        if name in __all__:
            api = importlib.import_module(f'{__name__}._api')
            if getattr(api, '_loaded', False):  # False: asked for while `_api` itself is importing
                globals().update((public, getattr(api, public)) for public in __all__)
                return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
