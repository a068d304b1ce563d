"""The `minilearn train` job: build the data, model, loss and callbacks from checked options, train, and write
plots, the weights and `metrics.json` (its `status` says how far the run got).

cli.py parses and checks the command line, then imports this module (and with it torch) and calls
`run_train`. The options arrive checked: with `--resume DIR`, `args` holds the options saved in DIR/run.json
and `args.resume` is DIR, whose checkpoint is read here, once.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import matplotlib
import numpy
import torch

from . import __version__
from .callbacks.checkpoint import CheckpointCallback, TrainingInterrupted
from .callbacks.device import ChannelsLast, DeviceCallback, default_device
from .callbacks.metrics import AvgStatsCallback, accuracy
from .callbacks.mixup import MixUp
from .callbacks.mlflow_logger import MLflowCallback
from .callbacks.progress import ProgressCallback
from .callbacks.recorder import Recorder
from .callbacks.transforms import BatchTransformXCallback, Normalize, channel_stats
from .checks import is_class_index_loss
from .core import do_nothing
from .data.core import DataBunch
from .data.external import cifar10_databunch, mnist_databunch
from .data.items import label_image_folder
from .data.shapes import shapes_datasets
from .data.transforms import ResizeFixed, make_rgb, to_byte_tensor, to_float_tensor
from .inference import ClassificationInterpretation
from .learner import Learner
from .losses import HardBootstrappingLoss, LabelSmoothingCrossEntropy, SoftBootstrappingLoss
from .models import conv_layer, get_cnn_model, init_cnn, resnet18_cifar
from .noisy import add_label_noise
from .serialization import CheckpointError, ReadCheckpoint, atomic_write, kept_paths, latest_checkpoint
from .train_spec import (ARCHS, CHECKPOINT, CHECKPOINTS_KEPT, CNN_WIDTHS, DEFAULT_N_PER_CLASS, DEFAULT_WD, RUN_OPTIONS,
                         UsageError, data_format, one_line, options_record, valid_folder)
from .vision import PretrainedWeightsError, vision_learner

__all__ = ['run_train', 'train', 'build_learner', 'fit_and_write', 'write_status', 'STATUSES', 'METRICS_FILE']

# metrics.json's "status": written "running" before training, then one of the others. "running" in a folder
# nobody trains into any more means the process was killed before it could say so.
STATUSES = ('running', 'interrupted', 'failed', 'pruned', 'complete')  # pruned: a trial of `minilearn tune`
METRICS_FILE = 'metrics.json'


def run_train(args: argparse.Namespace, prog: str) -> int:
    """Run `minilearn train` with checked options: train, write the outputs, print a summary; returns the exit
    status (2: a setup problem, shown as one line; 130/143: interrupted by SIGINT/SIGTERM)."""
    with _cpu_threads(args.threads):
        try:
            try:
                resume = _resume_checkpoint(args)
                learn, report = build_learner(args)
            except (ValueError, TypeError, OSError, KeyError, PretrainedWeightsError, CheckpointError) as e:
                # setup problems are the user's to fix: one line
                print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
                return 2
            report = fit_and_write(args, learn, report, resume)
        except KeyboardInterrupt as e:
            if not isinstance(e, TrainingInterrupted):
                print(f"{prog}: interrupted", file=sys.stderr)
                return 130
            saved = (f"checkpoint in {e.checkpoint}; continue with: minilearn train --resume {args.out}"
                     if e.checkpoint is not None else "no checkpoint was written")
            print(f"{prog}: stopped by {signal.Signals(e.signum).name}; {saved}", file=sys.stderr)
            return e.exit_code
    print(_summary(report, args.out), flush=True)
    return 0


def train(args: argparse.Namespace) -> dict:
    """Run `minilearn train` with checked options; returns the report written to metrics.json."""
    with _cpu_threads(args.threads):
        resume = _resume_checkpoint(args)
        return fit_and_write(args, *build_learner(args), resume)


def build_learner(args: argparse.Namespace) -> tuple[Learner, dict]:
    """The Learner for checked `train` options, and the start of the run's report (for metrics.json)."""
    device = _device(args.device)
    start = time.time()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    data, data_info = _build_data(args)
    noise = _add_noise(args, data, generator)
    opt_func = partial(torch.optim.SGD, momentum=0.9, weight_decay=getattr(args, 'wd', DEFAULT_WD))
    if args.arch in ARCHS:
        model = _build_model(args, data)
        learn = Learner(model, data, _build_loss(args), opt_func=opt_func, lr=args.lr,
                        cbs=_build_callbacks(args, data, device))
    else:  # a torchvision or timm body with fastai's head; the data's own normalization stays
        arch = args.arch.removeprefix('torchvision/')
        learn = vision_learner(data, arch, pretrained=args.pretrained, loss_func=_build_loss(args),
                               opt_func=opt_func, lr=args.lr, cbs=_build_callbacks(args, data, device))
        if args.fine_tune is None: learn.unfreeze()  # --pretrained alone: the whole network trains
        model = learn.model
    if args.quiet: learn.logger = do_nothing
    args.out.mkdir(parents=True, exist_ok=True)
    if args.checkpoint_every is not None and args.resume is None: _write_run_options(args)
    data_info.update(n_train=len(data.train_ds), n_valid=len(data.valid_ds) if data.valid_dl is not None else 0,
                     n_classes=data.c_out, vocab=[str(v) for v in data.vocab] if data.vocab else None)
    data_info['split'] = _split_text(data_info, args)
    return learn, _start_report(args, data_info, noise, device, model, time.time() - start)


