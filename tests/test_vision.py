"""vision_learner and its model builders (fastai v2's create_body / create_head), pretrained weights from a file,
and the fast offline error."""
import socket
import time

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import timm  # in [dev]: a missing timm fails rather than skips

import minilearn.vision as vision
from minilearn import (BatchTransformXCallback, CheckpointError, DataBunch, Dataset, Normalize, PretrainedWeightsError,
                       create_body, create_head, vision_learner)
from minilearn.vision import IMAGENET_STATS, AdaptiveConcatPool2d, TimmBody



def images(n: int = 32, c_in: int = 3, n_classes: int = 3, size: int = 32, seed: int = 0) -> DataBunch:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n, c_in, size, size, generator=g), torch.arange(n) % n_classes
    return DataBunch.from_datasets(Dataset(x, y), Dataset(x[:16], y[:16]), bs=16, c_in=c_in, c_out=n_classes)


# ---- the head and the body -----------------------------------------------------------------------------
def test_create_head_is_fastais_head():
    head = create_head(64, 5)
    kinds = [type(m) for m in head]
    assert kinds == [AdaptiveConcatPool2d, nn.Flatten, nn.BatchNorm1d, nn.Dropout, nn.Linear, nn.ReLU,
                     nn.BatchNorm1d, nn.Dropout, nn.Linear]
    assert (head[2].num_features, head[4].in_features, head[4].out_features) == (128, 128, 512)  # 2·nf, concat pool
    assert (head[8].in_features, head[8].out_features) == (512, 5)
    assert head[3].p == 0.25 and head[7].p == 0.5
    assert head[4].bias is None and head[8].bias is None  # LinBnDrop: no bias after a BatchNorm
    assert torch.equal(head[2].weight, torch.ones(128)) and torch.allclose(head[2].bias, torch.full((128,), 1e-3))
    x = torch.randn(2, 64, 3, 3)
    expected = torch.cat([F.adaptive_max_pool2d(x, 1), F.adaptive_avg_pool2d(x, 1)], 1)  # fastai: max first
    assert torch.equal(head[0](x), expected)
    assert [type(m) for m in create_head(64, 5, lin_ftrs=[], ps=0.)] == [AdaptiveConcatPool2d, nn.Flatten,
                                                                       nn.BatchNorm1d, nn.Linear]
    with pytest.raises(ValueError, match='ps has 3 dropout probabilities for 2 linear layers'):
        create_head(64, 5, ps=[0.1, 0.2, 0.3])


def test_create_body_cuts_at_the_last_pooling_child_and_adapts_the_first_conv():
    model = torchvision.models.resnet18(weights=None)
    body = create_body(model, pretrained=False)
    assert [type(m) for m in body] == [type(m) for m in list(model.children())[:-2]]  # fastai's resnet cut, -2
    assert len(create_body(torchvision.models.resnet18(weights=None), cut=5)) == 5
    assert isinstance(create_body(torchvision.models.resnet18(weights=None), cut=lambda m: m.layer1), nn.Sequential)
    pretrained = torchvision.models.resnet18(weights=None)
    w = pretrained.conv1.weight.detach().clone()
    one = create_body(pretrained, n_in=1)
    assert torch.equal(one[0].weight, w.sum(1, keepdim=True))  # fastai: the sum over the channels
    two = create_body(torchvision.models.resnet18(weights=None), n_in=2)[0].weight
    assert two.shape[1] == 2
    four = torchvision.models.resnet18(weights=None)
    w4 = four.conv1.weight.detach().clone()
    four_w = create_body(four, n_in=4)[0].weight
    assert torch.equal(four_w[:, :3], w4) and not four_w[:, 3].any()
    with pytest.raises(TypeError, match='cut must be an int'):
        create_body(torchvision.models.resnet18(weights=None), cut='layer4')
    with pytest.raises(ValueError, match='no pooling layer to cut its body at; pass cut='):
        create_body(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4, 2)))


