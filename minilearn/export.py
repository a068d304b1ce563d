"""A pickle-free inference artefact: `export_learner` writes it, `load_predictor` reads it back as a `Predictor`.

The artefact is two files with the same stem: `model.pt2`, a `torch.export` program (the learner's
batch transforms, such as normalization, followed by the model), and `model.json` with the vocab,
the normalization statistics, the expected input shape, the activation and the item transforms.

Item transforms are stored by name and settings and rebuilt on load, never pickled. Supported:
minilearn's `make_rgb`/`MakeRGB`, `ResizeFixed(size)`, `to_byte_tensor`, `to_float_tensor`, and
torchvision's (v1 or v2) `Resize`, `CenterCrop`, `Grayscale`, `ToTensor`, `PILToTensor`, `Normalize`.
With any other item transform the artefact still predicts on model-ready tensors.

A model that `torch.export` cannot trace is saved as a plain dict of tensors (`model.pt`) plus its
architecture: the class's import path (`module:qualname`) and its constructor arguments when known. Loading
rebuilds it only from architectures the caller allows (`load_predictor(path, architectures=[MyNet])`) or
minilearn's own; a name read from the file is never imported (see `export_learner`).

Loading never unpickles: JSON is parsed, the archive is checked for pickled entries, and `torch.load`
is held to `weights_only=True` for the duration of the load (`weights_only_loads`).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import json
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as transforms_v1
from torchvision.transforms import v2
from torch import nn

from . import models
from .callbacks.device import DeviceCallback
from .checks import is_class_index_loss
from .core import callable_name, unwrap_partial
from .data import transforms as item_tfms
from .data.normalize import Normalize, norm_stats
from .data.transforms import order_tfms
from .predictions import _first_batch, decode_prediction, inference_callbacks, item_to_tensor

__all__ = ['export_learner', 'load_predictor', 'load_learner', 'Predictor', 'UnsafeArtifactError',
           'weights_only_loads', 'ARCHITECTURES', 'arch_path']

FORMAT, FORMAT_VERSION = 'minilearn-export', 1
# Builders from minilearn.models that `state_dict` artefacts may name (`torchvision:<name>` works too).
ARCHITECTURES = ('resnet18_cifar', 'resnet34_cifar')


class UnsafeArtifactError(Exception):
    """An artefact asked for an unsafe load (unpickling arbitrary objects); it was refused."""


# ---- the torch.load guard -------------------------------------------------------------------------
@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Within the block `torch.load` refuses `weights_only=False` and forces `weights_only=True`.

    `torch.export.load` retries with `weights_only=False` when the safe load of its sample inputs fails,
    and uses it for weights marked `use_pickle`; this makes both fail instead. It replaces `torch.load`
    process-wide for the duration of the block (the one sanctioned patch in minilearn): guarded loads
    take turns through a lock, and a `torch.load` from another thread meanwhile is guarded too.
    """
    with _GUARD_LOCK:
        yield from _guarded_torch_load()


_GUARD_LOCK = threading.RLock()  # serialises the blocks that swap torch.load (nested ones in a thread are fine)


def _guarded_torch_load() -> Iterator[None]:
    original = torch.load

    def guarded_load(*args: Any, **kwargs: Any) -> Any:
        if kwargs.get('weights_only') is False:
            raise UnsafeArtifactError("refused torch.load(weights_only=False) while loading an artefact: it would "
                                      "unpickle arbitrary objects (a crafted file can run code). The file is not a "
                                      "plain minilearn export, or it was modified; re-export it from the learner")
        if kwargs.get('pickle_module') is not None:
            raise UnsafeArtifactError("refused torch.load with a custom pickle_module while loading an artefact")
        kwargs['weights_only'] = True
        return original(*args, **kwargs)

    torch.load = torch.serialization.load = guarded_load
    try:
        yield
    finally:
        if torch.load is guarded_load: torch.load = torch.serialization.load = original


