"""Every notebook in nbs/ runs top to bottom without an error, and is stored with its outputs stripped.

The notebooks run in a Jupyter kernel of the interpreter running the tests (a kernelspec written to a
temporary JUPYTER_PATH, so a user's own `python3` kernelspec cannot point elsewhere), in a temporary
working folder, so nothing is written into the repository. The embedded dataset is used: the
variable that points the label-noise notebook at real data is cleared. Each notebook's run time is
printed (`pytest -s`); the budget (under 3 minutes each on 2 CPU cores) is not asserted here.
"""
from __future__ import annotations

import configparser
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

NBS_DIR = Path(__file__).resolve().parent.parent / 'nbs'
NOTEBOOKS = sorted(NBS_DIR.glob('*.ipynb'))
CELL_TIMEOUT_S = 600


PROGRESS_RE = re.compile(r"<progress\s+(?:value='(\d+)'\s+)?[^>]*?max='(\d+)'")


MARKDOWN_RULE_RE = re.compile(r'^\|(?:\s*:?-{3,}:?\s*\|)+\s*$', re.M)  # a table's |---|---| line


def _html_outputs(cell) -> list[str]:
    return [o['data']['text/html'] for o in cell.get('outputs', []) if 'text/html' in o.get('data', {})]


def stale_bars(cell) -> list[str]:
    """The progress bars a reader of the saved cell sees short of their end (e.g. a fit's bar left at 0 of 2)."""
    bars = [m for html in _html_outputs(cell) for m in PROGRESS_RE.finditer(html)]
    return [m.group(0) for m in bars if m.group(1) is None or m.group(1) != m.group(2)]


def _read(path: Path):
    import nbformat
    return nbformat.read(path, as_version=4)


def test_notebooks_exist():
    names = {p.name for p in NOTEBOOKS}
    assert {'00_quickstart.ipynb', '10b_mixup_label_smoothing.ipynb', 'noisy_labels.ipynb'} <= names, names


SETUP_CFG = NBS_DIR.parent / 'setup.cfg'
# distribution of an imported module, where the names differ
DISTRIBUTIONS = {'PIL': 'pillow', 'sklearn': 'scikit-learn', 'torchvision': 'torchvision'}
# what a notebook reaches through a minilearn call (text in its code -> the distribution that call imports)
REACHED_THROUGH_MINILEARN = {'find_label_issues(labels=': 'cleanlab', 'TensorBoardCallback': 'tensorboard'}


def _requirements(text: str) -> set[str]:
    return {re.split(r'[<>=!~\[; ]', line.strip())[0].lower() for line in text.splitlines() if line.strip()}


def test_the_notebooks_extra_installs_what_the_notebooks_need():
    """`pip install -e ".[notebooks]"` (what the README says) is enough to run every notebook without a warning."""
    cfg = configparser.ConfigParser()
    cfg.read(SETUP_CFG)
    installed = _requirements(cfg['options']['install_requires'])
    extras = {name: _requirements(value) for name, value in cfg['options.extras_require'].items()}
    # a front end, a kernel, and widgets: without them tqdm.auto bars (cleanlab's) print a TqdmWarning box
    assert {'jupyterlab', 'ipykernel', 'ipywidgets'} <= extras['notebooks']
    for path in NOTEBOOKS:
        code = '\n'.join(c.source for c in _read(path).cells if c.cell_type == 'code')
        modules = set(re.findall(r'^\s*(?:from|import)\s+(\w+)', code, flags=re.M)) - set(sys.stdlib_module_names)
        needed = {DISTRIBUTIONS.get(m, m).lower() for m in modules - {'minilearn'}}
        needed |= {dist for text, dist in REACHED_THROUGH_MINILEARN.items() if text in code}
        assert needed <= installed | extras['notebooks'], f"{path.name} needs {needed - installed - extras['notebooks']}"
        assert needed <= installed | extras['dev'], f"the tests run {path.name}: the dev extra needs them too"
    assert extras['notebooks'] - {'jupyterlab'} <= extras['dev']


