"""The public API, imported on first use of a name of `minilearn` (see `minilearn/__init__.py`)."""
from functools import partial

from .callbacks.augment import RandomCropPad, RandomFlip, RandomResizedCrop
from .callbacks.checkpoint import (CheckpointCallback, EarlyStoppingCallback, SaveModelCallback, TerminateOnNaNCallback,
                                   TrackerCallback, TrainingInterrupted)
from .callbacks.device import ChannelsLast, CudaCallback, DeviceCallback, default_device
from .callbacks.distributed import DistributedCallback, ShardSampler, distrib_ctx, num_distrib, rank_distrib, shard_loader
from .callbacks.coteaching import CoTeaching, JoCoR, forget_rate_schedule
from .callbacks.hooks import ActivationStats, Hook, Hooks
from .callbacks.mixup import CutMix, MixHandler, MixUp, MixUpCutMix, MixUpLoss
from .callbacks.noise import ELR, AreaUnderMargin, ELRLoss
from .callbacks.loggers import CSVLogger, LoggerCallback, TensorBoardCallback, fit_hyperparameters
from .callbacks.mlflow_logger import MLflowCallback  # imports mlflow only when one is built
from .callbacks.optuna_pruning import OptunaPruningCallback  # imports optuna only when one is built
from .callbacks.metrics import (AccumMetric, AvgStats, AvgStatsCallback, balanced_accuracy, f1_score, format_time,
                                precision_score, recall_score, top_k_accuracy)
from .metrics import accuracy
from .callbacks.precision import Compile, GradientAccumulation, GradientClipping, MixedPrecision
from .callbacks.progress import ProgressCallback
from .callbacks.recorder import Recorder, smooth_ema, suggest_lr
from .callbacks.schedule import (LR_Find, ParamScheduler, annealer, combine_scheds, cos_1cycle_anneal, create_phases,
                                 fine_tune, fit_one_cycle, lr_find, sched_cos, sched_exp, sched_lin, sched_no)
from .callbacks.transforms import BatchTransformXCallback, view_tfm
from .data.normalize import Normalize, channel_stats, norm_stats, normalize_chan
from .core import camel2snake, listify, to_device
from .data.core import DataBunch, Dataset, TensorLoader, get_dls
from .data.sampler import ResumableLoader, ResumableSampler
from .data.external import (URLs, ChecksumError, DownloadError, UnsafeArchiveError, default_data_dir, download_url,
                            untar_data)
from .data.formats import (CIFAR10_CLASSES, cifar10_data, cifar10_databunch, mnist_data, mnist_databunch, read_cifar10,
                           read_idx, read_mnist)
from .data.items import (CategoryProcessor, ImageList, ItemList, LabeledData, Processor, SplitData, get_files,
                         grandparent_splitter, image_extensions, label_by_func, label_image_folder, open_image,
                         parent_labeler, random_splitter, split_by_func)
from .data.transforms import (MakeRGB, ResizeFixed, Transform, compose, make_rgb, order_tfms, show_batch,
                              show_image, to_byte_tensor, to_float_tensor)
from .serialization import CheckpointError, CorruptCheckpointError, atomic_write, safe_load
from .data.shapes import SHAPE_NAMES, ShapesDataset, make_shapes, save_shapes_folder, shapes_databunch, shapes_datasets
from .export import Predictor, UnsafeArtifactError, export_learner, load_learner, load_predictor
from .predictions import get_preds, hflip, predict, tta
from .interpret import ClassificationInterpretation, show_results
from .model_summary import ModelSummary, summary
from .losses import (GeneralizedCrossEntropy, HardBootstrappingLoss, LabelSmoothingCrossEntropy, NoneReduce,
                     SoftBootstrappingLoss, SoftTargetCrossEntropy, SymmetricCrossEntropy, lin_comb, loss_reduction,
                     reduce_loss, smooth_one_hot)
from .noisy import (ASYMMETRIC_MAPPINGS, NOISE_KINDS, LabelIssues, NoisyLabels, RelabeledDataset, add_label_noise,
                    check_noise_kind, clean_dataset, dataset_labels, find_label_issues, inject_label_noise,
                    out_of_fold_probs, stratified_folds)
from .models import (GeneralRelu, Lambda, adapt_model, conv_layer, flatten, get_cnn_layers, get_cnn_model, init_cnn,
                     resnet18_cifar, resnet34_cifar)
from . import datasets
from .callback import (EVENTS, Callback, CancelBatchException, CancelEpochException, CancelTrainException, Order,
                       TrainEvalCallback)
from .learner import Learner, param_getter
from .vision import (AdaptiveConcatPool2d, PretrainedWeightsError, TimmBody, create_body, create_head,
                     create_vision_model, default_split, vision_learner)
from .core import lr_range

_loaded = True  # the whole API is importable (checked by minilearn.__getattr__)
