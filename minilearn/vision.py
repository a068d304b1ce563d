"""Transfer learning for images: a pretrained body cut from an architecture, a new head, and `vision_learner`.

Matched to fastai v2 (fastai/vision/learner.py, fastai/layers.py):
- `create_body`: the model cut at its last child holding a pooling layer (`has_pool_type`), or at `cut` (an
  index into its children, or a callable); a first convolution for `n_in != 3` channels is rebuilt with the
  pretrained weights summed over the channels for 1, the first two times 1.5 for 2, the three kept and the
  others zero for more (`_update_first_layer`, `_load_pretrained_weights`).
- `create_head`: `AdaptiveConcatPool2d` (max then average pooling, concatenated), flatten, then fastai's
  `LinBnDrop` blocks: BatchNorm1d(2nf), Dropout(ps/2), Linear(2nf, 512, bias=False), ReLU, BatchNorm1d(512),
  Dropout(ps), Linear(512, n_out, bias=False); its BatchNorm layers start at weight 1, bias 1e-3 (`BatchNorm`);
  `create_vision_model` initialises the head's other layers with kaiming_normal_ (`apply_init`).
- `model_meta`: torchvision's resnets are cut at -2 and split in three groups (`_resnet_split`: stem to
  layer2, layer3 and layer4, head); other architectures split into body and head (`default_split`).
- timm (`'timm/NAME'`): `timm.create_model(NAME, num_classes=0, in_chans=n_in)`, the body returning
  `forward_features` (fastai's `TimmBody`), normalization from the model's `pretrained_cfg`.
- `vision_learner`: `n_out` from the data, normalization with the weights' statistics when pretrained
  (skipped when the input has another number of channels than the statistics, or the user normalizes
  already), `freeze()` when pretrained. The optimizer defaults to fastai's Adam: decoupled weight decay 0.01,
  betas (0.9, 0.99), eps 1e-5 (torch's AdamW), lr 1e-3 (fastai's `defaults.lr`).

Beyond fastai: `pretrained` may be the path of a state dict (loaded weights_only into the architecture before
it is cut; the keys of the parts cut away are ignored, the body's missing, unexpected or misshapen ones are
named), and pretrained weights that are neither cached nor reachable fail in seconds with where the library
caches them and the two ways out, never falling back to random weights. Head options kept: `lin_ftrs`, `ps`,
`concat_pool`, `first_bn`, `bn_final` (not `lin_first`, `y_range`, `custom_head`).
"""
from __future__ import annotations

import functools
import os
import re
import socket
import threading
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from .callbacks.metrics import AvgStatsCallback
from .callbacks.transforms import BatchTransformXCallback
from .core import optional_import
from .data.normalize import Normalize
from .learner import Learner
from .serialization import CheckpointError, is_tensor_dict, listed, safe_load, state_differences

__all__ = ['vision_learner', 'create_body', 'create_head', 'create_vision_model', 'AdaptiveConcatPool2d',
           'TimmBody', 'default_split', 'model_meta', 'has_pool_type', 'IMAGENET_STATS', 'PretrainedWeightsError']

IMAGENET_STATS = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
PROBE_TIMEOUT = 5.  # seconds to reach the weights' host before giving up (DNS included)


class PretrainedWeightsError(RuntimeError):
    """Pretrained weights that could not be fetched (offline and not cached) or do not exist."""


# ---- the body -------------------------------------------------------------------------------------
def _is_pool_type(m: nn.Module) -> bool:
    return re.search(r'Pool[123]d$', type(m).__name__) is not None


def has_pool_type(m: nn.Module) -> bool:
    """Whether `m` is a pooling layer or holds one."""
    return _is_pool_type(m) or any(has_pool_type(c) for c in m.children())


def _first_layer(model: nn.Module) -> tuple[nn.Module, nn.Module, str]:
    """(the layer of the model's first parameter, its parent, its name in the parent)."""
    child, parent, name = model, None, None
    for name in next(model.named_parameters())[0].split('.')[:-1]:
        parent, child = child, getattr(child, name)
    return child, parent, name


