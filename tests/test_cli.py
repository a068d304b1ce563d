"""`minilearn train`: outputs, options wired to the right pieces, one-line errors, `python -m minilearn`."""
import gzip
import json
import math
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from minilearn import cli, jobs, train_job
from minilearn.cli import build_parser, main
from minilearn.train_job import build_learner
from minilearn.datasets import SHAPE_NAMES, save_shapes_folder
from minilearn import TensorLoader, label_image_folder, make_rgb, open_image, to_byte_tensor

TINY = ['--epochs', '1', '--n-per-class', '12', '--bs', '32']
OPTIONS = ['--data', '--n-per-class', '--size', '--noise', '--noise-kind', '--workers', '--arch', '--pretrained',
           '--fine-tune', '--epochs', '--bs', '--lr',
           '--schedule', '--one-cycle', '--mixup', '--mixup-batch', '--label-smoothing', '--loss', '--device', '--seed', '--out',
           '--quiet', '--threads']


def _metrics(out):
    return json.loads((out / 'metrics.json').read_text())


def _args(*argv):
    return build_parser().parse_args(['train', *argv])


def test_default_job_writes_plots_checkpoint_and_metrics(tmp_path, capsys):
    out = tmp_path / 'out'
    assert main(['train', '--epochs', '2', '--n-per-class', '20', '--out', str(out)]) == 0
    printed = capsys.readouterr()
    assert 'valid_accuracy' in printed.out  # the per-epoch table (plain rows: stdout is not a terminal)
    assert 'minilearn train: valid accuracy' in printed.out and 'Traceback' not in printed.err
    for name in ('loss.png', 'lr.png', 'confusion.png'):
        assert (out / name).read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    metrics = _metrics(out)
    assert metrics['status'] == 'complete' and metrics['started'] <= metrics['finished']
    assert metrics['files'] == {'loss_plot': 'loss.png', 'lr_plot': 'lr.png', 'confusion_plot': 'confusion.png',
                                'checkpoint': 'model.pth', 'metrics': 'metrics.json'}
    assert len(metrics['history']) == 2 and [row['epoch'] for row in metrics['history']] == [0, 1]
    final = metrics['history'][-1]
    assert metrics['accuracy'] == final['valid_accuracy'] == metrics['final']['valid_accuracy']
    assert 0 <= metrics['accuracy'] <= 1 and metrics['chance_accuracy'] == pytest.approx(0.1)
    assert math.isfinite(final['train_loss']) and math.isfinite(final['valid_loss'])
    assert f"{metrics['accuracy']:.1%}" in printed.out  # the summary shows the final accuracy
    assert metrics['data'] == {'source': 'shapes', 'path': None, 'n_train': 200, 'n_valid': 100, 'n_classes': 10,
                               'vocab': list(SHAPE_NAMES[:10]),
                               'split': '200 generated training images, 100 validation images'}
    assert metrics['args']['epochs'] == 2 and metrics['args']['out'] == str(out)
    assert metrics['versions']['torch'] == torch.__version__ and metrics['device'] == 'cpu'
    lr = metrics['lr']  # one-cycle by default: warm up from lr/25 to lr, anneal to almost 0
    assert lr['first'] == pytest.approx(cli.DEFAULT_LR / 25) and 0.9 * cli.DEFAULT_LR < lr['max'] <= cli.DEFAULT_LR
    assert lr['last'] < lr['max'] / 10 and metrics['args']['schedule'] == 'one-cycle'
    # the confusion matrix counts every validation image once; its diagonal is the accuracy AvgStats reported
    cm = torch.tensor(metrics['confusion_matrix'])
    assert cm.shape == (10, 10) and cm.sum(1).tolist() == [10] * 10
    assert cm.trace().item() / 100 == pytest.approx(metrics['accuracy'], abs=1e-6)
    assert metrics['time_s']['fit'] > 0
    # the checkpoint holds the trained model, loadable safely into the same architecture
    from minilearn.serialization import safe_load
    checkpoint = safe_load(out / 'model.pth')
    learn, _ = build_learner(_args('--n-per-class', '20', '--out', str(tmp_path / 'other')))
    learn.model.load_state_dict(checkpoint['model'])
    assert sum(p.numel() for p in learn.model.parameters()) == metrics['model']['n_params']
    assert checkpoint['n_iter'] == 2 * math.ceil(200 / cli.DEFAULT_BS)