@pytest.mark.parametrize('path', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_stripped(path: Path):
    nb = _read(path)
    assert nb.metadata.get('kernelspec', {}).get('name') == 'python3'
    code_cells = [c for c in nb.cells if c.cell_type == 'code']
    assert code_cells, f"{path.name} has no code cells"
    for i, cell in enumerate(code_cells):
        assert cell.get('outputs') == [], f"{path.name}: code cell {i} has stored outputs (strip them)"
        assert cell.get('execution_count') is None, f"{path.name}: code cell {i} has an execution count"


# Characters of code a rendered notebook shows on a line (nbconvert's HTML in a 1000-pixel-wide window);
# longer lines are cut off, behind a scroll bar.
RENDERED_LINE = 110


@pytest.mark.parametrize('path', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_code_lines_fit_a_rendered_cell(path: Path):
    long = [(i, line) for i, cell in enumerate(c for c in _read(path).cells if c.cell_type == 'code')
            for line in cell.source.splitlines() if len(line) > RENDERED_LINE]
    assert not long, f"{path.name}: code lines over {RENDERED_LINE} characters (code cell, line): {long}"


@pytest.fixture
def kernel_of_this_interpreter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `python3` kernelspec running `sys.executable`, first on JUPYTER_PATH; returns the working folder."""
    try:
        import ipykernel  # noqa: F401
    except ImportError:
        pytest.fail("ipykernel is not installed in this interpreter: install the dev extras (pip install -e '.[dev]')")
    spec_dir = tmp_path / 'jupyter' / 'kernels' / 'python3'
    spec_dir.mkdir(parents=True)
    spec = {'argv': [sys.executable, '-m', 'ipykernel_launcher', '-f', '{connection_file}'],
            'display_name': 'Python 3 (minilearn tests)', 'language': 'python'}
    (spec_dir / 'kernel.json').write_text(json.dumps(spec))
    monkeypatch.setenv('JUPYTER_PATH', str(tmp_path / 'jupyter'))
    # The kernel's own inline backend (not Agg): it draws every figure to a PNG at the end of its cell,
    # so a figure that fails to draw fails the test.
    monkeypatch.delenv('MPLBACKEND', raising=False)
    # One torch thread in the kernel, as tests/conftest.py does in-process: CI runners have 2 cores, and
    # small models run faster (and far more predictably on a busy runner) without thread contention.
    monkeypatch.setenv('OMP_NUM_THREADS', '1')
    monkeypatch.delenv('MINILEARN_NOISY_DATA', raising=False)
    workdir = tmp_path / 'work'
    workdir.mkdir()
    return workdir


@pytest.mark.parametrize('path', NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path: Path, kernel_of_this_interpreter: Path):
    from nbclient import NotebookClient
    nb = _read(path)
    before = sorted(p.name for p in NBS_DIR.iterdir())
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name='python3', allow_errors=False,
                            resources={'metadata': {'path': str(kernel_of_this_interpreter)}})
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError with the cell's traceback on the first failing cell
    elapsed = time.perf_counter() - start
    print(f'{path.name}: {elapsed:.1f} s')
    executed = [c for c in nb.cells if c.cell_type == 'code']
    assert all(c.execution_count is not None for c in executed), "some code cells were not executed"
    errors = [o for c in executed for o in c.outputs if o.get('output_type') == 'error']
    assert not errors, errors
    assert any('image/png' in o.get('data', {}) for c in executed for o in c.outputs), "no figure was drawn"
    stale = {i: stale_bars(c) for i, c in enumerate(executed) if stale_bars(c)}
    assert not stale, f"saved outputs show progress bars short of their end (code cell: bars): {stale}"
    warned = [o['text'] for c in executed for o in c.outputs
              if o.get('output_type') == 'stream' and o.get('name') == 'stderr' and 'Warning' in o.get('text', '')]
    assert not warned, f"the notebook shows warning boxes: {warned}"
    raw_tables = [o['text'] for c in executed for o in c.outputs
                  if o.get('output_type') == 'stream' and MARKDOWN_RULE_RE.search(o.get('text', ''))]
    assert not raw_tables, f"a Markdown table printed as text (display(Markdown(...)) renders it): {raw_tables}"
    assert sorted(p.name for p in NBS_DIR.iterdir()) == before, "the notebook wrote files into nbs/"
    if path.stem in CLAIMS: CLAIMS[path.stem]('\n'.join(_stdout(c) for c in executed))


def _stdout(cell) -> str:
    return ''.join(o.get('text', '') for o in cell.outputs if o.get('output_type') == 'stream' and o['name'] == 'stdout')


def mixup_pays_off(printed: str) -> None:
    """The 10b notebook's text: on its run cross entropy fits wrong labels, and MixUp ends ahead of it."""
    final = dict(re.findall(r'^(.+?)\s+clean validation accuracy after \d+ epochs: ([\d.]+) %', printed, flags=re.M))
    assert set(final) == {'cross entropy', 'MixUp', 'label smoothing', 'MixUp + label smoothing'}, printed
    assert float(final['MixUp']) > float(final['cross entropy']), final
    found = re.search(r'fits ([\d.]+) % of its training labels.*?; ([\d.]+) % of the training labels are correct',
                      printed)
    fitted, correct = map(float, found.groups())
    assert fitted > correct, printed  # the text: cross entropy fits wrong labels too


def at_least(pattern: str, minimum: float) -> Callable[[str], None]:
    """Every number the regex `pattern` (one group) finds in the printed output is at least `minimum`."""
    def check(printed: str) -> None:
        found = [float(v) for v in re.findall(pattern, printed)]
        assert found and min(found) >= minimum, f"{pattern!r} found {found} (at least {minimum} expected): {printed}"
    return check


def tracking_learns_and_prunes(printed: str) -> None:
    """The tracking notebook's "small pruned study" learns, prunes a trial and completes one."""
    at_least(r'best: trial \d+, .*valid_accuracy ([\d.]+)', 0.7)(printed)
    states = re.findall(r'^trial \d+: (\w+)', printed, flags=re.M)
    assert 'PRUNED' in states and 'COMPLETE' in states, printed


# What a notebook's text says its run shows, checked on the run's printed output.
# The demonstrations must learn: chance is 10 % on the 10 shapes.
CLAIMS: dict[str, Callable[[str], None]] = {
    '10b_mixup_label_smoothing': mixup_pays_off,
    '00_quickstart': at_least(r'validation accuracy ([\d.]+)%', 80),
    'tracking': tracking_learns_and_prunes}


FIT_CELLS = [
    """import torch, torch.nn.functional as F
from torch import nn
from minilearn import *
torch.manual_seed(0)
data = DataBunch.from_tensors(torch.randn(64, 4), torch.randint(0, 2, (64,)), torch.randn(32, 4),
                              torch.randint(0, 2, (32,)), bs=16)
def learner(): return Learner(nn.Linear(4, 2), data, F.cross_entropy, lr=0.1,
                              cbs=[ProgressCallback(), AvgStatsCallback([accuracy])])""",
    "learner().fit(2)",
    "learner().fit(2)\nlearner().fit(3)",
]


@pytest.mark.slow
def test_a_fit_saves_its_table_and_no_stale_bar(kernel_of_this_interpreter: Path):
    """What a reopened notebook (or GitHub, or the docs) shows of a fit: one table per fit, no empty bar."""
    import nbformat
    from nbclient import NotebookClient
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(src) for src in FIT_CELLS])
    nb.metadata['kernelspec'] = {'name': 'python3', 'display_name': 'Python 3', 'language': 'python'}
    NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name='python3',
                   resources={'metadata': {'path': str(kernel_of_this_interpreter)}}).execute()
    for cell, epochs in zip(nb.cells[1:], [[2], [2, 3]]):  # the fits of each cell
        html = _html_outputs(cell)
        assert not stale_bars(cell), stale_bars(cell)  # the master bar used to stay at value='0' max='2'
        assert sum(h.count('<progress') for h in html) <= len(epochs)
        tables = [h for h in html if '<table' in h]
        assert [t.count('<tr') - 1 for t in tables] == epochs, html  # one table per fit, a row per epoch
        assert all('valid_accuracy' in t for t in tables)