def _check_archive(path: Path) -> None:
    """Refuse a `.pt2` archive holding pickled weights or constants, or custom objects (all need unpickling)."""
    from torch.export.pt2_archive import constants as names
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise ValueError(f"{path} is not a torch.export archive (.pt2 zip file): {e}") from e
    with archive:
        files = archive.namelist()
        if not any(f.endswith('/archive_format') or f == 'archive_format' for f in files):
            raise UnsafeArtifactError(f"{path} is not in the current torch.export archive format (the legacy format "
                                      f"is loaded through pickle); re-export it")
        for f in files:
            if not f.endswith('_config.json'): continue
            is_constants = f'/{names.CONSTANTS_DIR}' in f'/{f}'
            if not is_constants and f'/{names.WEIGHTS_DIR}' not in f'/{f}': continue
            for fqn, meta in json.loads(archive.read(f)).get('config', {}).items():
                allowed = names.TENSOR_CONSTANT_FILENAME_PREFIX if is_constants else names.WEIGHT_FILENAME_PREFIX
                if meta.get('use_pickle') or not str(meta.get('path_name', '')).startswith(allowed):
                    raise UnsafeArtifactError(f"{path}: entry {fqn!r} is stored as a pickled object "
                                              f"({meta.get('path_name')!r}); refusing to load it")


# ---- describing and rebuilding item transforms ----------------------------------------------------
def _torchvision_kind(tfm: Any) -> str | None:
    module = type(tfm).__module__
    if not module.startswith('torchvision.transforms'): return None
    return 'v2' if module.startswith('torchvision.transforms.v2') else 'v1'


def _size(size: Any) -> Any:
    return list(size) if isinstance(size, (tuple, list)) else size


_OWN_TFMS = ('make_rgb', 'MakeRGB', 'ResizeFixed', 'to_byte_tensor', 'to_float_tensor')


def _describe_tfm(tfm: Any) -> dict:
    """JSON settings of one item transform; `supported: False` when it cannot be rebuilt."""
    name, kind = callable_name(tfm), _torchvision_kind(tfm)
    if kind is None:
        if name not in _OWN_TFMS: return {'name': name, 'supported': False}
        module = getattr(tfm, '__module__', None) or type(tfm).__module__
        if module != 'minilearn.data.transforms':
            warnings.warn(f"export: item transform {name!r} from {module} is stored by name and rebuilt as "
                          f"minilearn.data.transforms.{name} on load; make sure they behave the same", stacklevel=4)
        return {'name': name, 'size': _size(tfm.size)} if name == 'ResizeFixed' else {'name': name}
    described = {'name': name, 'torchvision': kind}
    if name == 'Resize':
        interpolation = getattr(tfm.interpolation, 'value', tfm.interpolation)  # an enum in v1, a str in v2
        described.update(size=_size(tfm.size), interpolation=interpolation, max_size=tfm.max_size,
                         antialias=tfm.antialias)
    elif name == 'CenterCrop': described.update(size=_size(tfm.size))
    elif name == 'Grayscale': described.update(num_output_channels=tfm.num_output_channels)
    elif name == 'Normalize': described.update(mean=list(map(float, tfm.mean)), std=list(map(float, tfm.std)))
    elif name not in ('ToTensor', 'PILToTensor'): described['supported'] = False
    return described


def _rebuild_tfm(d: Mapping) -> Callable:
    """An item transform from its JSON settings (the inverse of `_describe_tfm`)."""
    name = d['name']
    if 'torchvision' not in d:
        if name in ('make_rgb', 'to_byte_tensor', 'to_float_tensor'): return getattr(item_tfms, name)
        if name == 'MakeRGB': return item_tfms.MakeRGB()
        if name == 'ResizeFixed': return item_tfms.ResizeFixed(tuple(d['size']))
    else:
        T = v2 if d['torchvision'] == 'v2' else transforms_v1
        if name == 'Resize':
            return T.Resize(d['size'], interpolation=T.InterpolationMode(d['interpolation']), max_size=d['max_size'],
                            antialias=d['antialias'])
        if name == 'CenterCrop': return T.CenterCrop(d['size'])
        if name == 'Grayscale': return T.Grayscale(int(d['num_output_channels']))
        if name == 'Normalize': return T.Normalize(d['mean'], d['std'])
        if name in ('ToTensor', 'PILToTensor'): return getattr(T, name)()
    raise ValueError(f"item transform {name!r} cannot be rebuilt")