def _update_first_layer(model: nn.Module, n_in: int, pretrained: bool) -> None:
    # fastai's rule for pretrained weights: sum for 1 channel, first two x1.5 for 2, zeros for channels past 3.
    if n_in == 3: return
    layer, parent, name = _first_layer(model)
    if not isinstance(layer, nn.Conv2d):
        raise ValueError(f"n_in={n_in}: changing the input channels needs a first layer nn.Conv2d, found "
                         f"{type(layer).__name__}")
    if layer.in_channels != 3:
        raise ValueError(f"n_in={n_in}: the first convolution takes {layer.in_channels} channels, expected 3")
    new = nn.Conv2d(n_in, layer.out_channels, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                    dilation=layer.dilation, groups=layer.groups, bias=layer.bias is not None,
                    padding_mode=layer.padding_mode)
    if pretrained:
        with torch.no_grad():
            old = layer.weight
            if n_in == 1: new.weight.copy_(old.sum(dim=1, keepdim=True))
            elif n_in == 2: new.weight.copy_(old[:, :2] * 1.5)
            else:
                new.weight[:, :3] = old
                new.weight[:, 3:].zero_()
            if layer.bias is not None: new.bias.copy_(layer.bias)
    setattr(parent, name, new)


def _cut_model(model: nn.Module, cut: int | Callable | None) -> nn.Module:
    if cut is None:
        children = list(model.children())
        cut = next((i for i in reversed(range(len(children))) if has_pool_type(children[i])), None)
        if cut is None:
            raise ValueError(f"{type(model).__name__} has no pooling layer to cut its body at; pass cut= (an index "
                             f"into its children, or a function model -> body)")
    if isinstance(cut, int) and not isinstance(cut, bool): return nn.Sequential(*list(model.children())[:cut])
    if callable(cut): return cut(model)
    raise TypeError(f"cut must be an int (an index into the model's children) or a callable, got {cut!r}")


def create_body(model: nn.Module, n_in: int = 3, pretrained: bool = True,
                cut: int | Callable | None = None) -> nn.Module:
    """The body of `model`: cut at `cut` (default: before its last child holding a pooling layer), its first
    convolution taking `n_in` channels (from the pretrained weights when `pretrained`)."""
    body = _cut_model(model, cut)
    _update_first_layer(body, n_in, pretrained)
    return body