def test_constant_schedule(tmp_path):
    assert main(['train', *TINY, '--quiet', '--schedule', 'constant', '--out', str(tmp_path)]) == 0
    lr = _metrics(tmp_path)['lr']
    assert lr['first'] == lr['max'] == lr['last'] == cli.DEFAULT_LR


def test_same_seed_same_run(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for name in ('a', 'b'):
            assert main(['train', *TINY, '--quiet', '--seed', '4', '--out', str(tmp_path / name)]) == 0
            assert torch.get_num_threads() == 2  # the run's --threads 1 is undone afterwards
    finally:
        torch.set_num_threads(threads)
    strip = lambda rows: [{k: v for k, v in r.items() if k != 'time'} for r in rows]
    assert strip(_metrics(tmp_path / 'a')['history']) == strip(_metrics(tmp_path / 'b')['history'])


def test_options_build_the_documented_pieces(tmp_path):
    from minilearn.callbacks.mixup import MixUp
    from minilearn.losses import HardBootstrappingLoss, LabelSmoothingCrossEntropy, SoftBootstrappingLoss
    out = ['--out', str(tmp_path)]
    learn, _ = build_learner(_args('--n-per-class', '5', *out))
    assert isinstance(learn.loss_func, torch.nn.CrossEntropyLoss) and not hasattr(learn, 'mix_up')
    assert learn.opt_func.keywords == {'momentum': 0.9, 'weight_decay': 5e-4}
    learn, _ = build_learner(_args('--n-per-class', '5', '--label-smoothing', '0.2', '--mixup', '0.4', *out))
    assert isinstance(learn.loss_func, LabelSmoothingCrossEntropy) and learn.loss_func.eps == 0.2
    assert isinstance(learn.mix_up, MixUp) and learn.mix_up.alpha == 0.4 and learn.mix_up.per_sample
    learn, _ = build_learner(_args('--n-per-class', '5', '--loss', 'ls', '--mixup', '0.2', '--mixup-batch', *out))
    assert learn.loss_func.eps == 0.1 and not learn.mix_up.per_sample
    learn, _ = build_learner(_args('--n-per-class', '5', '--loss', 'soft-boot', *out))
    assert isinstance(learn.loss_func, SoftBootstrappingLoss)
    learn, _ = build_learner(_args('--n-per-class', '5', '--loss', 'hard-boot', '--arch', 'resnet18', *out))
    assert isinstance(learn.loss_func, HardBootstrappingLoss)
    assert learn.model[-1].out_features == 10 and sum(p.numel() for p in learn.model.parameters()) > 10 ** 6


def test_label_noise_only_on_training_labels(tmp_path):
    learn, report = build_learner(_args('--n-per-class', '10', '--noise', '0.5', '--out', str(tmp_path)))
    train_ds = learn.data.train_ds
    changed = train_ds.y != train_ds.clean_targets
    assert report['noise']['n_redrawn'] == 50 and report['noise']['n_changed'] == int(changed.sum())
    assert 30 < int(changed.sum()) <= 50  # about 9 in 10 redrawn labels land on another class
    clean, _ = build_learner(_args('--n-per-class', '10', '--out', str(tmp_path)))
    assert torch.equal(clean.data.train_ds.y, train_ds.clean_targets)
    assert torch.equal(clean.data.valid_ds.y, learn.data.valid_ds.y)


def test_one_cycle_mixup_and_smoothing_train(tmp_path, capsys):
    out = tmp_path / 'out'
    argv = ['train', '--epochs', '1', '--n-per-class', '12', '--bs', '8', '--quiet', '--one-cycle', '--lr', '0.05',
            '--mixup', '0.4', '--label-smoothing', '0.1', '--out', str(out)]
    assert main(argv) == 0
    lr = _metrics(out)['lr']  # one cycle over 15 batches: warm up from lr/25 to about lr, then anneal
    assert lr['first'] == pytest.approx(0.05 / 25) and 0.04 < lr['max'] <= 0.05 and lr['last'] < lr['max'] / 10
    assert capsys.readouterr().out.splitlines()[0].startswith('minilearn train: valid accuracy')  # --quiet: no table


def test_image_folder_data(tmp_path):
    root = save_shapes_folder(tmp_path / 'shapes', n_per_class=6, n_valid_per_class=2, n_classes=3, size=16)
    out = tmp_path / 'out'
    assert main(['train', '--data', str(root), '--size', '16', '--n-per-class', '4', '--epochs', '1', '--quiet',
                 '--noise', '0.5', '--out', str(out)]) == 0
    metrics = _metrics(out)
    data = metrics['data']
    assert data['source'] == 'image-folder' and data['path'] == str(root)
    assert data['n_train'] == 12 and data['n_valid'] == 6 and data['vocab'] == sorted(SHAPE_NAMES[:3])
    assert metrics['noise']['n_redrawn'] == 6
    learn, _ = build_learner(_args('--data', str(root), '--size', '16', '--noise', '0.5', '--out', str(out)))
    train_ds = learn.data.train_ds  # decoded once into tensors: noisy y, clean labels kept aside
    assert int((train_ds.y != train_ds.clean_targets).sum()) == int(train_ds.noise_mask.sum())
    files = label_image_folder(root, valid_name='val')
    assert learn.data.valid_ds.y.tolist() == [learn.data.vocab.index(p.parent.name) for p in files.valid.x.items]
    assert isinstance(learn.data.train_dl, TensorLoader) and train_ds.x.dtype == torch.uint8
    assert torch.equal(train_ds.x[0], to_byte_tensor(make_rgb(open_image(files.train.x.items[0]))))


def _write_idx(path, array, dtype_code=0x08):
    header = struct.pack('>BBBB', 0, 0, dtype_code, array.ndim) + struct.pack(f'>{array.ndim}I', *array.shape)
    with gzip.open(path, 'wb') as f: f.write(header + array.astype('>u1').tobytes())


def test_mnist_folder(tmp_path, capsys):
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / 't10k-images-idx3-ubyte.gz', rng.integers(0, 256, (40, 28, 28)))
    _write_idx(tmp_path / 't10k-labels-idx1-ubyte.gz', np.arange(40) % 10)
    out = tmp_path / 'out'
    assert main(['train', '--data', str(tmp_path), '--epochs', '1', '--quiet', '--out', str(out)]) == 0
    metrics = _metrics(out)
    assert metrics['data']['source'] == 'mnist' and metrics['data']['n_train'] == 32  # t10k only: 80/20 split
    assert metrics['data']['split'] == ('the folder holds only the t10k (test) files: its first 32 images train and '
                                        'the last 8 validate')
    assert f"data: {metrics['data']['split']}" in capsys.readouterr().out
    learn, _ = build_learner(_args('--data', str(tmp_path), '--out', str(out)))
    assert learn.data.c_in == 1 and learn.model[0][0].in_channels == 1



