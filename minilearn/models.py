"""Models: the course's CNN builders and initialisation, 32x32 ResNets, and adapting torchvision models."""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from numbers import Real
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

__all__ = ['Lambda', 'flatten', 'GeneralRelu', 'conv_layer', 'get_cnn_layers', 'get_cnn_model', 'init_cnn',
           'resnet18_cifar', 'resnet34_cifar', 'adapt_model']


class Lambda(nn.Module):
    """A module that applies `func` (for plain functions inside `nn.Sequential`)."""

    def __init__(self, func: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        if not callable(func): raise TypeError(f"Lambda needs a callable, got {func!r}")
        self.func = func

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.func(x)

    def extra_repr(self) -> str:
        return getattr(self.func, '__name__', repr(self.func))


def flatten(x: torch.Tensor) -> torch.Tensor:
    """(N, ...) -> (N, everything else)."""
    return x.flatten(1)


class GeneralRelu(nn.Module):
    """ReLU (leaky when `leak` is set), then minus `sub`, then clamped at `maxv` (course-v3 nb 06)."""

    def __init__(self, leak: float | None = None, sub: float | None = None, maxv: float | None = None):
        super().__init__()
        for name, value in (('leak', leak), ('sub', sub), ('maxv', maxv)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, Real)):
                raise TypeError(f"GeneralRelu {name} must be a number or None, got {value!r}")
        self.leak, self.sub, self.maxv = leak, sub, maxv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(x, self.leak) if self.leak is not None else F.relu(x)
        if self.sub is not None: x = x - self.sub  # out of place: relu's backward reads its output
        if self.maxv is not None: x = x.clamp(max=self.maxv)
        return x

    def extra_repr(self) -> str:
        return f'leak={self.leak}, sub={self.sub}, maxv={self.maxv}'


def _check_channels(**counts: Any) -> None:
    for name, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")