class TimmBody(nn.Module):
    """A timm model as a body: its `forward_features` (spatial features), or its pooled features when it has
    no spatial output (`needs_pool` False)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.needs_pool = model.pretrained_cfg.get('pool_size', None) is not None
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x) if self.needs_pool else self.model(x)


# ---- the head -------------------------------------------------------------------------------------
class AdaptiveConcatPool2d(nn.Module):
    """Adaptive max and average pooling, concatenated along the channels (max first, as fastai)."""

    def __init__(self, size: int = 1):
        super().__init__()
        self.mp, self.ap = nn.AdaptiveMaxPool2d(size), nn.AdaptiveAvgPool2d(size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.mp(x), self.ap(x)], 1)


def _batchnorm1d(nf: int) -> nn.BatchNorm1d:
    bn = nn.BatchNorm1d(nf)
    with torch.no_grad():
        bn.bias.fill_(1e-3)
        bn.weight.fill_(1.)
    return bn


def create_head(nf: int, n_out: int, lin_ftrs: Sequence[int] | None = None, ps: float | Sequence[float] = 0.5,
                pool: bool = True, concat_pool: bool = True, first_bn: bool = True,
                bn_final: bool = False) -> nn.Sequential:
    """fastai's head on `nf` body features: pooling, flatten, then per layer BatchNorm1d, Dropout, Linear (ReLU
    between), `lin_ftrs` hidden sizes (default [512]) to `n_out`; one `ps` gives ps/2 before the last layer."""
    for name, value in (('nf', nf), ('n_out', n_out)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"create_head: {name} must be a positive int, got {value!r}")
    if pool and concat_pool: nf *= 2
    sizes = [nf, 512, n_out] if lin_ftrs is None else [nf, *lin_ftrs, n_out]
    bns = [first_bn] + [True] * (len(sizes) - 1)
    ps = list(ps) if isinstance(ps, (list, tuple)) else [ps]
    if len(ps) == 1: ps = [ps[0] / 2] * (len(sizes) - 2) + ps
    if len(ps) != len(sizes) - 1:
        raise ValueError(f"create_head: ps has {len(ps)} dropout probabilities for {len(sizes) - 1} linear layers")
    acts = [nn.ReLU(inplace=True)] * (len(sizes) - 2) + [None]
    layers: list[nn.Module] = []
    if pool: layers += [AdaptiveConcatPool2d() if concat_pool else nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    for ni, no, bn, p, act in zip(sizes[:-1], sizes[1:], bns, ps, acts):
        if bn: layers.append(_batchnorm1d(ni))
        if p != 0: layers.append(nn.Dropout(p))
        layers.append(nn.Linear(ni, no, bias=not bn))
        if act is not None: layers.append(act)
    if bn_final: layers.append(nn.BatchNorm1d(sizes[-1], momentum=0.01))
    return nn.Sequential(*layers)


def _init_head(head: nn.Module, init: Callable | None) -> None:
    # fastai's apply_init/cond_init: every layer but the norm layers, weight by `init`, bias 0.
    if init is None: return
    for m in head.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm)) or not hasattr(m, 'weight'): continue
        if not isinstance(m.weight, torch.Tensor) or not m.weight.requires_grad: continue
        init(m.weight)
        if getattr(m, 'bias', None) is not None:
            with torch.no_grad(): m.bias.zero_()


def _n_features(body: nn.Module, n_in: int) -> int:
    """The channels of the body's output, from a forward of a dummy batch (fastai's `num_features_model`)."""
    modes = [(m, m.training) for m in body.modules()]
    body.eval()
    try:
        error: Exception | None = None
        for size in (64, 128, 256, 512):
            try:
                with torch.no_grad(): return body(torch.zeros(1, n_in, size, size)).shape[1]
            except RuntimeError as e:  # too small for the architecture: try larger
                error = e
        raise ValueError(f"could not run the body on a dummy {n_in}-channel image to count its features: {error}")
    finally:
        for m, training in modes: m.training = training


# ---- splits ----------------------------------------------------------------------------------------
def _params(*modules: nn.Module) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters()]


def default_split(model: nn.Module) -> list[list[nn.Parameter]]:
    """Two parameter groups: the body (`model[0]`), then the head."""
    return [_params(model[0]), _params(model[1:])]


def _resnet_split(model: nn.Module) -> list[list[nn.Parameter]]:
    return [_params(model[0][:6]), _params(model[0][6:]), _params(model[1:])]


_RESNETS = ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnext50_32x4d', 'resnext101_32x8d',
            'resnext101_64x4d', 'wide_resnet50_2', 'wide_resnet101_2')
# fastai's model_meta for the torchvision architectures it lists (cut, split), by builder name.
model_meta: dict[str, dict[str, Any]] = {name: {'cut': -2, 'split': _resnet_split} for name in _RESNETS}


# ---- fetching pretrained weights -------------------------------------------------------------------
def _unreachable(url: str) -> str | None:
    """Why `url`'s host (or the proxy for it) cannot be reached within PROBE_TIMEOUT; None when it can."""
    parsed = urllib.parse.urlparse(url)
    host, port = parsed.hostname, parsed.port or (443 if parsed.scheme == 'https' else 80)
    proxy = urllib.request.getproxies().get(parsed.scheme)
    if proxy:
        proxy_url = urllib.parse.urlparse(proxy if '://' in proxy else f'http://{proxy}')
        host, port = proxy_url.hostname, proxy_url.port or 80
    outcome: dict[str, Any] = {}

    def probe() -> None:  # in a thread: name resolution has no timeout of its own
        try:
            socket.create_connection((host, port), timeout=PROBE_TIMEOUT).close()
            outcome['ok'] = True
        except OSError as e:
            outcome['error'] = e

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(PROBE_TIMEOUT + 1)
    if outcome.get('ok'): return None
    error = outcome.get('error')
    return f"{host}:{port} is not reachable ({error or f'no answer in {PROBE_TIMEOUT:.0f} s'})"


