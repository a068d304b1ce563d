"""The label-noise study's smoke mode: the whole pipeline (every method, both detection regimes) on generated data."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / 'bench' / 'noisy_labels.py'


@pytest.fixture(scope='module')
def study():
    spec = importlib.util.spec_from_file_location('noisy_labels_study', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_difference_and_its_t_interval_by_hand(study):
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2 df) = 4.303, half-width 4.303 / sqrt(3) = 2.484
    assert study.paired([11., 12., 13.], [10., 10., 10.]) == '+2.00 [-0.48, +4.48]'
    assert study.paired([12., 12.5, 13.], [10., 10., 10.]).endswith(' *')  # excludes 0
    assert study.prf(*[__import__('numpy').array(v, dtype=bool) for v in ([1, 1, 0, 0], [1, 0, 1, 0])]) == \
        (0.5, 0.5, 0.5, 2)


def test_lab_recipe_is_exactly_the_lab(study):
    args = study.parse_args(['--recipe', 'lab', '--scale', 'cpu', '--device', 'cpu'])
    r = args.r
    assert (r['lr'], r['momentum'], r['wd'], r['bs'], r['sched'], r['augment']) == (0.1, 0.9, 5e-4, 128, 'const', True)
    assert (r['alpha'], r['soft_beta'], r['hard_beta']) == (0.2, 0.95, 0.8)
    assert args.seeds >= 5 and 'mixup-batch' in args.methods and 'clean-retrain' in args.methods
    assert study.parse_args(['--recipe', 'lab', '--lr', '0.05', '--device', 'cpu']).r['lr'] == 0.05
    with pytest.raises(SystemExit):
        study.parse_args(['--methods', 'ce,nope', '--device', 'cpu'])


def test_smoke_run_writes_every_table(study, tmp_path):
    out = tmp_path / 'report.md'
    assert study.main(['--scale', 'smoke', '--archs', 'bn6:4', '--device', 'cpu', '--jobs', '1',
                       '--out', str(out)]) == 0
    text = out.read_text()
    specs = study.method_specs(study.RECIPES['lab'])
    for method in ('ce', 'ls', 'soft-boot', 'hard-boot', 'mixup-batch', 'mixup', 'gce', 'sce', 'cutmix', 'clean-retrain'):
        assert f'| {specs[method][0]}' in text and specs[method][1] in text
    assert 'alpha=0.2, per_sample=False' in text and 'beta=0.95' in text and 'q=0.7' in text
    rows = [line for line in text.splitlines() if line.startswith('| label smoothing')]
    assert len(rows) == 1 and rows[0].count('[') == 2  # paired differences with intervals, final and last-3
    for regime in ('short', 'memorise'):
        for detector in ('in-sample loss ranking', 'out-of-fold loss ranking', 'confident learning, out-of-fold',
                         'area under the margin (true count)', "area under the margin (confident learning's count"):
            assert any(line.startswith(f'| {regime} | bn6:4 | {detector}') for line in text.splitlines())
    assert 'Command: `python bench/noisy_labels.py --scale smoke' in text