def conv_layer(ni: int, nf: int, ks: int = 3, stride: int = 2, bn: bool = True,
               act: Callable[..., nn.Module] | None = GeneralRelu, **act_kwargs: Any) -> nn.Sequential:
    """Conv (no bias when followed by batchnorm), activation `act(**act_kwargs)`, then BatchNorm (course-v3 nb 07)."""
    _check_channels(ni=ni, nf=nf, ks=ks, stride=stride)
    layers = [nn.Conv2d(ni, nf, ks, padding=ks // 2, stride=stride, bias=not bn)]
    if act is not None: layers.append(act(**act_kwargs))
    elif act_kwargs: raise TypeError(f"activation arguments {sorted(act_kwargs)} given with act=None")
    if bn: layers.append(nn.BatchNorm2d(nf, eps=1e-5, momentum=0.1))
    return nn.Sequential(*layers)


def _data_channels(data: Any) -> tuple[int, int]:
    c_in, c_out = getattr(data, 'c_in', None), getattr(data, 'c_out', None)
    if c_in is None or c_out is None:
        raise ValueError(f"the data must say its number of input channels and of outputs: got c_in={c_in!r}, "
                         f"c_out={c_out!r}; build the DataBunch with c_in=... and c_out=...")
    _check_channels(c_in=c_in, c_out=c_out)
    return c_in, c_out


def get_cnn_layers(data: Any, nfs: Sequence[int], layer: Callable[..., nn.Module] = conv_layer,
                   **kwargs: Any) -> list[nn.Module]:
    """Layers of a CNN: `layer` per width in `nfs` (5x5 first, 3x3 after), pooling, flatten, linear to `data.c_out`."""
    c_in, c_out = _data_channels(data)
    nfs = list(nfs)
    if not nfs: raise ValueError("nfs must list at least one layer width, e.g. [8, 16, 32, 64]")
    _check_channels(**{f'nfs[{i}]': n for i, n in enumerate(nfs)})
    nfs = [c_in] + nfs
    return [layer(nfs[i], nfs[i + 1], 5 if i == 0 else 3, **kwargs) for i in range(len(nfs) - 1)] + [
        nn.AdaptiveAvgPool2d(1), Lambda(flatten), nn.Linear(nfs[-1], c_out)]


def get_cnn_model(data: Any, nfs: Sequence[int], layer: Callable[..., nn.Module] = conv_layer,
                  **kwargs: Any) -> nn.Sequential:
    """`nn.Sequential` of `get_cnn_layers(data, nfs, layer, **kwargs)`."""
    return nn.Sequential(*get_cnn_layers(data, nfs, layer, **kwargs))


_INIT_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def init_cnn(model: nn.Module, uniform: bool = False, a: float = 0.1) -> nn.Module:
    """Kaiming-initialise every conv and linear weight (leaky-ReLU slope `a`, fan-in) and zero their biases."""
    init = nn.init.kaiming_uniform_ if uniform else nn.init.kaiming_normal_
    for module in model.modules():
        if isinstance(module, _INIT_TYPES):
            init(module.weight, a=a)
            if module.bias is not None: nn.init.zeros_(module.bias)
    return model


# ---- ResNets for 32x32 inputs ----------------------------------------------------------------------
def _stage(in_planes: int, planes: int, n_blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or in_planes != planes:
        downsample = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))
    blocks = [BasicBlock(in_planes, planes, stride, downsample)]
    blocks += [BasicBlock(planes, planes) for _ in range(n_blocks - 1)]
    return nn.Sequential(*blocks)


def _cifar_resnet(blocks_per_stage: Sequence[int], n_classes: int, c_in: int, width: int) -> nn.Sequential:
    _check_channels(n_classes=n_classes, c_in=c_in, width=width)
    widths = [width * m for m in (1, 2, 4, 8)]
    layers = OrderedDict(stem=nn.Sequential(nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                            nn.ReLU(inplace=True)))
    in_planes = width
    for i, (planes, n_blocks) in enumerate(zip(widths, blocks_per_stage)):
        layers[f'layer{i + 1}'] = _stage(in_planes, planes, n_blocks, stride=1 if i == 0 else 2)
        in_planes = planes
    layers.update(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=nn.Linear(in_planes, n_classes))
    model = nn.Sequential(layers)
    for module in model.modules():  # torchvision's ResNet initialisation
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    return model


def resnet18_cifar(n_classes: int = 10, c_in: int = 3, width: int = 64) -> nn.Sequential:
    """ResNet-18 for 32x32 inputs (3x3 stem, stride 1, no max-pool; stages of width x1, x2, x4, x8)."""
    return _cifar_resnet((2, 2, 2, 2), n_classes, c_in, width)


def resnet34_cifar(n_classes: int = 10, c_in: int = 3, width: int = 64) -> nn.Sequential:
    """ResNet-34 for 32x32 inputs (3x3 stem, stride 1, no max-pool; stages of width x1, x2, x4, x8)."""
    return _cifar_resnet((3, 4, 6, 3), n_classes, c_in, width)


# ---- adapting torchvision models -------------------------------------------------------------------
def _first_and_last(model: nn.Module) -> tuple[str, nn.Conv2d, str, nn.Linear]:
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not convs: raise ValueError(f"{type(model).__name__} has no nn.Conv2d to take c_in input channels")
    if not linears: raise ValueError(f"{type(model).__name__} has no nn.Linear classifier to give c_out outputs")
    return (*convs[0], *linears[-1])


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition('.')
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _adapted_conv(conv: nn.Conv2d, c_in: int) -> nn.Conv2d:
    new = nn.Conv2d(c_in, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                    dilation=conv.dilation, bias=conv.bias is not None, padding_mode=conv.padding_mode,
                    device=conv.weight.device, dtype=conv.weight.dtype)
    # Keep the response to an image whose channels are all equal: fold (sum) or spread (share) the channels.
    old_w, n_old = conv.weight.detach(), conv.in_channels
    with torch.no_grad():
        if c_in < n_old:
            new.weight.copy_(torch.stack([old_w[:, j::c_in].sum(1) for j in range(c_in)], 1))
        else:  # old channel i is shared by the new channels j with j % n_old == i
            sources = [j % n_old for j in range(c_in)]
            shares = torch.tensor([sources.count(i) for i in sources], dtype=old_w.dtype, device=old_w.device)
            new.weight.copy_(old_w[:, sources] / shares.view(1, -1, 1, 1))
        if conv.bias is not None: new.bias.copy_(conv.bias)
    return new


def adapt_model(model: nn.Module, c_in: int, c_out: int) -> nn.Module:
    """Give a torchvision-style model `c_in` input channels (its first conv) and `c_out` outputs (its last
    linear layer), in place; returns the model. The first conv keeps its weights folded over the new channels;
    a new classifier is freshly initialised."""
    _check_channels(c_in=c_in, c_out=c_out)
    if not isinstance(model, nn.Module): raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    conv_name, conv, linear_name, linear = _first_and_last(model)
    if conv.in_channels != c_in and conv.groups != 1:
        raise ValueError(f"the first conv ({conv_name!r}) is grouped (groups={conv.groups}); adapt it by hand")
    if conv.in_channels != c_in: _replace(model, conv_name, _adapted_conv(conv, c_in))
    if linear.out_features != c_out:
        _replace(model, linear_name, nn.Linear(linear.in_features, c_out, bias=linear.bias is not None,
                                               device=linear.weight.device, dtype=linear.weight.dtype))
    return model