def _fetch_error(what: str, reason: str, cache: str) -> PretrainedWeightsError:
    return PretrainedWeightsError(
        f"could not fetch the pretrained weights of {what}: {reason}. They are cached in {cache} (copy the file "
        f"there from a machine with network access), or build without downloading: pretrained=False trains from "
        f"random weights, pretrained='path/to/weights.pth' loads a state dict you have.")


def _torchvision_cache() -> Path:
    return Path(torch.hub.get_dir()) / 'checkpoints'


def _torchvision_model(builder: Callable, name: str, pretrained: bool) -> nn.Module:
    if not pretrained: return builder(weights=None)
    try:
        weights = torchvision.models.get_model_weights(builder).DEFAULT
    except (ValueError, AttributeError, KeyError) as e:
        raise PretrainedWeightsError(f"torchvision has no pretrained weights for {name}; pass pretrained=False or "
                                     f"pretrained='path/to/weights.pth'") from e
    cached = _torchvision_cache() / os.path.basename(urllib.parse.urlparse(weights.url).path)
    if not cached.is_file():
        reason = _unreachable(weights.url)
        if reason: raise _fetch_error(f"{name} ({weights}, {weights.url})", reason,
                                      f"{_torchvision_cache()} (torch.hub; set TORCH_HOME to move it)")
    return builder(weights=weights)


def _torchvision_stats(builder: Callable) -> tuple[list[float], list[float]]:
    try:
        tfm = torchvision.models.get_model_weights(builder).DEFAULT.transforms()
        return list(tfm.mean), list(tfm.std)
    except (ValueError, AttributeError, KeyError, TypeError):
        return IMAGENET_STATS


def _timm_cached_file(cfg: Any) -> str | None:
    hub_id = getattr(cfg, 'hf_hub_id', None)
    if hub_id:
        hf = optional_import('huggingface_hub', 'timm weights', 'timm')
        repo, _, revision = hub_id.partition('@')
        names = [cfg.hf_hub_filename] if getattr(cfg, 'hf_hub_filename', None) else []
        for filename in names + ['model.safetensors', 'pytorch_model.bin']:
            found = hf.try_to_load_from_cache(repo, filename, revision=revision or None)
            if isinstance(found, str): return found
    url = getattr(cfg, 'url', None)
    if url:
        cached = _torchvision_cache() / os.path.basename(urllib.parse.urlparse(url).path)
        if cached.is_file(): return str(cached)
    return None


def _timm_model(name: str, pretrained: bool, n_in: int, full: bool = False) -> nn.Module:
    timm = optional_import('timm', f"the architecture 'timm/{name}'", 'timm')
    if not timm.is_model(name.split('.')[0]):
        raise ValueError(f"timm has no architecture {name!r}; see timm.list_models('*{name[:6]}*')")
    if full: return timm.create_model(name, pretrained=False)  # with its classifier, 3 channels: for local weights
    if not pretrained: return timm.create_model(name, pretrained=False, num_classes=0, in_chans=n_in)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None or not (cfg.hf_hub_id or cfg.url or cfg.file):
        raise PretrainedWeightsError(f"timm has no pretrained weights for {name!r}; pass pretrained=False or "
                                     f"pretrained='path/to/weights.pth'")
    file = _timm_cached_file(cfg)
    if file is None:
        offline = os.environ.get('HF_HUB_OFFLINE', '').lower() in ('1', 'true', 'yes') and cfg.hf_hub_id
        reason = 'HF_HUB_OFFLINE is set' if offline else _unreachable(
            f'https://huggingface.co/{cfg.hf_hub_id}' if cfg.hf_hub_id else cfg.url)
        if reason:
            hf_cache = optional_import('huggingface_hub.constants', 'timm weights', 'timm').HF_HUB_CACHE
            raise _fetch_error(f"timm/{name} ({cfg.hf_hub_id or cfg.url})", reason,
                               f"{hf_cache} (Hugging Face hub; set HF_HOME to move it)")
    overlay = {'file': file} if file else None
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=0, in_chans=n_in)


