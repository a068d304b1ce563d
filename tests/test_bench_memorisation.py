"""The memorisation study's smoke mode and its bookkeeping: every row and table, gap closure, resuming, shards."""
import json
import math
import re
from functools import partial

import numpy as np
import pytest

from helpers import load_bench
from torch import nn

import minilearn


@pytest.fixture(scope='module')
def study():
    return load_bench('noisy_memorisation')


def test_gap_closure_and_scores_by_hand(study):
    assert study.gap_closure(80., 60., 95.) == pytest.approx(20 / 35)
    assert study.gap_closure(60., 60., 95.) == 0 and study.gap_closure(95., 60., 95.) == 1
    assert math.isnan(study.gap_closure(70., 60., 60.2)) and math.isnan(study.gap_closure(70., 60., 50.))
    curve = [50., 70., 90., 80., 60., 55., 52.]
    assert study.scores({'test': curve}, 'ce') == dict(final=52., last5=(90 + 80 + 60 + 55 + 52) / 5, best=90.)
    assert study.scores({'test': curve, 'chosen_epoch': 2}, 'ce-es')['final'] == 90.  # the epoch chosen on val
    runs = [{'train_s': [1., 1.], 'fold_s': 6.}], [{'train_s': [2., 2.]}]
    assert study.cost_ratio(*runs) == pytest.approx((2 + 6) / 2 / 2)


def test_every_method_is_available_and_wired_to_the_library(study):
    assert all(study.available(m) for m in study.ALL_METHODS) and study.available('aum')
    r = study.REGIMES['mnist']
    peer = partial(study.make_model, 'mlp:8', (1, 4, 4), 10)
    (co,) = study.method_callbacks('coteach', r, peer, 0.45)
    (jo,) = study.method_callbacks('jocor', r, peer, 0.3)
    (elr,) = study.method_callbacks('elr', r, peer, 0.)
    assert isinstance(co, minilearn.CoTeaching) and isinstance(jo, minilearn.JoCoR) and isinstance(elr, minilearn.ELR)
    assert (co.forget_rate, co.num_gradual, jo.forget_rate, jo.co_lambda) == (0.45, 10, 0.3, 0.1)
    assert (elr.beta, elr.lam) == (0.7, 3.0)
    assert isinstance(co.peer, nn.Module) and co.peer is not jo.peer  # a fresh second network per run
    (mix,) = study.method_callbacks('mixup', r, peer, 0.)
    assert isinstance(mix, minilearn.MixUp)


def test_arguments_are_checked_before_any_run(study, tmp_path):
    with pytest.raises(SystemExit):
        study.parse_args(['--raw', str(tmp_path), '--methods', 'ce,nope'])
    with pytest.raises(SystemExit):
        study.parse_args(['--raw', str(tmp_path), '--noises', 'pair:1.5'])
    with pytest.raises(SystemExit):
        study.parse_args(['--raw', str(tmp_path), '--shard', '2/2'])
    args = study.parse_args(['--raw', str(tmp_path)])
    mnist, cifar = args.regimes_cfg['mnist'], args.regimes_cfg['cifar']
    assert (mnist['arch'], mnist['opt'], mnist['lr'], mnist['bs']) == ('mlp:256', 'adam', 1e-3, 128)
    assert mnist['epochs'] == 60
    assert mnist['noises'] == [('symmetric', 0.5), ('pair', 0.45), ('asymmetric', 0.4)] and args.seeds == 5
    assert (cifar['arch'], cifar['sched'], cifar['epochs']) == ('bn6:16', 'cos', 24)
    model = study.make_model('mlp:256', (1, 28, 28), 10)
    assert [tuple(p.shape) for p in model.parameters()] == [(256, 784), (256,), (10, 256), (10,)]


def test_shards_split_the_runs_and_balance_them(study):
    tasks = [('mnist', 'symmetric-50', s, m) for s in range(5) for m in study.ALL_METHODS]
    owner = study.shard_of(tasks, study.REGIMES, 2)
    assert set(owner) == set(tasks) and set(owner.values()) == {0, 1}
    load = [sum(study.METHOD_COST.get(t[3], 1.) for t in tasks if owner[t] == i) for i in (0, 1)]
    assert abs(load[0] - load[1]) <= max(study.METHOD_COST.values())


