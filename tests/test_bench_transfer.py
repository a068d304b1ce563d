"""The transfer study's smoke mode: pretraining, the three rows, paired differences and the cost line, on
generated data."""

import pytest

from helpers import load_bench


@pytest.fixture(scope='module')
def study():
    return load_bench('transfer')


def test_the_paired_difference_is_the_studies_shared_one(study):
    assert study.paired.__module__ == '_common'  # bench/_common.py's, tested by hand in test_bench_noisy.py


@pytest.mark.slow
def test_smoke_run_writes_the_table_and_the_cost(study, tmp_path):
    out = tmp_path / 'report.md'
    assert study.main(['--smoke', '--device', 'cpu', '--out', str(out)]) == 0
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith('| 4 |') or line.startswith('| 8 |')]
    assert len(rows) == 2 and all(line.count('[') == 2 for line in rows)  # two paired differences per size
    assert 'Cost: the frozen epoch trains at' in text and 'Command: `python bench/transfer.py --smoke' in text
    assert (tmp_path / 'report.pretrained.pth').is_file()