# ---- local weights -----------------------------------------------------------------------------------
def _load_local_weights(model: nn.Module, path: Path, kept: list[str], arch: str) -> None:
    """Load the state dict at `path` into `model` (the whole architecture): the keys in `kept` (those of the
    body) must all be there with their shapes; keys the architecture does not have are errors; keys of the
    parts cut away (the classifier) are ignored."""
    state = safe_load(path)
    if isinstance(state, dict) and isinstance(state.get('model'), dict): state = state['model']  # learn.save's
    if not is_tensor_dict(state): raise CheckpointError(f"{str(path)!r} holds no state dict (a dict of tensors)")
    missing, unexpected, mismatched = state_differences(model.state_dict(), state, kept, names=('file', arch))
    problems = ([f"missing keys (in the body, not in the file): {listed(missing)}"] if missing else []) + \
        ([f"unexpected keys (not in {arch}): {listed(unexpected)}"] if unexpected else []) + \
        ([f"shape mismatches: {listed(mismatched)}"] if mismatched else [])
    if problems:
        raise CheckpointError(f"the weights in {str(path)!r} do not fit {arch}: " + '; '.join(problems)
                              + ". Pass the architecture they were saved from (the model's state_dict() before "
                                "any cut).")
    model.load_state_dict({k: state[k] for k in kept}, strict=False)


def _kept_keys(model: nn.Module, body: nn.Module) -> list[str]:
    """The names (in `model`) of the tensors that `body` still holds."""
    in_body = {id(t) for t in body.state_dict(keep_vars=True).values()}
    return [k for k, t in model.state_dict(keep_vars=True).items() if id(t) in in_body]


# ---- the model --------------------------------------------------------------------------------------
def _resolve(arch: Any) -> tuple[str, Callable | None]:
    """(name, torchvision builder or None for timm)."""
    if isinstance(arch, str):
        if arch.startswith('timm/'): return arch[len('timm/'):], None
        try:
            return arch, torchvision.models.get_model_builder(arch)
        except ValueError:
            raise ValueError(f"torchvision has no model {arch!r} (torchvision.models.list_models() lists them); "
                             f"a timm model is named 'timm/NAME'") from None
    if callable(arch) and not isinstance(arch, nn.Module):
        return getattr(arch, '__name__', type(arch).__name__), arch
    raise TypeError(f"arch must be a torchvision model builder (torchvision.models.resnet18), a torchvision model "
                    f"name ('resnet18') or 'timm/NAME', got {arch!r}")


def _check_pretrained(pretrained: Any) -> Path | None:
    if isinstance(pretrained, bool): return None
    if isinstance(pretrained, (str, os.PathLike)):
        path = Path(pretrained)
        if not path.is_file(): raise FileNotFoundError(f"pretrained={str(path)!r}: no such weights file")
        return path
    raise TypeError(f"pretrained must be True, False or the path of a state dict, got {pretrained!r}")


def _build(arch: Any, n_out: int, pretrained: bool | str | Path, cut: int | Callable | None, n_in: int,
           init: Callable | None, head_kwargs: dict) -> tuple[nn.Sequential, Callable, tuple | None]:
    """(model, splitter, the weights' normalization statistics or None)."""
    path = _check_pretrained(pretrained)
    name, builder = _resolve(arch)
    if builder is None:
        model = _timm_model(name, pretrained is True, n_in, full=path is not None)
        if path is not None:  # the whole architecture, its classifier ignored, then reset as num_classes=0 does
            classifier = model.pretrained_cfg.get('classifier') or ''
            kept = [k for k in model.state_dict() if not (classifier and k.startswith(f'{classifier}.'))]
            _load_local_weights(model, path, kept, f'timm/{name}')
            model.reset_classifier(0)
            _update_first_layer(model, n_in, True)
        body = TimmBody(model)
        nf, stats = model.num_features, (list(model.pretrained_cfg['mean']), list(model.pretrained_cfg['std']))
        head_kwargs = {'pool': body.needs_pool, **head_kwargs}
        split = default_split
    else:
        meta = model_meta.get(getattr(builder, '__name__', name), {})
        full = _torchvision_model(builder, name, pretrained is True)
        body = _cut_model(full, cut if cut is not None else meta.get('cut'))
        if path is not None: _load_local_weights(full, path, _kept_keys(full, body), name)
        _update_first_layer(body, n_in, pretrained is not False)
        nf, stats = _n_features(body, n_in), _torchvision_stats(builder)
        split = meta.get('split', default_split) if cut is None else default_split
    head = create_head(nf, n_out, **head_kwargs)
    _init_head(head, init)
    return nn.Sequential(body, head), split, stats if pretrained is not False else None