@contextmanager
def _cpu_threads(n_threads: int) -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(n_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _device(name: str) -> torch.device:
    if name == 'auto': return default_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UsageError(f"--device {name!r}: not a device name (try cpu, cuda, cuda:0, mps or auto)") from None
    if device.type == 'cuda':
        if not torch.cuda.is_available(): raise UsageError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == 'mps' and not (hasattr(torch.backends, 'mps') and torch.backends.mps.is_available()):
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    return device


# ---- resume: the checkpoint is read once, here, and handed to fit -------------------------------------------
def _resume_checkpoint(args: argparse.Namespace) -> ReadCheckpoint | None:
    """With --resume DIR: DIR's newest intact checkpoint, read once (before the data is built, so a finished run
    is refused at once); otherwise None."""
    if args.resume is None: return None
    try:
        checkpoint = latest_checkpoint(args.resume / CHECKPOINT, CHECKPOINTS_KEPT)
    except CheckpointError as e:
        raise UsageError(f"--resume {args.resume}: {e}") from None
    if checkpoint is None: raise UsageError(f"--resume {args.resume}: no {CHECKPOINT} there")
    done = checkpoint.state.get('epoch', 0)
    if done >= args.epochs:
        raise UsageError(f"--resume {args.resume}: that run is complete ({done} epochs); its outputs are in "
                         f"{args.resume}")
    return checkpoint


def _write_run_options(args: argparse.Namespace) -> None:
    text = json.dumps({k: v for k, v in options_record(args).items() if k != 'resume'}, indent=2) + '\n'
    atomic_write(args.out / RUN_OPTIONS, lambda f: f.write(text.encode()))


# ---- data ----------------------------------------------------------------------------------------
def _build_data(args: argparse.Namespace) -> tuple[DataBunch, dict]:
    """The DataBunch (decoded once, batches gathered from memory) and a description of it for metrics.json."""
    cache_kwargs = {'cache': True, 'num_workers': args.workers, 'seed': args.seed,
                    'progress': False if args.quiet else None}
    if args.data is None:
        n_per_class = args.n_per_class or DEFAULT_N_PER_CLASS
        n_classes = 10
        train, valid = shapes_datasets(n_per_class * n_classes, max(10, n_per_class // 4) * n_classes, size=args.size,
                                       n_classes=n_classes, seed=args.seed)
        data = DataBunch.from_tensors(train.x, train.y, valid.x, valid.y, args.bs, c_in=3, c_out=n_classes,
                                      seed=args.seed, vocab=train.vocab)
        return data, {'source': 'shapes', 'path': None}
    kind = data_format(args.data)
    if kind == 'cifar10':
        data = cifar10_databunch(args.data, args.bs, n_per_class=args.n_per_class, **cache_kwargs)
    elif kind == 'mnist':
        has_train = any(args.data.glob('train-images*idx3-ubyte*'))
        data = mnist_databunch(args.data, args.bs, n_per_class=args.n_per_class,
                               split_test=None if has_train else 0.2, **cache_kwargs)
        if not has_train: return data, {'source': kind, 'path': str(args.data), 't10k_only': True}
    else:
        tfms = [make_rgb, ResizeFixed(args.size), to_byte_tensor, to_float_tensor]
        sd = label_image_folder(args.data, tfms=tfms, train_name='train', valid_name=valid_folder(args.data),
                                n_per_class=args.n_per_class)
        data = sd.to_databunch(args.bs, c_in=3, **cache_kwargs)
    return data, {'source': kind, 'path': str(args.data)}


def _split_text(info: dict, args: argparse.Namespace) -> str:
    """What trains and what validates, in words, for the summary and metrics.json."""
    n_train, n_valid = f"{info['n_train']:,}", f"{info['n_valid']:,}"
    if info['source'] == 'shapes': return f"{n_train} generated training images, {n_valid} validation images"
    if info['source'] == 'cifar10':
        return f"{n_train} images of data_batch_1-5 train; all {n_valid} images of test_batch validate"
    if info['source'] == 'mnist':
        if info.get('t10k_only'):
            return (f"the folder holds only the t10k (test) files: its first {n_train} images train and the last "
                    f"{n_valid} validate")
        return f"{n_train} train-images train; all {n_valid} t10k (test) images validate"
    return f"{n_train} images of train/ train; {n_valid} images of {valid_folder(args.data)}/ validate"


def _add_noise(args: argparse.Namespace, data: DataBunch, generator: torch.Generator) -> dict | None:
    if not args.noise: return None
    kind = getattr(args, 'noise_kind', 'symmetric')  # run.json of a run from before --noise-kind: symmetric
    mapping = data_format(args.data) if kind == 'asymmetric' else None  # 'mnist' or 'cifar10' (checked in cli.py)
    result = add_label_noise(data.train_ds, args.noise, n_classes=data.c_out, generator=generator, kind=kind,
                             mapping=mapping)
    n_flipped = int(result.changed.sum()) if kind != 'symmetric' else round(len(result.labels) * args.noise)
    return {'ratio': args.noise, 'kind': kind, 'n_redrawn': n_flipped, 'n_changed': int(result.changed.sum())}


# ---- model, loss, callbacks ---------------------------------------------------------------------------
def _build_model(args: argparse.Namespace, data: DataBunch) -> torch.nn.Module:
    if args.arch == 'resnet18': return resnet18_cifar(n_classes=data.c_out, c_in=data.c_in)
    model = get_cnn_model(data, CNN_WIDTHS, conv_layer, leak=0.1, sub=0.4, maxv=6.)
    return init_cnn(model)


def _build_loss(args: argparse.Namespace) -> torch.nn.Module:
    loss = args.loss or ('ls' if args.label_smoothing is not None else 'ce')
    if loss == 'ce': return torch.nn.CrossEntropyLoss()
    if loss == 'ls': return LabelSmoothingCrossEntropy(0.1 if args.label_smoothing is None else args.label_smoothing)
    return SoftBootstrappingLoss() if loss == 'soft-boot' else HardBootstrappingLoss()


def _build_callbacks(args: argparse.Namespace, data: DataBunch, device: torch.device) -> list:
    mean, std = channel_stats(data.train_dl.ordered())  # the whole training set, in memory
    cbs = [DeviceCallback(device), ChannelsLast(), BatchTransformXCallback(Normalize(mean, std.clamp_min(1e-3))),
           AvgStatsCallback([accuracy]), Recorder()]
    if not args.quiet: cbs.append(ProgressCallback())
    if args.mixup is not None: cbs.append(MixUp(args.mixup, per_sample=not args.mixup_batch))
    if args.checkpoint_every is not None:
        cbs.append(CheckpointCallback(args.out / CHECKPOINT, every_n_batches=args.checkpoint_every,
                                      keep=CHECKPOINTS_KEPT))
    if getattr(args, 'mlflow', None) is not None:  # '' (the flag alone): MLflow's default store
        cbs.append(MLflowCallback(args.mlflow or None, run_name=args.out.name or None,
                                  params={'args': {k: v for k, v in options_record(args).items() if k != 'resume'}}))
    return cbs


# ---- training and outputs ------------------------------------------------------------------------------
def fit_and_write(args: argparse.Namespace, learn: Learner, report: dict, resume: ReadCheckpoint | None) -> dict:
    """Train `learn` as the options say, write the outputs and metrics.json (with the status, also when the fit
    fails or is stopped); returns the report."""
    report.update(epochs=args.epochs, history=[], files={'metrics': METRICS_FILE})
    write_status(args.out, 'running', report)  # from now on the folder says whose files it holds
    start = time.time()
    try:
        if args.fine_tune is not None:
            learn.fine_tune(args.epochs, base_lr=args.lr, freeze_epochs=args.fine_tune, resume=resume)
        elif args.schedule == 'one-cycle': learn.fit_one_cycle(args.epochs, resume=resume)
        else: learn.fit(args.epochs, resume=resume)
        if resume is not None:
            report['resumed_from'] = {'epoch': learn.position.epoch, 'batch': learn.position.batches_done}
        report['time_s']['fit'] = time.time() - start
        history = learn.find_cb(AvgStatsCallback).history
        final = {k: v for k, v in history[-1].items() if k not in ('epoch', 'time')}
        lrs = learn.find_cb(Recorder).lrs[-1]
        report.update(final=final, accuracy=final.get('valid_accuracy'), chance_accuracy=1 / learn.data.c_out,
                      history=history, lr={'first': lrs[0], 'max': max(lrs), 'last': lrs[-1]})
        _write_outputs(learn, args.out, report)
    except BaseException as e:  # the epochs that finished, and why the run stopped
        report['time_s'].setdefault('fit', time.time() - start)
        report['history'] = list(learn.find_cb(AvgStatsCallback).history)
        # optuna.TrialPruned (minilearn tune) by its name: this job does not import optuna
        status = ('interrupted' if isinstance(e, KeyboardInterrupt) else
                  'pruned' if type(e).__name__ == 'TrialPruned' else 'failed')
        write_status(args.out, status, report, error=e if status == 'failed' else None)
        raise
    if args.checkpoint_every is not None:  # the run is complete: nothing left to resume
        for path in (*kept_paths(args.out / CHECKPOINT, CHECKPOINTS_KEPT), args.out / RUN_OPTIONS):
            path.unlink(missing_ok=True)
    report['files']['metrics'] = report['files'].pop('metrics')  # listed last, as it is written last
    write_status(args.out, 'complete', report)
    _log_artifacts(learn, args.out, report)
    return report


def _log_artifacts(learn: Learner, out: Path, report: dict) -> None:
    """With --mlflow: the plots and metrics.json as artifacts of the run (the weights are in model.pth, local)."""
    tracker = learn.find_cb(MLflowCallback)
    if tracker is None: return
    for key, name in report['files'].items():
        if key != 'checkpoint': tracker.log_artifact(out / name)


def _start_report(args: argparse.Namespace, data_info: dict, noise: dict | None, device: torch.device,
                  model: torch.nn.Module, setup_time: float) -> dict:
    return {'args': options_record(args), 'data': data_info, 'noise': noise, 'device': str(device),
            'model': {'arch': args.arch, 'n_params': sum(p.numel() for p in model.parameters())},
            'time_s': {'setup': setup_time}, 'versions': _versions()}


def _versions() -> dict:
    return {'minilearn': __version__, 'torch': torch.__version__, 'numpy': numpy.__version__,
            'python': platform.python_version(), 'platform': platform.platform()}


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: those become null."""
    if isinstance(value, float) and not math.isfinite(value): return None
    if isinstance(value, dict): return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)): return [_finite(v) for v in value]
    return value


def write_status(out: Path, status: str, report: dict, error: BaseException | None = None) -> dict:
    """Write `report` with its `status` (one of STATUSES) as `out/metrics.json`, atomically; returns the report."""
    if status not in STATUSES: raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
    report['status'] = status
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    report.setdefault('started', now)
    if status == 'running': report.pop('finished', None)
    else: report['finished'] = now
    if error is not None: report['error'] = one_line(error)
    text = json.dumps(_finite({'status': status, **report}), indent=2) + '\n'
    atomic_write(out / METRICS_FILE, lambda f: f.write(text.encode()))
    return report


def _write_outputs(learn: Learner, out: Path, report: dict) -> None:
    """Plots and the weights; each file is named in `report['files']` once it is written."""
    # local: the job writes files, so it picks the window-less backend, which must happen before pyplot is first
    # imported; a session that already imported pyplot keeps its own
    if 'matplotlib.pyplot' not in sys.modules: matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    recorder = learn.find_cb(Recorder)
    plots = {'loss_plot': ('loss.png', recorder.plot_loss), 'lr_plot': ('lr.png', recorder.plot_lr)}
    if is_class_index_loss(learn.loss_func) and learn.data.valid_dl is not None:
        interp = ClassificationInterpretation.from_learner(learn)
        report['confusion_matrix'] = interp.confusion_matrix().tolist()  # rows: actual class, columns: predicted
        plots['confusion_plot'] = ('confusion.png', interp.plot_confusion_matrix)
    for key, (name, plot) in plots.items():
        fig = plot()
        fig.savefig(out / name, dpi=100, bbox_inches='tight')
        plt.close(fig)
        report['files'][key] = name
    learn.save(out / 'model.pth')
    report['files']['checkpoint'] = 'model.pth'


def _summary(report: dict, out: Path) -> str:
    accuracy, fit_time = report['accuracy'], report['time_s']['fit']
    shown = 'n/a' if accuracy is None or not math.isfinite(accuracy) else f'{accuracy:.1%}'
    return (f"minilearn train: valid accuracy {shown} (chance {report['chance_accuracy']:.1%}) after "
            f"{report['epochs']} epochs; training took {fit_time:.1f} s on {report['device']}\n"
            f"data: {report['data']['split']}\n"
            f"outputs in {out}/: " + ', '.join(report['files'].values()))