def test_noise_kind_pair_flips_exactly_to_the_next_class(tmp_path):
    learn, report = build_learner(_args('--n-per-class', '10', '--noise', '0.3', '--noise-kind', 'pair',
                                        '--out', str(tmp_path)))
    train_ds = learn.data.train_ds
    changed = train_ds.y != train_ds.clean_targets
    n_classes = learn.data.c_out
    assert report['noise']['kind'] == 'pair' and int(changed.sum()) == round(0.3 * len(train_ds.y))
    assert report['noise']['n_changed'] == report['noise']['n_redrawn'] == int(changed.sum())
    assert torch.equal(train_ds.y[changed], (train_ds.clean_targets[changed] + 1) % n_classes)


def test_noise_kind_asymmetric_uses_the_mnist_mapping(tmp_path):
    from minilearn.noisy import ASYMMETRIC_MAPPINGS
    rng = np.random.default_rng(0)
    _write_idx(tmp_path / 't10k-images-idx3-ubyte.gz', rng.integers(0, 256, (200, 28, 28)))
    _write_idx(tmp_path / 't10k-labels-idx1-ubyte.gz', np.arange(200) % 10)
    learn, report = build_learner(_args('--data', str(tmp_path), '--noise', '0.4', '--noise-kind', 'asymmetric',
                                        '--out', str(tmp_path / 'out')))
    train_ds = learn.data.train_ds
    clean, noisy = train_ds.clean_targets, train_ds.y
    mapping = ASYMMETRIC_MAPPINGS['mnist']
    changed = noisy != clean
    assert report['noise']['kind'] == 'asymmetric' and int(changed.sum()) > 0
    for c in range(10):
        of_c = clean == c
        if c not in mapping: assert not changed[of_c].any()
        else:
            assert int(changed[of_c].sum()) == round(int(of_c.sum()) * 0.4)
            assert (noisy[of_c & changed] == mapping[c]).all()