# ---- export ---------------------------------------------------------------------------------------
class _InferenceProgram(nn.Module):
    """What the artefact runs: the learner's batch transforms (normalization...) then the model."""

    def __init__(self, batch_tfms: list[Callable], model: nn.Module):
        super().__init__()
        self.batch_tfms, self.model = batch_tfms, model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for tfm in self.batch_tfms: x = tfm(x)
        return self.model(x)


def _batch_tfms(learn: Any) -> list[Callable]:
    """Copies of the `tfm`s of the learner's inference callbacks (device moves need none)."""
    tfms = []
    for cb in inference_callbacks(learn):
        if isinstance(cb, DeviceCallback): continue
        if not callable(getattr(cb, 'tfm', None)):
            raise ValueError(f"export cannot include the inference callback {type(cb).__name__}: only device moves "
                             f"and batch transforms (BatchTransformXCallback(tfm)) can go into the artefact")
        tfms.append(copy.deepcopy(cb.tfm))  # tracing must not touch the live transform (Normalize caches stats)
    return tfms


def _sample_input(learn: Any) -> torch.Tensor:
    dl = learn.data.valid_dl if learn.data.valid_dl is not None else learn.data.train_dl
    xb, _ = learn._split_batch(_first_batch(dl))
    if not isinstance(xb, torch.Tensor):
        raise TypeError(f"export needs a model taking one tensor; the loader gives {type(xb).__name__} inputs")
    xb = xb[:2].cpu()
    return xb if len(xb) == 2 else torch.cat([xb, xb])  # a batch of 2: the batch size stays dynamic


def _try_export(program: nn.Module, sample: torch.Tensor) -> tuple[Any, bool, BaseException | None]:
    """The exported program with a dynamic batch size, else with batch size 1, else (None, _, the error)."""
    try:
        return torch.export.export(program, (sample,), dynamic_shapes=({0: torch.export.Dim('batch')},)), True, None
    except Exception:
        pass
    try:
        return torch.export.export(program, (sample[:1],)), False, None
    except Exception as e:
        return None, False, e


def _json_value(v: Any) -> Any:
    if isinstance(v, (str, int, float, bool)) or v is None: return v
    if isinstance(v, torch.Tensor) and v.numel() == 1: return v.item()
    return str(v)


def _settings(learn: Any, sample: torch.Tensor) -> dict:
    stats = norm_stats(learn)
    vocab = getattr(learn.data, 'vocab', None)
    item_tfms = getattr(learn.data, 'item_tfms', None)
    if item_tfms is not None:
        item_tfms = [_describe_tfm(t) for t in order_tfms(item_tfms)]
        unsupported = [d['name'] for d in item_tfms if d.get('supported') is False]
        if unsupported:
            warnings.warn(f"export: item transform(s) {unsupported} cannot be stored without pickling; the loaded "
                          f"Predictor will predict on model-ready tensors only", stacklevel=3)
    classification = is_class_index_loss(learn.loss_func)
    return {'format': FORMAT, 'version': FORMAT_VERSION, 'torch_version': torch.__version__, 'model': None,
            'vocab': None if vocab is None else [_json_value(v) for v in vocab],
            'normalize': None if stats is None else {'mean': stats[0].tolist(), 'std': stats[1].tolist()},
            'input_shape': list(sample.shape[1:]), 'input_dtype': str(sample.dtype).replace('torch.', ''),
            'classification': classification, 'activation': 'softmax' if classification else 'identity',
            'item_tfms': item_tfms}