# ---- vision_learner ----------------------------------------------------------------------------------------
@pytest.mark.parametrize('arch', [torchvision.models.resnet18, 'resnet18'])
def test_vision_learner_torchvision_body_head_and_fastais_resnet_split(arch):
    data = images()
    learn = vision_learner(data, arch, pretrained=False)
    body, head = learn.model
    assert isinstance(learn.model, nn.Sequential) and len(learn.model) == 2
    assert head[-1].out_features == data.c_out and head[4].in_features == 2 * 512
    groups = learn.splitter(learn.model)
    assert len(groups) == 3  # fastai's _resnet_split: stem..layer2, layer3..layer4, head
    assert [id(p) for p in groups[0]] == [id(p) for p in body[:6].parameters()]
    assert [id(p) for p in groups[2]] == [id(p) for p in head.parameters()]
    # not pretrained: no normalization, no freeze
    assert learn.find_cb(BatchTransformXCallback) is None and learn.frozen_idx == 0
    learn.fit(1)
    assert [[id(p) for p in g['params']] for g in learn.opt.param_groups] == [[id(p) for p in g] for g in groups]
    assert learn.model(torch.rand(2, 3, 32, 32)).shape == (2, data.c_out)


def test_vision_learner_bad_input_is_named_early():
    data = images()
    with pytest.raises(ValueError, match="torchvision has no model 'resnet7'"):
        vision_learner(data, 'resnet7', pretrained=False)
    with pytest.raises(TypeError, match='arch must be a torchvision model builder'):
        vision_learner(data, torchvision.models.resnet18(), pretrained=False)
    with pytest.raises(FileNotFoundError, match='no such weights file'):
        vision_learner(data, 'resnet18', pretrained='nowhere.pth')
    with pytest.raises(ValueError, match='pass n_out='):
        vision_learner(DataBunch(data.train_dl, data.valid_dl), 'resnet18', pretrained=False)
    with pytest.raises(ValueError, match="timm has no architecture 'nonet'"):
        vision_learner(data, 'timm/nonet', pretrained=False)


def test_timm_body_gives_features_and_the_head_pools_them():
    data = images()
    learn = vision_learner(data, 'timm/test_resnet', pretrained=False)
    body, head = learn.model
    assert isinstance(body, TimmBody) and body.needs_pool
    features = body(torch.rand(2, 3, 32, 32))
    assert features.ndim == 4 and features.shape[1] == body.model.num_features  # spatial: forward_features
    assert head[4].in_features == 2 * body.model.num_features
    assert len(learn.splitter(learn.model)) == 2  # default_split: body, head
    learn.fit(1)
    assert learn.model(torch.rand(2, 3, 32, 32)).shape == (2, 3)


def test_missing_timm_is_one_line_naming_the_extra(monkeypatch):
    monkeypatch.setitem(__import__('sys').modules, 'timm', None)  # what an environment without timm gives
    with pytest.raises(ImportError, match=r"pip install 'minilearn\[timm\]'"):
        vision_learner(images(), 'timm/test_resnet', pretrained=False)


# ---- pretrained weights from a file ------------------------------------------------------------------------
def test_pretrained_path_loads_the_body_ignores_the_old_classifier_and_normalizes(tmp_path):
    source = torchvision.models.resnet18(weights=None, num_classes=7)  # another classifier than the target's
    path = tmp_path / 'r18.pth'
    torch.save(source.state_dict(), path)
    data = images()
    learn = vision_learner(data, 'resnet18', pretrained=path)
    body = learn.model[0]
    assert torch.equal(body[0].weight, source.conv1.weight) and torch.equal(body[7][1].conv2.weight,
                                                                            source.layer4[1].conv2.weight)
    assert torch.equal(body[1].running_mean, source.bn1.running_mean)
    mean, std = learn.norm_stats()
    assert torch.allclose(mean, torch.tensor(IMAGENET_STATS[0]))
    assert torch.allclose(std, torch.tensor(IMAGENET_STATS[1]))
    assert learn.frozen_idx == 2  # pretrained: frozen but the head, like fastai


def test_pretrained_path_names_missing_unexpected_and_misshapen_keys(tmp_path):
    state = torchvision.models.resnet18(weights=None).state_dict()
    del state['layer1.0.conv1.weight']
    state['extra.weight'] = torch.zeros(1)
    state['layer4.1.bn2.weight'] = torch.zeros(3)
    torch.save(state, tmp_path / 'bad.pth')
    with pytest.raises(CheckpointError) as err:
        vision_learner(images(), 'resnet18', pretrained=tmp_path / 'bad.pth')
    text = str(err.value)
    assert 'missing keys (in the body, not in the file): layer1.0.conv1.weight' in text
    assert 'unexpected keys (not in resnet18): extra.weight' in text
    assert 'layer4.1.bn2.weight: file (3,) vs resnet18 (512,)' in text


