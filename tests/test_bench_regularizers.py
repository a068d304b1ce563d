"""The regularizer study (bench/regularizers.py): its smoke run, paired seeds, and the notebook's settings."""
import json
import re
from pathlib import Path

import nbformat
import pytest
import torch

from minilearn import Callback, Learner

from helpers import load_bench

NOTEBOOK = Path(__file__).resolve().parents[1] / 'nbs' / '10b_mixup_label_smoothing.ipynb'


@pytest.fixture(scope='module')
def bench():
    return load_bench('regularizers')


def test_smoke_run_reports_every_variant_against_cross_entropy(bench, tmp_path, capsys):
    out = tmp_path / 'runs.json'
    assert bench.main(['--smoke', '--seeds', '2', '--json', str(out)]) == 0
    printed = capsys.readouterr().out
    rows = {line.split(' | ')[0].strip('| '): line for line in printed.splitlines() if line.startswith('| ')}
    assert set(bench.VARIANTS) <= set(rows)
    runs = json.loads(out.read_text())
    assert sorted(runs) == ['0', '1'] and all(set(r) == {'wrong', *bench.VARIANTS} for r in runs.values())
    # the paired difference printed is the mean of the per-seed differences
    mixup = [runs[k]['MixUp']['acc'] - runs[k]['cross entropy']['acc'] for k in ('0', '1')]
    assert f'{sum(mixup) / 2:+.2f} [' in rows['MixUp']


def test_a_seed_reruns_to_the_same_figures(bench):
    s = dict(bench.SETTING, **bench.SMOKE, variants=['cross entropy', 'MixUp'])
    first, second = bench.run_seed(3, s), bench.run_seed(3, s)
    assert first.pop('wrong') == second.pop('wrong')
    assert 0 < first['cross entropy']['train_acc'] <= 100
    assert {v: r['acc'] for v, r in first.items()} == {v: r['acc'] for v, r in second.items()}


def test_the_variants_of_a_seed_start_from_the_same_weights_and_read_the_same_batches(bench, monkeypatch):
    """What makes the differences paired: only the loss and the callbacks differ within a seed."""
    seen = []

    class FirstBatch(Callback):
        def begin_fit(self):
            seen.append({'weights': [p.detach().clone() for p in self.model.parameters()], 'batches': []})

        def begin_batch(self):
            if self.in_train: seen[-1]['batches'].append(self.run.idx.tolist())

    def learner(*args, cb_funcs=(), **kwargs):
        return Learner(*args, cb_funcs=list(cb_funcs) + [FirstBatch], **kwargs)

    monkeypatch.setattr(bench, 'Learner', learner)
    bench.run_seed(1, dict(bench.SETTING, **bench.SMOKE))
    assert len(seen) == len(bench.VARIANTS)
    for other in seen[1:]:
        assert all(torch.equal(a, b) for a, b in zip(seen[0]['weights'], other['weights']))
        assert other['batches'] == seen[0]['batches'] and len(other['batches']) == 2 * 4  # 2 epochs of 200 at bs 64


def test_bad_options_are_refused(bench):
    with pytest.raises(SystemExit):
        bench.main(['--seeds', '0'])
    with pytest.raises(SystemExit):
        bench.main(['--variants', 'dropout'])


def test_seed_0_is_the_notebooks_run(bench):
    """The notebook's text quotes the study as containing its own run: the settings must agree."""
    code = '\n'.join(c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == 'code')
    s = bench.SETTING
    assert f"shapes_databunch(n_train={s['n_train']:_}, n_valid={s['n_valid']}, bs={s['bs']}, seed=0" in code
    assert f"EPOCHS, NFS = {s['epochs']}, {s['nfs']}" in code
    assert f"add_label_noise(data.train_ds, {s['noise']}, generator=torch.Generator().manual_seed(0))" in code
    assert f"lr={s['lr']:.0e}".replace('e-0', 'e-') in code and 'opt_func=torch.optim.Adam' in code
    assert re.findall(r'partial\(MixUp, alpha=([\d.]+)\)', code) == [str(s['alpha'])] * 2
    assert set(re.findall(r'LabelSmoothingCrossEntropy\(eps=([\d.]+)\)', code)) == {str(s['eps'])}
    assert 'torch.manual_seed(0)  #' in code and 'channel_stats(data.train_dl, n_batches=20)' in code
    assert 'torch.manual_seed(1)  ' in code and 'data.train_dl.set_epoch(0)' in code
