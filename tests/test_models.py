"""Models: course CNN builders and init, 32x32 ResNets, adapting torchvision models (issue 5)."""
import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import BasicBlock

from minilearn.models import (GeneralRelu, Lambda, adapt_model, conv_layer, flatten, get_cnn_layers, get_cnn_model,
                              init_cnn, resnet18_cifar, resnet34_cifar)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_general_relu_matches_its_definition_and_backpropagates():
    x = torch.linspace(-3, 3, 13, requires_grad=True)
    out = GeneralRelu(leak=0.1, sub=0.4, maxv=2.)(x)
    expected = torch.where(x > 0, x, 0.1 * x) - 0.4
    assert torch.allclose(out, expected.clamp(max=2.))
    out.sum().backward()  # nothing done in place on relu's output
    assert torch.allclose(x.grad, torch.where(x > 0, 1., 0.1) * (expected < 2.).float())
    assert torch.equal(GeneralRelu()(x), F.relu(x))
    with pytest.raises(TypeError, match='leak must be a number'):
        GeneralRelu(leak='0.1')


def test_lambda_and_flatten():
    x = torch.randn(2, 3, 4, 5)
    assert flatten(x).shape == (2, 60) and torch.equal(flatten(x), x.reshape(2, -1))
    assert torch.equal(Lambda(flatten)(x), flatten(x)) and 'flatten' in repr(Lambda(flatten))
    with pytest.raises(TypeError, match='callable'):
        Lambda(3)


def test_conv_layer_is_conv_then_activation_then_batchnorm():
    layer = conv_layer(3, 8, ks=3, stride=2, leak=0.1, sub=0.4)
    conv, act, bn = layer
    assert isinstance(conv, nn.Conv2d) and conv.bias is None and conv.stride == (2, 2) and conv.padding == (1, 1)
    assert isinstance(act, GeneralRelu) and act.leak == 0.1 and act.sub == 0.4
    assert isinstance(bn, nn.BatchNorm2d) and bn.num_features == 8
    no_bn = conv_layer(3, 8, bn=False, act=nn.ReLU)
    assert len(no_bn) == 2 and no_bn[0].bias is not None and isinstance(no_bn[1], nn.ReLU)
    assert conv_layer(3, 8, act=None, bn=False)(torch.randn(1, 3, 8, 8)).shape == (1, 8, 4, 4)
    with pytest.raises(ValueError, match='nf must be a positive int'):
        conv_layer(3, 0)


@pytest.mark.parametrize('nfs, size', [([8], 16), ([8, 16], 28), ([4, 8, 16, 32], 28), ([8, 8, 8, 8, 8], 64)])
def test_cnn_model_shapes_for_several_nfs(nfs, size):
    data = SimpleNamespace(c_in=3, c_out=7)
    model = get_cnn_model(data, nfs)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == nfs and convs[0].in_channels == 3
    assert convs[0].kernel_size == (5, 5) and all(c.kernel_size == (3, 3) for c in convs[1:])
    assert model[-1].in_features == nfs[-1] and model[-1].out_features == 7
    x = torch.randn(2, 3, size, size)
    out = x
    for i, layer in enumerate(model[:len(nfs)]):
        out = layer(out)
        assert out.shape == (2, nfs[i], math.ceil(size / 2 ** (i + 1)), math.ceil(size / 2 ** (i + 1)))
    assert model(x).shape == (2, 7)


def test_get_cnn_layers_passes_layer_kwargs_and_needs_channels():
    layers = get_cnn_layers(SimpleNamespace(c_in=1, c_out=10), [8, 16], conv_layer, leak=0.1, sub=0.4, maxv=6.)
    assert all(layer[1].maxv == 6. for layer in layers[:2])
    with pytest.raises(ValueError, match=r'c_in=None.*c_in=\.\.\.'):
        get_cnn_layers(SimpleNamespace(c_in=None, c_out=10), [8])
    with pytest.raises(ValueError, match='at least one'):
        get_cnn_model(SimpleNamespace(c_in=1, c_out=10), [])