def test_grayscale_input_sums_the_pretrained_first_conv_and_skips_rgb_normalization(tmp_path):
    source = torchvision.models.resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / 'r18.pth')
    data = images(c_in=1)
    learn = vision_learner(data, 'resnet18', pretrained=tmp_path / 'r18.pth')
    conv = learn.model[0][0]
    assert conv.in_channels == 1 and torch.equal(conv.weight, source.conv1.weight.sum(1, keepdim=True))
    assert learn.norm_stats() is None  # ImageNet's statistics have 3 channels (fastai skips them too)
    learn.fit(1)


def test_timm_pretrained_path_loads_the_features(tmp_path):
    source = timm.create_model('test_resnet', num_classes=9)
    torch.save(source.state_dict(), tmp_path / 't.pth')
    learn = vision_learner(images(), 'timm/test_resnet', pretrained=tmp_path / 't.pth')
    x = torch.rand(2, 3, 32, 32)
    source.eval(), learn.model.eval()
    assert torch.equal(learn.model[0](x), source.forward_features(x))
    mean, _ = learn.norm_stats()
    assert torch.allclose(mean, torch.tensor(source.pretrained_cfg['mean'], dtype=torch.float32))


def test_user_normalization_is_kept_and_explicit_stats_are_used(tmp_path):
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), tmp_path / 'r18.pth')
    mine = BatchTransformXCallback(Normalize([0.5] * 3, [0.25] * 3))
    learn = vision_learner(images(), 'resnet18', pretrained=tmp_path / 'r18.pth', cbs=[mine])
    assert [cb for cb in learn.cbs if isinstance(cb, BatchTransformXCallback)] == [mine]
    learn = vision_learner(images(), 'resnet18', pretrained=False, normalize=([0.1] * 3, [0.2] * 3))
    assert torch.allclose(learn.norm_stats()[0], torch.full((3,), 0.1))


# ---- the fast offline error --------------------------------------------------------------------------------
def _offline(monkeypatch, tmp_path):
    def refuse(*args, **kwargs): raise socket.gaierror(-2, 'Name or service not known')
    monkeypatch.setattr(socket, 'create_connection', refuse)
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))  # an empty weights cache


@pytest.mark.parametrize('arch, cache', [('resnet18', 'torch.hub'), ('timm/resnet18', 'Hugging Face hub')])
def test_pretrained_weights_offline_fail_fast_with_the_cache_and_the_ways_out(monkeypatch, tmp_path, arch, cache):
    _offline(monkeypatch, tmp_path)
    monkeypatch.setenv('HF_HUB_OFFLINE', '0')
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'try_to_load_from_cache', lambda *a, **k: None)  # nothing cached
    start = time.perf_counter()
    with pytest.raises(PretrainedWeightsError) as err:
        vision_learner(images(), arch)
    assert time.perf_counter() - start < 10
    text = str(err.value)
    assert 'could not fetch the pretrained weights' in text and 'is not reachable' in text
    assert cache in text and 'pretrained=False' in text and "pretrained='path/to/weights.pth'" in text


def test_unreachable_host_times_out_in_seconds(monkeypatch):
    def hang(*args, **kwargs): time.sleep(60)
    monkeypatch.setattr(socket, 'create_connection', hang)
    monkeypatch.setattr(vision, 'PROBE_TIMEOUT', 0.5)
    start = time.perf_counter()
    assert 'no answer in' in vision._unreachable('https://download.pytorch.org/models/x.pth')
    assert time.perf_counter() - start < 3


def test_cached_torchvision_weights_are_used_without_the_network(monkeypatch, tmp_path):
    _offline(monkeypatch, tmp_path)
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    source = torchvision.models.resnet18(weights=None)
    cached = vision._torchvision_cache() / weights.url.rsplit('/', 1)[1]
    cached.parent.mkdir(parents=True)
    torch.save(source.state_dict(), cached)
    learn = vision_learner(images(), 'resnet18')  # torch.hub checks a hash only when it downloads
    assert torch.equal(learn.model[0][0].weight, source.conv1.weight)