def test_noise_kinds_of_the_cli_are_the_library_s():
    from minilearn.noisy import NOISE_KINDS
    from minilearn.train_spec import NOISE_KINDS as CLI_KINDS
    assert CLI_KINDS == NOISE_KINDS

def test_cifar10_python_batches(tmp_path, capsys):
    rng = np.random.default_rng(0)
    for name in [f'data_batch_{i}' for i in range(1, 6)] + ['test_batch']:
        batch = {b'data': rng.integers(0, 256, (10, 3072), dtype=np.uint8), b'labels': list(range(10))}
        (tmp_path / name).write_bytes(pickle.dumps(batch))
    out = tmp_path / 'out'
    assert main(['train', '--data', str(tmp_path), '--n-per-class', '3', '--epochs', '1', '--quiet',
                 '--out', str(out)]) == 0
    data = _metrics(out)['data']
    assert data['source'] == 'cifar10' and data['n_train'] == 30 and data['n_valid'] == 10
    # the summary says what validates: the whole test batch
    assert data['split'] == '30 images of data_batch_1-5 train; all 10 images of test_batch validate'
    assert 'data: 30 images of data_batch_1-5 train; all 10 images of test_batch validate' in capsys.readouterr().out


def test_out_that_cannot_be_written_is_named_before_any_data_is_read(tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs): raise AssertionError("the job started (data would be read) before --out was checked")
    monkeypatch.setattr(jobs, 'run_train', never)
    (tmp_path / 'a_file').write_text('')
    data = save_shapes_folder(tmp_path / 'shapes', n_per_class=2, n_classes=2, size=8)
    for out in [tmp_path / 'a_file' / 'out', tmp_path / 'a_file']:
        assert main(['train', '--data', str(data), '--out', str(out)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f'minilearn train: error: --out {out}: '), lines
    assert main(['train', '--out', str(tmp_path / 'a_file' / 'out')]) == 2
    assert 'cannot write there (Not a directory); choose a folder you can write to' in capsys.readouterr().err


def test_the_out_check_leaves_nothing_behind(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(jobs, 'run_train', lambda args, prog: seen.append(args.out) or 0)
    out = tmp_path / 'new' / 'out'
    assert main(['train', '--out', str(out)]) == 0 and seen == [out]
    assert not (tmp_path / 'new').exists()  # the folders it made to try a write are gone; the job creates its own
    (tmp_path / 'old').mkdir()
    assert main(['train', '--out', str(tmp_path / 'old')]) == 0 and list((tmp_path / 'old').iterdir()) == []


def test_resume_of_a_missing_folder_says_so(tmp_path, capsys):
    assert main(['train', '--resume', str(tmp_path / 'nowhere')]) == 2
    assert capsys.readouterr().err.strip() == f'minilearn train: error: --resume {tmp_path / "nowhere"}: no such folder'


def test_help_lists_every_option(capsys):
    assert main(['train', '--help']) == 0
    text = capsys.readouterr().out
    for option in OPTIONS: assert option in text, option
    assert main(['--help']) == 0 and 'train' in capsys.readouterr().out
    assert main([]) == 2
    assert capsys.readouterr().err.startswith('minilearn: error: the following arguments are required')


def _bad_folder(tmp_path):
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'a_file').write_text('x')
    root = save_shapes_folder(tmp_path / 'unknown', n_per_class=1, n_valid_per_class=1, n_classes=2, size=8)
    (root / 'val' / 'circle').rename(root / 'val' / 'hexagon')  # a validation class never seen in training


@pytest.mark.parametrize('argv, message', [
    (['--epochs', '0'], 'argument --epochs: expected a positive integer'),
    (['--bs', 'many'], 'argument --bs'),
    (['--lr', '-1'], 'argument --lr: expected a number > 0'),
    (['--lr', 'nan'], 'argument --lr: expected a finite number'),
    (['--noise', '1.5'], 'argument --noise: expected a ratio in [0, 1]'),
    (['--noise-kind', 'pair'], '--noise-kind pair needs --noise RATIO'),
    (['--noise', '0.4', '--noise-kind', 'asymmetric'], 'known for MNIST and CIFAR-10 --data folders only'),
    (['--noise', '0.4', '--noise-kind', 'flip'], 'argument --noise-kind: invalid choice'),
    (['--arch', 'Res Net'], "argument --arch: 'Res Net': expected cnn, resnet18, a torchvision model name"),
    (['--pretrained'], '--pretrained needs a torchvision or timm/ --arch'),
    (['--fine-tune', '1'], '--fine-tune needs a torchvision or timm/ --arch'),
    (['--arch', 'resnet34', '--fine-tune', '1', '--schedule', 'constant'], '--fine-tune is fastai'),
    (['--arch', 'resnet34', '--pretrained', '{tmp}/missing.pth'], 'no such file'),
    (['--label-smoothing', '1'], 'argument --label-smoothing'),
    (['--mixup', '0'], 'argument --mixup'),
    (['--loss', 'mse'], 'argument --loss: invalid choice'),
    (['--bogus', '3'], 'unrecognized arguments: --bogus 3'),
    (['--mixup-batch'], '--mixup-batch needs --mixup'),
    (['--label-smoothing', '0.1', '--loss', 'hard-boot'], '--label-smoothing goes with --loss ls'),
    (['--device', 'nowhere'], "--device 'nowhere': not a device name"),
    (['--data', '{tmp}/missing'], 'no such folder'),
    (['--data', '{tmp}/a_file'], 'not a folder'),
    (['--data', '{tmp}/empty'], 'expected an image folder tree'),
    (['--data', '{tmp}/unknown'], "label(s) ['hexagon'] not in the vocab"),
])
def test_bad_options_give_one_line(tmp_path, capsys, argv, message):
    _bad_folder(tmp_path)
    argv = [a.replace('{tmp}', str(tmp_path)) for a in argv]
    assert main(['train', *argv, '--out', str(tmp_path / 'out')]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('minilearn train: error: ') and message in lines[0], captured.err
    assert 'Traceback' not in captured.err and captured.out == ''
    assert not (tmp_path / 'out').exists()  # nothing written


def test_cuda_device_refused_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available(): pytest.skip('CUDA is available here')
    assert main(['train', '--device', 'cuda', '--out', str(tmp_path)]) == 2
    assert 'CUDA is not available' in capsys.readouterr().err


def test_interrupt_is_one_line(tmp_path, capsys, monkeypatch):
    from minilearn.learner import Learner

    def interrupted(self, *args, **kwargs): raise KeyboardInterrupt
    monkeypatch.setattr(Learner, 'fit', interrupted)
    assert main(['train', *TINY, '--quiet', '--out', str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == 'minilearn train: interrupted'


def test_python_dash_m_help():
    result = subprocess.run([sys.executable, '-m', 'minilearn', 'train', '--help'], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('usage: minilearn train') and '--mixup-batch' in result.stdout


def test_version(capsys):
    from minilearn import __version__
    assert main(['--version']) == 0
    assert capsys.readouterr().out == f'minilearn {__version__}\n'


# Which heavy modules a command loaded: --help, --version and command-line mistakes need none of them.
FAST_CHILD = r"""
import json, sys
from minilearn.cli import main
code = main(json.loads(sys.argv[1]))
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'numpy', 'matplotlib'))
print(json.dumps({'code': code, 'heavy': heavy}))
"""


@pytest.mark.parametrize('argv, code', [
    (['--help'], 0), (['--version'], 0), (['train', '--help'], 0), ([], 2), (['train', '--bogus'], 2),
    (['train', '--epochs', '0'], 2), (['train', '--mixup-batch'], 2), (['train', '--data', '/nonexistent/x'], 2),
    (['train', '--device', 'cuda 0'], 2), (['trian'], 2), (['train', '--resume', '/nonexistent/x'], 2),
])
def test_help_version_and_mistakes_do_not_import_torch(argv, code):
    result = subprocess.run([sys.executable, '-c', FAST_CHILD, json.dumps(argv)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out == {'code': code, 'heavy': []}, result.stderr
    if code == 2: assert result.stderr.count('\n') == 1 and 'error: ' in result.stderr


class _StopAt:
    """Replaces Learner.fit: runs the real fit, raising `exc` at the first batch of epoch `epoch`."""

    def __init__(self, exc, epoch, out):
        from minilearn.learner import Learner
        self.exc, self.epoch, self.out, self.fit, self.seen = exc, epoch, out, Learner.fit, []

    def __call__(self, learn, epochs, cbs=None, **kwargs):
        from minilearn.callback import Callback
        test = self

        class Stop(Callback):
            def begin_batch(self):
                if self.epoch == test.epoch and self.in_train: raise test.exc

        self.seen.append(_metrics(self.out))  # what the folder said while the run was training
        return self.fit(learn, epochs, cbs=[*(cbs or []), Stop()], **kwargs)

    def install(self, monkeypatch):
        from minilearn.learner import Learner
        monkeypatch.setattr(Learner, 'fit', lambda learn, *args, **kwargs: self(learn, *args, **kwargs))
        return self


def _old_run(out):
    """An earlier complete run's files in `out`."""
    out.mkdir()
    (out / 'loss.png').write_bytes(b'old')
    (out / 'metrics.json').write_text(json.dumps({'status': 'complete', 'accuracy': 0.99}))


def test_interrupted_run_says_so_in_metrics(tmp_path, capsys, monkeypatch):
    fresh, old = tmp_path / 'fresh', tmp_path / 'old'
    _old_run(old)
    for out in (fresh, old):
        stop = _StopAt(KeyboardInterrupt(), 1, out).install(monkeypatch)
        assert main(['train', '--epochs', '3', '--n-per-class', '12', '--bs', '32', '--quiet',
                     '--out', str(out)]) == 130
        assert capsys.readouterr().err.strip() == 'minilearn train: interrupted'
        running = stop.seen[0]
        assert running['status'] == 'running' and running['history'] == [] and 'finished' not in running
        assert running['args']['epochs'] == 3 and running['files'] == {'metrics': 'metrics.json'}
        metrics = _metrics(out)
        assert metrics['status'] == 'interrupted' and 'error' not in metrics and 'accuracy' not in metrics
        assert [row['epoch'] for row in metrics['history']] == [0]  # the epoch that finished
        assert metrics['files'] == {'metrics': 'metrics.json'}  # no file here is from this run but metrics.json
        assert metrics['started'] <= metrics['finished'] and metrics['time_s']['fit'] > 0
        monkeypatch.undo()  # the real Learner.fit again
    assert sorted(p.name for p in fresh.iterdir()) == ['metrics.json']
    assert (old / 'loss.png').read_bytes() == b'old'  # left alone, and metrics.json does not claim it


def test_interrupt_during_setup_is_one_line_and_writes_nothing(tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kwargs): raise KeyboardInterrupt
    monkeypatch.setattr(train_job, '_build_data', interrupted)
    assert main(['train', '--quiet', '--out', str(tmp_path / 'out')]) == 130
    assert capsys.readouterr().err.strip() == 'minilearn train: interrupted'
    assert not (tmp_path / 'out').exists()


def test_failed_run_says_so_in_metrics(tmp_path, monkeypatch):
    _StopAt(RuntimeError('out of luck'), 0, tmp_path).install(monkeypatch)
    with pytest.raises(RuntimeError, match='out of luck'):  # unexpected errors keep their traceback
        main(['train', *TINY, '--quiet', '--out', str(tmp_path)])
    metrics = _metrics(tmp_path)
    assert metrics['status'] == 'failed' and metrics['error'].startswith('out of luck')
    assert metrics['error'].endswith('(RuntimeError)')
    assert metrics['history'] == []


def test_write_status_checks_the_status(tmp_path):
    with pytest.raises(ValueError, match="status must be one of .*'complete'"):
        train_job.write_status(tmp_path, 'done', {})
    assert not (tmp_path / 'metrics.json').exists()
    report = train_job.write_status(tmp_path, 'running', {'epochs': 2})
    assert json.loads((tmp_path / 'metrics.json').read_text()) == {'status': 'running', 'epochs': 2,
                                                                 'started': report['started']}


def _record_calls(monkeypatch, owner, name):
    """Replaces `owner.name` by a wrapper that records each call's first argument; returns the record."""
    calls, real = [], getattr(owner, name)

    def recorded(first, *args, **kwargs):
        calls.append(Path(first))
        return real(first, *args, **kwargs)
    monkeypatch.setattr(owner, name, recorded)
    return calls


def test_resume_reads_run_json_and_the_checkpoint_once(tmp_path, capsys, monkeypatch):
    out = tmp_path / 'run'
    argv = ['train', '--epochs', '2', '--n-per-class', '12', '--bs', '32', '--quiet', '--checkpoint-every', '2']
    _StopAt(KeyboardInterrupt(), 1, out).install(monkeypatch)
    assert main([*argv, '--out', str(out)]) == 130  # the checkpoint of the end of epoch 0 stays
    monkeypatch.undo()
    capsys.readouterr()
    run_json = json.loads((out / 'run.json').read_text())
    assert run_json['epochs'] == 2 and 'resume' not in run_json
    # a run whose checkpoint is past its epochs is refused before anything is built or written
    (out / 'run.json').write_text(json.dumps({**run_json, 'epochs': 1}))
    before = (out / 'metrics.json').read_text()
    loads = _record_calls(monkeypatch, torch, 'load')
    assert main(['train', '--resume', str(out)]) == 2
    assert capsys.readouterr().err.strip() == (f'minilearn train: error: --resume {out}: that run is complete '
                                               f'(1 epochs); its outputs are in {out}')
    assert loads == [out / 'checkpoint.pth'] and (out / 'metrics.json').read_text() == before
    (out / 'run.json').write_text(json.dumps(run_json))
    monkeypatch.undo()
    loads, reads = _record_calls(monkeypatch, torch, 'load'), _record_calls(monkeypatch, Path, 'read_text')
    assert main(['train', '--resume', str(out), '--quiet']) == 0
    assert loads == [out / 'checkpoint.pth']  # read once: the job hands what it read to fit
    assert reads.count(out / 'run.json') == 1
    metrics = _metrics(out)
    assert metrics['status'] == 'complete' and metrics['resumed_from'] == {'epoch': 1, 'batch': 0}
    assert metrics['args']['resume'] == str(out) and metrics['args']['epochs'] == 2
    assert not (out / 'checkpoint.pth').exists() and not (out / 'run.json').exists()


def test_torchvision_arch_from_local_weights_with_fine_tune(tmp_path):
    import torchvision
    weights = tmp_path / 'weights.pth'
    torch.manual_seed(1)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    out = tmp_path / 'out'
    assert main(['train', *TINY, '--epochs', '2', '--arch', 'torchvision/resnet18', '--pretrained', str(weights),
                 '--fine-tune', '1', '--lr', '0.01', '--quiet', '--out', str(out)]) == 0
    metrics = _metrics(out)
    assert len(metrics['history']) == 3  # fine_tune: 1 frozen epoch, then 2 of the whole network
    learn, _ = build_learner(_args(*TINY, '--arch', 'torchvision/resnet18', '--pretrained', str(weights),
                                   '--out', str(tmp_path / 'other')))
    body = learn.model[0]
    assert torch.equal(body[0].weight, torch.load(weights)['conv1.weight'])  # the body starts from the file
    assert all(p.requires_grad for p in learn.model.parameters())  # --pretrained alone: everything trains
    assert len(learn.opt.param_groups) >= 2  # body then head


def test_pretrained_offline_is_one_line_naming_the_ways_out(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch-home'))  # no cached weights
    code = main(['train', *TINY, '--arch', 'resnet34', '--pretrained', '--out', str(tmp_path / 'out')])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and 'pretrained=False' in err[0] and 'Traceback' not in err[0]