def _check_arch(arch: str | None, arch_kwargs: Any) -> None:
    if arch is None: return
    if not isinstance(arch, str): raise TypeError(f"arch must be the name of an architecture, got {arch!r}")
    try:
        json.dumps(arch_kwargs or {})
    except TypeError as e:
        raise TypeError(f"arch_kwargs must hold JSON values only (numbers, strings, lists), got {arch_kwargs!r}") from e


def arch_path(builder: Any) -> str:
    """`module:qualname` of a class or function (of the function a `functools.partial` wraps)."""
    builder = unwrap_partial(builder)
    return f'{builder.__module__}:{builder.__qualname__}'


def _known_kwargs(model: nn.Module) -> dict | None:
    """The constructor arguments of the model when they are known: {} when its class needs none, else None."""
    try:
        signature = inspect.signature(type(model))
    except (TypeError, ValueError):
        return None
    needed = [p for p in signature.parameters.values()
              if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    return None if needed else {}


def export_learner(learn: Any, path: str | Path, arch: str | None = None, arch_kwargs: dict | None = None) -> Path:
    """Write `path` (a `.pt2` torch.export program) and its settings (`.json` beside it); returns the model file.

    A model that torch.export cannot trace is written, with a warning, as a state dict (`.pt`, a plain
    dict of tensors) and its architecture: `arch`, else the class's `module:qualname`, with `arch_kwargs`
    (else {} when the class needs no arguments, else unknown). `arch` may also name one of
    `ARCHITECTURES` (minilearn.models) or `torchvision:<name>`. See `load_predictor` for the load.
    """
    path = Path(path)
    if path.suffix != '.pt2':
        raise ValueError(f"export writes a torch.export program: the path must end in .pt2, got {path}")
    _check_arch(arch, arch_kwargs)
    model = copy.deepcopy(learn.model).cpu().eval()
    program = _InferenceProgram(_batch_tfms(learn), model).eval()
    sample = _sample_input(learn)
    exported, dynamic_batch, error = _try_export(program, sample)
    if exported is None:
        if arch is None: arch = arch_path(type(model))
        if arch_kwargs is None: arch_kwargs = _known_kwargs(model)
        _check_fallback(learn, model, arch, arch_kwargs, error)
    settings = _settings(learn, sample)
    path.parent.mkdir(parents=True, exist_ok=True)
    if exported is not None:
        torch.export.save(exported, path)
        settings['model'] = {'kind': 'torch.export', 'file': path.name, 'dynamic_batch': dynamic_batch}
    else:
        path = path.with_suffix('.pt')
        torch.save({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, path)
        settings['model'] = {'kind': 'state_dict', 'file': path.name, 'arch': arch, 'arch_kwargs': arch_kwargs}
    path.with_suffix('.json').write_text(json.dumps(settings, indent=1))
    return path


def _check_fallback(learn: Any, model: nn.Module, arch: str, arch_kwargs: dict | None, error: BaseException) -> None:
    """Raise when an untraceable model cannot be exported as weights; warn that it will be."""
    if len(_batch_tfms(learn)) > (norm_stats(learn) is not None):
        raise ValueError("a state-dict export can only replay normalization as its batch transform; this learner "
                         "has other batch transforms: move those steps into the model") from error
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ''
    kwargs = (f"constructor arguments {arch_kwargs}" if arch_kwargs is not None else
              "constructor arguments unknown (pass arch_kwargs= to export, or a builder that needs none to load)")
    name = type(model).__name__
    warnings.warn(f"torch.export could not trace {name} ({type(error).__name__}: {reason}); exporting its "
                  f"state_dict with architecture {arch!r} instead, {kwargs}. Loading rebuilds it only from an "
                  f"architecture you allow: load_predictor(path, architectures=[{name}])", stacklevel=3)


# ---- loading -------------------------------------------------------------------------------------
def _read_settings(path: Path) -> dict:
    settings_path = path.with_suffix('.json')
    if not settings_path.is_file():
        raise FileNotFoundError(f"no settings file {settings_path} beside the model: an export writes both "
                                f"(learn.export('model.pt2') -> model.pt2 and model.json)")
    settings = json.loads(settings_path.read_text())
    if not isinstance(settings, dict) or settings.get('format') != FORMAT:
        raise ValueError(f"{settings_path} is not a minilearn export settings file")
    if settings.get('version', 0) > FORMAT_VERSION:
        raise ValueError(f"{settings_path} has format version {settings['version']}; this minilearn reads "
                         f"up to {FORMAT_VERSION}: upgrade minilearn")
    return settings


def _model_file(path: Path, entry: Mapping) -> Path:
    name = str(entry.get('file', ''))
    if not name or Path(name).name != name:
        raise ValueError(f"the settings name the model file {name!r}: it must be a file name beside the settings")
    return path.with_name(name)


def _allowed(architectures: Mapping[str, Callable] | Iterable[Callable] | None) -> dict[str, Callable]:
    """The caller's allowed architectures by name: a mapping as given, classes or builders by `module:qualname`."""
    if architectures is None: return {}
    if isinstance(architectures, Mapping): return dict(architectures)
    if isinstance(architectures, (str, bytes)) or not all(callable(a) for a in architectures):
        raise TypeError(f"architectures must be a list of classes (or builders) or a dict of name -> builder, "
                        f"got {architectures!r}")
    return {arch_path(a): a for a in architectures}


def _architecture(name: str, architectures: Mapping[str, Callable] | Iterable[Callable] | None) -> Callable:
    allowed = _allowed(architectures)
    if name in allowed: return allowed[name]
    if ':' in name and not name.startswith('torchvision:'):  # an import path: never imported unasked
        raise ValueError(f"this export holds the weights of the architecture {name!r}, which is not in the allowed "
                         f"list: load_predictor(path, architectures=[{name.rsplit(':', 1)[1].rsplit('.', 1)[-1]}]) "
                         f"after importing it from {name.split(':', 1)[0]} (an export never imports code by itself)")
    if name.startswith('torchvision:'):
        tv_name = name.split(':', 1)[1]
        if tv_name in torchvision.models.list_models():
            return functools.partial(torchvision.models.get_model, tv_name, weights=None)
    if name in ARCHITECTURES:
        if hasattr(models, name): return getattr(models, name)
    raise ValueError(f"unknown architecture {name!r}: pass load_predictor(path, architectures={{{name!r}: builder}}), "
                     f"or use one of {list(ARCHITECTURES)} or 'torchvision:<name>'")


def _load_state_dict_model(path: Path, entry: Mapping, settings: Mapping, architectures: Mapping | None) -> nn.Module:
    builder = _architecture(str(entry.get('arch')), architectures)
    with weights_only_loads():
        weights = torch.load(path, map_location='cpu', weights_only=True)
    if not isinstance(weights, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in weights.items()):
        raise ValueError(f"{path} does not hold a plain dict of tensors")
    model = _build(builder, entry.get('arch_kwargs'), str(entry.get('arch')))
    model.load_state_dict(weights)
    normalize = settings.get('normalize')
    if normalize is None: return model.eval()
    return _InferenceProgram([Normalize(normalize['mean'], normalize['std'])], model).eval()


def _build(builder: Callable, kwargs: Any, name: str) -> nn.Module:
    """`builder(**kwargs)`; unknown arguments (None) mean calling it with none, checked first."""
    if kwargs is not None and not isinstance(kwargs, Mapping):
        raise ValueError(f"the settings give arch_kwargs {kwargs!r} for {name!r}: expected a JSON object")
    try:
        inspect.signature(builder).bind(**(kwargs or {}))
    except TypeError as e:
        recorded = (f"the recorded arguments {dict(kwargs)}" if kwargs is not None else
                    "no arguments (the export did not know them)")
        raise ValueError(f"cannot build {name!r} with {recorded}: {e}. Pass a builder that does, e.g. "
                         f"architectures={{{name!r}: functools.partial(cls, ...)}}") from None
    except ValueError:  # no signature to check (a builtin): just call it
        pass
    return builder(**(kwargs or {}))


def _load_program(path: Path) -> Callable:
    _check_archive(path)
    with weights_only_loads():
        return torch.export.load(path).module()


class Predictor:
    """Predictions from an exported artefact, without the training code: `Predictor.load(path).predict(item)`."""

    def __init__(self, model: Callable, settings: Mapping):
        self.model, self.settings = model, dict(settings)
        self.vocab = settings.get('vocab')
        self.input_shape = tuple(settings.get('input_shape') or ())
        described = settings.get('item_tfms')
        self.unsupported_tfms = [d['name'] for d in described or [] if d.get('supported') is False]
        self.item_tfms = None if described is None or self.unsupported_tfms else [_rebuild_tfm(d) for d in described]

    @classmethod
    def load(cls, path: str | Path,
             architectures: Mapping[str, Callable] | Iterable[Callable] | None = None) -> Predictor:
        """Read an export (the `.pt2`, `.pt` or `.json` path); `architectures` rebuilds state-dict exports."""
        path = Path(path)
        settings = _read_settings(path)
        entry = settings.get('model') or {}
        model_path = _model_file(path, entry)
        if entry.get('kind') == 'torch.export':
            model = _load_program(model_path)
        elif entry.get('kind') == 'state_dict':
            model = _load_state_dict_model(model_path, entry, settings, architectures)
        else:
            raise ValueError(f"unknown model kind {entry.get('kind')!r} in {path.with_suffix('.json')}")
        return cls(model, settings)

    def _activation(self, out: torch.Tensor) -> torch.Tensor:
        return F.softmax(out, dim=1) if self.settings.get('activation') == 'softmax' else out

    def predict_batch(self, xb: torch.Tensor) -> torch.Tensor:
        """Activations (probabilities for a classifier) for a batch of model-ready items."""
        if tuple(xb.shape[1:]) != self.input_shape:
            raise ValueError(f"expected items of shape {list(self.input_shape)} (a batch of them: [N, "
                             f"{', '.join(map(str, self.input_shape))}]), got {list(xb.shape)}")
        dtype = getattr(torch, str(self.settings.get('input_dtype', 'float32')), None)
        if isinstance(dtype, torch.dtype) and xb.dtype != dtype: xb = xb.to(dtype)
        if not self.settings['model'].get('dynamic_batch', True):
            return torch.cat([self._run(x[None]) for x in xb])
        return self._run(xb)

    def _run(self, xb: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(xb)
        return self._activation(out)

    def predict(self, item: Any) -> tuple:
        """`(label, class_index, probabilities)` for a path, a PIL image or a model-ready tensor."""
        if not isinstance(item, torch.Tensor) and self.unsupported_tfms:
            raise ValueError(f"this export cannot rebuild the item transform(s) {self.unsupported_tfms}: pass "
                             f"model-ready tensors of shape {list(self.input_shape)}")
        x = item_to_tensor(item, self.item_tfms, what='this export')
        probs = self.predict_batch(x[None])[0]
        return decode_prediction(probs, self.vocab, bool(self.settings.get('classification')))

    def __repr__(self) -> str:
        n = len(self.vocab) if self.vocab is not None else None
        return f'Predictor(input_shape={list(self.input_shape)}, classes={n}, model={self.settings["model"]["kind"]})'


def load_predictor(path: str | Path,
                   architectures: Mapping[str, Callable] | Iterable[Callable] | None = None) -> Predictor:
    """A `Predictor` from an export (safe for untrusted files: nothing is unpickled or imported).

    A state-dict export (a model torch.export could not trace) is rebuilt only from `architectures`, the
    ones you allow: classes or builders (`[MyNet]`, matched by `module:qualname`) or `{name: builder}`,
    besides minilearn's `ARCHITECTURES` and `torchvision:<name>`.
    """
    return Predictor.load(path, architectures=architectures)


load_learner = load_predictor  # fastai's name for it; what comes back is a Predictor, not a Learner
