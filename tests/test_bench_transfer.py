"""The transfer study's smoke mode: pretraining, the three rows, paired differences and the cost line, on
generated data."""
import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / 'bench' / 'transfer.py'


@pytest.fixture(scope='module')
def study():
    spec = importlib.util.spec_from_file_location('transfer_study', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_paired_difference_and_its_t_interval_by_hand(study):
    # differences 1, 2, 3: mean 2, sd 1, t(0.975, 2 df) = 4.303, half-width 4.303 / sqrt(3) = 2.484
    assert study.paired([11., 12., 13.], [10., 10., 10.]) == '+2.00 [-0.48, +4.48]'
    assert study.paired([12., 12.5, 13.], [10., 10., 10.]).endswith(' *')


@pytest.mark.slow
def test_smoke_run_writes_the_table_and_the_cost(study, tmp_path):
    out = tmp_path / 'report.md'
    assert study.main(['--smoke', '--device', 'cpu', '--out', str(out)]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith('| 4 |') or line.startswith('| 8 |')]
    assert len(rows) == 2 and all(line.count('[') == 2 for line in rows)  # two paired differences per size
    assert 'Cost: the frozen epoch trains at' in text and 'Command: `python bench/transfer.py --smoke' in text
    assert (tmp_path / 'report.pretrained.pth').is_file()
