"""Export to a torch.export program + JSON, and a load that never unpickles."""
import io
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from minilearn.export import (Predictor, UnsafeArtifactError, _describe_tfm, _rebuild_tfm, export_learner,
                              load_learner, load_predictor, weights_only_loads)
from test_inference import IMAGE_STATS, colour_learner


class TinyNet(nn.Module):
    """A model class the loading process never imports: conv, BatchNorm, a residual add, pooling, linear."""

    def __init__(self, n_classes: int = 3):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, n_classes)

    def forward(self, x):
        h = F.relu(self.bn(self.conv(x)))
        return self.head((h + h.flip(-1)).mean((2, 3)))


class Branchy(nn.Module):
    """Data-dependent control flow: torch.export cannot trace it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 3))

    def forward(self, x):
        out = self.body(x)
        return out if out.mean() > 0 else -out


def trained_like(model):
    with torch.no_grad():
        for p in model.parameters(): p.normal_(0, 0.5)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d): m.running_mean.normal_(0, 0.3), m.running_var.uniform_(0.5, 2)
    return model


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp('export')
    learn = colour_learner(root / 'data', model=trained_like(TinyNet()))
    path = learn.export(root / 'out' / 'model.pt2')
    return learn, path, root


def valid_files(root):
    return sorted((root / 'data' / 'valid').glob('*/*.png'))


def test_export_writes_program_and_settings(exported):
    learn, path, root = exported
    assert path == root / 'out' / 'model.pt2' and path.is_file()
    settings = json.loads(path.with_suffix('.json').read_text())
    assert settings['vocab'] == ['blue', 'green', 'red']
    assert settings['normalize'] == {'mean': IMAGE_STATS[0], 'std': IMAGE_STATS[1]}
    assert settings['input_shape'] == [3, 8, 8] and settings['activation'] == 'softmax'
    assert [d['name'] for d in settings['item_tfms']] == ['make_rgb', 'ResizeFixed', 'to_byte_tensor', 'to_float_tensor']
    assert settings['item_tfms'][1]['size'] == [8, 8]
    assert settings['model'] == {'kind': 'torch.export', 'file': 'model.pt2', 'dynamic_batch': True}


def test_export_leaves_the_learner_as_it_was(exported):
    learn, path, root = exported
    assert next(learn.model.parameters()).device.type == 'cpu'
    learn.model.train()
    before = learn.predict(valid_files(root)[0])[2]
    learn.export(root / 'again.pt2')
    assert learn.model.training
    torch.testing.assert_close(learn.predict(valid_files(root)[0])[2], before, rtol=0, atol=0)
    keys = list(learn.batch_transform_x.tfm._cache)  # one entry: the batches' (device, dtype, ndim[, image size])
    assert len(keys) == 1 and keys[0][:3] == (torch.device('cpu'), torch.float32, 4)


CHILD = r'''
import json, sys, torch
from minilearn.export import load_learner
predictor = load_learner(sys.argv[1])
files = json.loads(sys.argv[2])
results = [predictor.predict(f) for f in files]
batch = torch.load(sys.argv[3], weights_only=True)
print(json.dumps({'labels': [r[0] for r in results], 'probs': [r[2].tolist() for r in results],
                  'tensor_probs': predictor.predict(batch[0])[2].tolist(),
                  'batch': predictor.predict_batch(batch).tolist(),
                  'test_modules': [m for m in sys.modules if m.startswith('test_') or 'TinyNet' in m]}))
'''


def test_load_in_a_fresh_process_gives_the_same_predictions(exported):
    learn, path, root = exported
    files = valid_files(root)
    batch = torch.stack([learn.data.valid_ds[i][0] for i in range(5)])
    torch.save(batch, root / 'batch.pt')
    done = subprocess.run([sys.executable, '-c', CHILD, str(path), json.dumps([str(f) for f in files]),
                           str(root / 'batch.pt')], capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert out['test_modules'] == []
    live = [learn.predict(f) for f in files]
    assert out['labels'] == [label for label, _, _ in live]
    torch.testing.assert_close(torch.tensor(out['probs']), torch.stack([p for _, _, p in live]), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.tensor(out['tensor_probs']), learn.predict(batch[0])[2], rtol=0, atol=1e-6)
    with torch.no_grad():
        expected = F.softmax(learn.model.eval()(((batch - 0.5) / 0.25)), 1)
    torch.testing.assert_close(torch.tensor(out['batch']), expected, rtol=0, atol=1e-6)


def test_every_torch_load_while_loading_is_weights_only(exported, monkeypatch):
    _, path, _ = exported
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get('weights_only'))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, 'load', recording_load)
    predictor = load_learner(path)
    assert calls and all(flag is True for flag in calls)  # the sample inputs went through torch.load
    assert torch.load is recording_load  # the guard is gone after the load
    assert isinstance(predictor, Predictor)


def test_guard_refuses_unsafe_loads_and_restores_torch_load():
    buffer = io.BytesIO()
    torch.save({'w': torch.ones(2)}, buffer)
    original = torch.load
    with weights_only_loads():
        buffer.seek(0)
        assert torch.equal(torch.load(buffer)['w'], torch.ones(2))
        with pytest.raises(UnsafeArtifactError, match='weights_only=False'):
            torch.load(buffer, weights_only=False)
    assert torch.load is original and torch.serialization.load is original
    with pytest.raises(KeyError):
        with weights_only_loads(): raise KeyError('x')
    assert torch.load is original


class CreatesFile:
    def __init__(self, target): self.target = target
    def __reduce__(self): return (Path.touch, (Path(self.target),))


def crafted_pickle(target):
    buffer = io.BytesIO()
    torch.save((CreatesFile(target),), buffer)
    return buffer.getvalue()


def rewrite_archive(src, dst, replace):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, 'w') as zout:
        for info in zin.infolist():
            data = zin.read(info.filename)
            for suffix, new in replace.items():
                if info.filename.endswith(suffix): data = new(data) if callable(new) else new
            zout.writestr(info, data)
    Path(dst).with_suffix('.json').write_text(Path(src).with_suffix('.json').read_text().replace(
        f'"file": "{Path(src).name}"', f'"file": "{Path(dst).name}"'))


def test_crafted_sample_inputs_are_refused_and_never_run(exported, tmp_path):
    _, path, _ = exported
    # the payload is real: an unsafe load creates the file
    torch.load(io.BytesIO(crafted_pickle(tmp_path / 'proof')), weights_only=False)
    assert (tmp_path / 'proof').exists()
    target = tmp_path / 'pwned'
    evil = tmp_path / 'evil.pt2'
    rewrite_archive(path, evil, {'data/sample_inputs/model.pt': crafted_pickle(target)})
    with pytest.raises(UnsafeArtifactError, match='weights_only=False'):
        load_learner(evil)
    assert not target.exists()


def test_pickled_weights_and_custom_objects_are_refused(exported, tmp_path):
    _, path, _ = exported

    def mark_pickled(data):
        config = json.loads(data)
        first = next(iter(config['config']))
        config['config'][first]['use_pickle'] = True
        return json.dumps(config).encode()

    rewrite_archive(path, tmp_path / 'pickled.pt2', {'model_weights_config.json': mark_pickled})
    with pytest.raises(UnsafeArtifactError, match='pickled'):
        load_learner(tmp_path / 'pickled.pt2')
    opaque = json.dumps({'config': {'obj': {'path_name': 'opaque_obj_0', 'is_param': False, 'use_pickle': False,
                                            'tensor_meta': None}}}).encode()
    rewrite_archive(path, tmp_path / 'opaque.pt2', {'model_constants_config.json': opaque})
    with pytest.raises(UnsafeArtifactError, match='opaque_obj_0'):
        load_learner(tmp_path / 'opaque.pt2')


def test_settings_cannot_point_outside_the_folder(exported, tmp_path):
    _, path, _ = exported
    settings = json.loads(path.with_suffix('.json').read_text())
    settings['model']['file'] = '../model.pt2'
    (tmp_path / 'm.json').write_text(json.dumps(settings))
    with pytest.raises(ValueError, match='file name beside'):
        load_learner(tmp_path / 'm.json')


def test_predictor_checks_the_input_shape(exported):
    _, path, _ = exported
    with pytest.raises(ValueError, match=r'expected items of shape \[3, 8, 8\]'):
        load_learner(path).predict(torch.zeros(3, 9, 9))


def test_export_needs_a_pt2_path(exported, tmp_path):
    learn, _, _ = exported
    with pytest.raises(ValueError, match='.pt2'):
        export_learner(learn, tmp_path / 'model.pkl')


class BranchyN(Branchy):
    """Untraceable, and its constructor needs an argument."""

    def __init__(self, n_out):
        super().__init__()
        self.body[-1] = nn.Linear(3, n_out)


# What a pickle of a plain dict of tensors references (torch.load(weights_only=True) accepts no more).
TENSOR_PICKLE_GLOBALS = {'torch._utils _rebuild_tensor_v2', 'torch FloatStorage', 'torch LongStorage',
                         'collections OrderedDict'}


def pickle_globals(path):
    """The classes and functions the pickle inside a torch.save zip file names."""
    import pickletools
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith('data.pkl')))
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name in ('SHORT_BINUNICODE', 'BINUNICODE', 'UNICODE'): strings.append(arg)
        if op.name == 'GLOBAL': found.add(arg)
        if op.name == 'STACK_GLOBAL': found.add(f'{strings[-2]} {strings[-1]}')
    return found


def test_untraceable_model_falls_back_to_weights_and_its_import_path(tmp_path):
    learn = colour_learner(tmp_path / 'data', model=trained_like(Branchy()))
    with pytest.warns(UserWarning, match=r"could not trace Branchy .*state_dict with architecture "
                                         r"'test_export:Branchy' instead, constructor arguments \{\}") as record:
        path = learn.export(tmp_path / 'out' / 'model.pt2')
    assert 'architectures=[Branchy]' in str(record[0].message)
    assert path == tmp_path / 'out' / 'model.pt' and not (tmp_path / 'out' / 'model.pt2').exists()
    weights = torch.load(path, weights_only=True)  # no pickled objects: a plain dict of tensors
    assert weights.keys() == learn.model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in learn.model.state_dict().items())
    assert pickle_globals(path) <= TENSOR_PICKLE_GLOBALS
    settings = json.loads(path.with_suffix('.json').read_text())
    assert settings['model'] == {'kind': 'state_dict', 'file': 'model.pt', 'arch': 'test_export:Branchy',
                                 'arch_kwargs': {}}
    with pytest.raises(ValueError, match=r"'test_export:Branchy', which is not in the allowed list: "
                                         r"load_predictor\(path, architectures=\[Branchy\]\)"):
        load_predictor(path)
    with pytest.raises(ValueError, match='not in the allowed list'):
        load_predictor(path, architectures=[TinyNet])
    predictor = load_predictor(path, architectures=[TinyNet, Branchy])
    for f in valid_files(tmp_path):
        torch.testing.assert_close(predictor.predict(f)[2], learn.predict(f)[2], rtol=0, atol=1e-6)


def test_loading_never_imports_the_architecture_named_in_the_file(tmp_path, monkeypatch):
    learn = colour_learner(tmp_path / 'data', model=trained_like(Branchy()))
    with pytest.warns(UserWarning, match='state_dict'):
        path = learn.export(tmp_path / 'model.pt2')
    (tmp_path / 'planted.py').write_text("import pathlib\npathlib.Path(__file__).with_name('ran').touch()\n"
                                         "from test_export import Branchy as Net\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    settings = json.loads(path.with_suffix('.json').read_text())
    settings['model']['arch'] = 'planted:Net'
    path.with_suffix('.json').write_text(json.dumps(settings))
    with pytest.raises(ValueError, match="'planted:Net', which is not in the allowed list"):
        load_predictor(path)
    assert 'planted' not in sys.modules and not (tmp_path / 'ran').exists()
    with pytest.raises(TypeError, match='list of classes'):
        load_predictor(path, architectures='planted:Net')


def test_fallback_with_constructor_arguments(tmp_path):
    from functools import partial
    learn = colour_learner(tmp_path / 'data', model=trained_like(BranchyN(3)))
    with pytest.warns(UserWarning, match='constructor arguments unknown'):
        unknown = export_learner(learn, tmp_path / 'a' / 'model.pt2')
    assert json.loads(unknown.with_suffix('.json').read_text())['model']['arch_kwargs'] is None
    with pytest.raises(ValueError, match=r"cannot build 'test_export:BranchyN' with no arguments .*n_out"):
        load_predictor(unknown, architectures=[BranchyN])
    f = valid_files(tmp_path)[0]
    rebuilt = load_predictor(unknown, architectures={'test_export:BranchyN': partial(BranchyN, 3)})
    torch.testing.assert_close(rebuilt.predict(f)[2], learn.predict(f)[2], rtol=0, atol=1e-6)
    with pytest.warns(UserWarning, match=r"constructor arguments \{'n_out': 3\}"):
        known = learn.export(tmp_path / 'b' / 'model.pt2', arch_kwargs={'n_out': 3})
    torch.testing.assert_close(load_predictor(known, architectures=[BranchyN]).predict(f)[2], learn.predict(f)[2],
                               rtol=0, atol=1e-6)


def test_load_learner_is_the_fastai_name_of_load_predictor():
    import minilearn
    assert minilearn.load_learner is minilearn.load_predictor is load_predictor is load_learner
    assert {'load_predictor', 'load_learner', 'Predictor'} <= set(minilearn.__all__)


def test_untraceable_model_falls_back_to_state_dict_and_named_architecture(tmp_path):
    learn = colour_learner(tmp_path / 'data', model=trained_like(Branchy()))
    with pytest.warns(UserWarning, match="state_dict with architecture 'branchy'"):
        path = export_learner(learn, tmp_path / 'model.pt2', arch='branchy')
    assert path == tmp_path / 'model.pt' and not (tmp_path / 'model.pt2').exists()
    assert isinstance(torch.load(path, weights_only=True), dict)
    with pytest.raises(ValueError, match="unknown architecture 'branchy'"):
        load_learner(path)
    predictor = load_learner(tmp_path / 'model.pt2', architectures={'branchy': Branchy})
    for f in valid_files(tmp_path):
        torch.testing.assert_close(predictor.predict(f)[2], learn.predict(f)[2], rtol=0, atol=1e-6)


def test_state_dict_fallback_with_a_registry_architecture(tmp_path, monkeypatch):
    from minilearn.models import resnet18_cifar
    learn = colour_learner(tmp_path / 'data', model=trained_like(resnet18_cifar(3, width=2)))

    def cannot_trace(*args, **kwargs): raise RuntimeError('simulated: cannot trace')

    monkeypatch.setattr(torch.export, 'export', cannot_trace)
    with pytest.warns(UserWarning, match='RuntimeError'):
        path = export_learner(learn, tmp_path / 'model.pt2', arch='resnet18_cifar',
                              arch_kwargs={'n_classes': 3, 'width': 2})
    predictor = load_learner(path)
    f = valid_files(tmp_path)[0]
    torch.testing.assert_close(predictor.predict(f)[2], learn.predict(f)[2], rtol=0, atol=1e-6)
    assert json.loads(path.with_suffix('.json').read_text())['model']['arch'] == 'resnet18_cifar'


def test_unsupported_item_transform_warns_and_predicts_tensors_only(tmp_path):
    learn = colour_learner(tmp_path / 'data', model=TinyNet())
    learn.data.item_tfms = learn.data.item_tfms + [lambda x: x]
    with pytest.warns(UserWarning, match='<lambda>'):
        path = learn.export(tmp_path / 'model.pt2')
    predictor = load_learner(path)
    with pytest.raises(ValueError, match='cannot rebuild'):
        predictor.predict(valid_files(tmp_path)[0])
    x = learn.data.valid_ds[0][0]
    torch.testing.assert_close(predictor.predict(x)[2], learn.predict(x)[2], rtol=0, atol=1e-6)


def torchvision_tfms():
    import torchvision.transforms as T
    from torchvision.transforms import v2
    from minilearn.data.transforms import MakeRGB, ResizeFixed, make_rgb, to_byte_tensor
    return [make_rgb, MakeRGB(), ResizeFixed((5, 7)), to_byte_tensor, T.Resize(6), v2.Resize((5, 4)),
            T.CenterCrop(4), v2.CenterCrop((3, 5)), T.Grayscale(3), T.ToTensor(), T.PILToTensor()]


@pytest.mark.parametrize('index', range(11))
def test_item_transforms_rebuild_from_json(index):
    tfm = torchvision_tfms()[index]
    image = Image.fromarray((torch.rand(9, 11, 3) * 255).byte().numpy())
    rebuilt = _rebuild_tfm(json.loads(json.dumps(_describe_tfm(tfm))))
    a, b = tfm(image), rebuilt(image)
    if isinstance(a, Image.Image): a, b = torch.as_tensor(np.array(a)), torch.as_tensor(np.array(b))
    assert torch.equal(a, b)


def test_torchvision_normalize_rebuilds():
    import torchvision.transforms as T
    tfm = T.Normalize([0.1, 0.2, 0.3], [0.5, 0.6, 0.7])
    x = torch.rand(3, 4, 4)
    assert torch.equal(_rebuild_tfm(json.loads(json.dumps(_describe_tfm(tfm))))(x), tfm(x))


def test_loading_needs_the_settings_file(exported, tmp_path):
    _, path, _ = exported
    lonely = tmp_path / 'lonely.pt2'
    lonely.write_bytes(path.read_bytes())
    with pytest.raises(FileNotFoundError, match='settings'):
        load_learner(lonely)


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
def test_export_of_a_cuda_learner_loads_on_the_cpu(tmp_path):
    from minilearn.callbacks.device import DeviceCallback
    learn = colour_learner(tmp_path / 'data', model=trained_like(TinyNet()))
    learn.remove_cbs(learn.device)
    learn.add_cb(DeviceCallback('cuda'))
    learn.model.cuda()
    path = learn.export(tmp_path / 'model.pt2')
    assert next(learn.model.parameters()).is_cuda
    f = valid_files(tmp_path)[0]
    torch.testing.assert_close(load_learner(path).predict(f)[2], learn.predict(f)[2], rtol=1e-4, atol=1e-5)


def test_regression_export_predicts_the_raw_output(tmp_path):
    from torch.utils.data import DataLoader
    from minilearn.data.core import DataBunch, Dataset
    from minilearn.learner import Learner
    from minilearn.callbacks.transforms import BatchTransformXCallback, view_tfm
    x, y = torch.randn(8, 6), torch.randn(8, 1)
    data = DataBunch(DataLoader(Dataset(x, y), batch_size=4), DataLoader(Dataset(x, y), batch_size=4))
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 1))
    learn = Learner(model, data, F.mse_loss, cbs=[BatchTransformXCallback(view_tfm(2, 3))])
    path = learn.export(tmp_path / 'reg.pt2')
    settings = json.loads(path.with_suffix('.json').read_text())
    assert settings['activation'] == 'identity' and settings['vocab'] is None and settings['input_shape'] == [6]
    assert settings['item_tfms'] is None and settings['normalize'] is None
    output, index, same = load_learner(path).predict(x[0])
    assert index is None and output is same
    torch.testing.assert_close(output, learn.predict(x[0])[0], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match='item transforms'):
        load_learner(path).predict(Image.new('RGB', (3, 2)))