@pytest.mark.slow
def test_smoke_run_writes_every_table_resumes_and_merges_shards(study, tmp_path, capsys):
    methods = [m for m in study.ALL_METHODS if study.available(m)]
    common = ['--smoke', '--raw', str(tmp_path / 'a')]
    # two "processes", one per shard, in two folders; the first returns without a report (runs missing)
    assert study.main(common + ['--shard', '0/2']) == 0
    assert not (tmp_path / 'report.md').exists()
    assert study.main(['--smoke', '--raw', str(tmp_path / 'b'), '--shard', '1/2']) == 0
    n_runs = len(list((tmp_path / 'a').glob('*.json'))) + len(list((tmp_path / 'b').glob('*.json')))
    assert n_runs == 2 * (3 + 1) * len(methods)  # seeds x (3 MNIST noises + 1 CIFAR) x methods
    out = tmp_path / 'report.md'
    assert study.main(common + ['--also-read', str(tmp_path / 'b'), '--report-only', '--out', str(out)]) == 0
    text = out.read_text()
    for m in methods:
        desc = study.method_spec(m, study.REGIMES['mnist'])[0]
        rows = [line for line in text.splitlines() if line.startswith((f'| {desc} |', f'| {desc} ('))]
        assert len(rows) == 4, m  # one row per noise setting
    for heading in ('### mnist, 50% symmetric noise', '### mnist, 45% pair noise', '### mnist, 40% asymmetric noise',
                    '### cifar, 50% symmetric noise'):
        assert heading in text
    gce_row = next(line for line in text.splitlines() if line.startswith('| GCE | q=0.7'))
    cells = [c.strip() for c in gce_row.split('|')[1:-1]]
    assert cells[5].count('[') == 1 and cells[6].count('[') == 1  # paired differences with 95 % intervals
    assert cells[7].count('%') == 2 and float(cells[8]) > 0  # gap closure final / last-5, cost vs CE
    leaders = [line for line in text.splitlines() if line.startswith('The leaders by final accuracy')]
    assert len(leaders) == 4  # one per noise setting: the top three, each against the next, paired
    for line in leaders:  # ranked by mean final accuracy, so each mean paired difference is >= 0
        gaps = [float(g) for g in re.findall(r': ([+-]\d+\.\d+) \[', line)]
        assert len(gaps) == 2 and min(gaps) >= 0 and 'CE on the clean labels' not in line, line
    detectors = ['in-sample loss ranking', 'out-of-fold loss ranking', 'confident learning, out-of-fold']
    if study.available('aum'): detectors.append('AUM ranking')
    for detector in detectors:
        assert any(line.startswith(f'| mnist | pair-45 | {detector}') for line in text.splitlines())
    curves = json.loads(out.with_suffix('.curves.json').read_text())
    ce = curves['mnist']['symmetric-50']['ce']
    assert set(ce) == {'0', '1'} and len(ce['0']['test']) == study.SMOKE['mnist']['epochs']
    assert len(curves['mnist']['symmetric-50']['ce-es']['1']['val']) == study.SMOKE['mnist']['epochs']
    png = out.with_suffix('.png').read_bytes()
    assert png[:8] == b'\x89PNG\r\n\x1a\n'
    # resuming: everything saved, so nothing runs again; runs of another configuration are refused, not mixed in
    assert study.main(common + ['--also-read', str(tmp_path / 'b')]) == 0
    assert 'this process runs 0 (shard 0/1)' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='another configuration'):
        study.main(common + ['--epochs', '7'])
    npz = [p for p in (tmp_path / 'a', tmp_path / 'b') if (p / 'mnist__symmetric-50__0__ce.json').exists()]
    with np.load(npz[0] / 'mnist__symmetric-50__0__ce.npz') as arrays:
        assert arrays['probs'].shape == (160, 10)


def test_cost_benchmark_smoke_times_every_method_against_ce(capsys):
    module = load_bench('noise_cost')
    assert module.main(['--smoke', '--rounds', '1', '--epochs', '1']) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith('| ') and '×' in line]
    assert [row.split(' | ')[0][2:] for row in rows] == ['CE', 'GCE', 'SCE', 'hard bootstrapping', 'MixUp', 'ELR',
                                                          'Co-teaching', 'JoCoR']
    assert rows[0].endswith('| 1.00× |') and all(float(row.split(' | ')[2][:-3]) > 0 for row in rows)