def test_init_cnn_is_kaiming_with_zero_biases_recursively():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(64, 128, 3)), nn.Sequential(nn.Sequential(nn.Conv2d(128, 64, 3))),
                          Lambda(flatten), nn.Linear(512, 256))
    assert init_cnn(model) is model
    for m in (model[0][0], model[1][0][0], model[3]):
        fan_in = m.weight[0].numel()
        assert m.weight.std().item() == pytest.approx(math.sqrt(2 / ((1 + 0.1 ** 2) * fan_in)), rel=0.03)
        assert abs(m.weight.mean().item()) < 0.1 * m.weight.std().item()
        assert torch.equal(m.bias, torch.zeros_like(m.bias))
    init_cnn(model, uniform=True)
    w = model[1][0][0].weight
    bound = math.sqrt(6 / ((1 + 0.1 ** 2) * w[0].numel()))
    assert w.abs().max().item() <= bound and w.abs().max().item() > 0.95 * bound


def test_init_cnn_keeps_activations_from_vanishing():
    torch.manual_seed(0)
    model = init_cnn(get_cnn_model(SimpleNamespace(c_in=1, c_out=10), [8, 16, 32, 32], bn=False))
    x = torch.randn(64, 1, 28, 28)
    for layer in model[:4]: x = layer(x)
    assert 0.2 < x.std().item() < 5  # not collapsing to 0 nor exploding after four layers


def test_resnet_cifar_parameter_counts_match_the_literature():
    # kuangliu/pytorch-cifar, the models of the label-noise papers: 11,173,962 and 21,282,122 parameters
    assert n_params(resnet18_cifar(10)) == 11_173_962
    assert n_params(resnet34_cifar(10)) == 21_282_122


def test_resnet18_cifar_shape_and_width():
    model = resnet18_cifar(n_classes=5, c_in=1, width=8)
    stem = model.stem[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (1, 1) and stem.in_channels == 1
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 8 and [len(getattr(model, f'layer{i}')) for i in range(1, 5)] == [2, 2, 2, 2]
    assert [getattr(model, f'layer{i}')[0].conv1.out_channels for i in range(1, 5)] == [8, 16, 32, 64]
    assert n_params(model) < n_params(resnet18_cifar(5, 1, 16)) < n_params(resnet18_cifar(5, 1, 64))
    x = torch.randn(2, 1, 32, 32)
    assert model(x).shape == (2, 5)
    assert model[:2](x).shape == (2, 8, 32, 32)  # stem and first stage keep 32x32
    assert model[:5](x).shape == (2, 64, 4, 4)
    with pytest.raises(ValueError, match='width must be a positive int'):
        resnet18_cifar(width=0)


def test_adapt_torchvision_resnet_to_channels_and_classes():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)
    old_conv = model.conv1.weight.detach().clone()
    assert adapt_model(model, c_in=1, c_out=4) is model
    assert model.conv1.in_channels == 1 and model.fc.out_features == 4 and model.fc.in_features == 512
    assert torch.allclose(model.conv1.weight, old_conv.sum(1, keepdim=True))
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 4)

    for c_in in (2, 5):  # an image whose channels are all equal gets the same first-layer response
        rgb = torchvision.models.resnet18(weights=None)
        reference = copy.deepcopy(rgb.conv1)
        adapted = adapt_model(rgb, c_in, 1000).conv1
        x = torch.randn(1, 1, 16, 16)
        assert torch.allclose(adapted(x.expand(1, c_in, 16, 16)), reference(x.expand(1, 3, 16, 16)), atol=1e-5)


def test_adapt_model_other_torchvision_families_and_errors():
    mobilenet = adapt_model(torchvision.models.mobilenet_v3_small(weights=None), 2, 3)
    assert mobilenet(torch.randn(2, 2, 64, 64)).shape == (2, 3)
    with pytest.raises(ValueError, match='no nn.Conv2d'):
        adapt_model(nn.Sequential(nn.Linear(3, 4)), 1, 2)
    with pytest.raises(ValueError, match='no nn.Linear'):
        adapt_model(nn.Sequential(nn.Conv2d(3, 4, 3)), 1, 2)
    model = resnet18_cifar(width=4)
    with pytest.raises(ValueError, match='c_out must be a positive int'):
        adapt_model(model, 3, 0)
    assert model.fc.out_features == 10