def create_vision_model(arch: Any, n_out: int, pretrained: bool | str | Path = True, cut: int | Callable | None = None,
                        n_in: int = 3, init: Callable | None = nn.init.kaiming_normal_,
                        **head_kwargs: Any) -> nn.Sequential:
    """`nn.Sequential(body, head)` from `arch` (see `vision_learner`); `head_kwargs` go to `create_head`."""
    return _build(arch, n_out, pretrained, cut, n_in, init, head_kwargs)[0]


# ---- the learner --------------------------------------------------------------------------------------
def _add_norm(learn: Learner, stats: tuple | None, n_in: int) -> None:
    if stats is None or len(stats[0]) != n_in: return  # fastai: no statistics for other channel counts
    if learn.norm_stats() is not None: return  # the user normalizes already
    if learn.find_cb(BatchTransformXCallback) is not None:
        warnings.warn("vision_learner: a BatchTransformXCallback is attached already and does not normalize, so "
                      "the pretrained weights' normalization was not added; compose it into your transform "
                      f"(Normalize({stats[0]}, {stats[1]}))", stacklevel=3)
        return
    learn.add_cb(BatchTransformXCallback(Normalize(*stats)))


def vision_learner(data: Any, arch: Any, n_out: int | None = None, pretrained: bool | str | Path = True,
                   normalize: bool | tuple = True, cut: int | Callable | None = None, loss_func: Callable | None = None,
                   opt_func: Callable = functools.partial(torch.optim.AdamW, betas=(0.9, 0.99), eps=1e-5,
                                                          weight_decay=0.01),
                   lr: float | slice = 1e-3, cbs: Any = None, metrics: Any = None, splitter: Callable | None = None,
                   n_in: int | None = None, init: Callable | None = nn.init.kaiming_normal_, lin_ftrs: Any = None,
                   ps: float | Sequence[float] = 0.5, concat_pool: bool = True, first_bn: bool = True,
                   bn_final: bool = False, **learner_kwargs: Any) -> Learner:
    """A Learner on `nn.Sequential(body, head)` for transfer learning, frozen (all but the head) when pretrained.

    `arch`: a torchvision builder (`torchvision.models.resnet18`), a torchvision model name ('resnet18'), or
    'timm/NAME' (pip install 'minilearn[timm]'). `pretrained`: True (the architecture's own weights, through
    torchvision or timm), False, or the path of a state dict of the architecture. `normalize`: add the weights'
    normalization (True), or (mean, std) to use. `n_out` defaults to `data.c_out`, `n_in` to `data.c_in`.
    `metrics` adds an AvgStatsCallback. The other arguments go to `Learner`.
    """
    n_out = getattr(data, 'c_out', None) if n_out is None else n_out
    if n_out is None:
        raise ValueError("vision_learner: the data does not say its number of classes (data.c_out); pass n_out=")
    n_in = getattr(data, 'c_in', None) or 3 if n_in is None else n_in
    if isinstance(normalize, (tuple, list)) and len(normalize) != 2:
        raise ValueError(f"normalize must be True, False or a (mean, std) pair, got {normalize!r}")
    head_kwargs = dict(lin_ftrs=lin_ftrs, ps=ps, concat_pool=concat_pool, first_bn=first_bn, bn_final=bn_final)
    model, split, stats = _build(arch, n_out, pretrained, cut, n_in, init, head_kwargs)
    cbs = list(cbs) if isinstance(cbs, (list, tuple)) else ([] if cbs is None else [cbs])
    if metrics is not None and not any(isinstance(cb, AvgStatsCallback) for cb in cbs):
        cbs.append(AvgStatsCallback(metrics))
    learn = Learner(model, data, loss_func or F.cross_entropy, opt_func=opt_func, lr=lr, cbs=cbs,
                    splitter=splitter or split, **learner_kwargs)
    if normalize is not False:
        _add_norm(learn, tuple(normalize) if isinstance(normalize, (tuple, list)) else stats, n_in)
    if pretrained is not False: learn.freeze()
    return learn
