"""Every ```python block of README.md runs as a reader would paste it, each in a fresh namespace of its own.

The README leaves a few names to the reader (`path` to their images, their `model`, `make_model`, ...):
GIVEN lists, for each block that needs them, exactly the names it gets, built small here. Where the README's
sizes are too large for a test (4,000 images, 8 epochs), SMALLER lists each replacement; every replacement
must match its block exactly once, so a README edit that moves them fails here until the list is updated.
Anything else a block uses (`F`, `nn`, `partial`) must come from the block's own imports.
"""
from __future__ import annotations

import os
import re
import signal
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from minilearn import Callback

README = Path(__file__).resolve().parent.parent / 'README.md'


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(line number, source) of every ```python block of a markdown text, those indented in a list item too."""
    return [(text[:m.start()].count('\n') + 2, textwrap.dedent(m.group(2)))
            for m in re.finditer(r'^( *)```python\n(.*?)^\1```', text, flags=re.S | re.M)]


def _image_folder(root: Path, valid_name: str) -> Path:
    from minilearn.data.shapes import save_shapes_folder
    return save_shapes_folder(root / f'images_{valid_name}', n_per_class=2, n_valid_per_class=1, n_classes=10,
                              size=16, valid_name=valid_name)


def _small_model(data: Any = None) -> torch.nn.Module:
    from minilearn import conv_layer, get_cnn_model
    from minilearn.data.core import DataBunch
    data = data if data is not None else DataBunch(None, None, c_in=3, c_out=10)
    return get_cnn_model(data, [8, 16], conv_layer)


class _SigtermAt(Callback):
    """Sends this process SIGTERM once, after training batch `n` of the fit: the preemption the block handles."""

    def __init__(self, n: int):
        self.n, self.sent = n, False

    def after_batch(self) -> None:
        if self.in_train and not self.sent and self.n_iter == self.n:
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)


def _preempted(tmp: Path, namespace: dict) -> dict:
    namespace['learn'].add_cb(_SigtermAt(5))
    return {}


def _shapes(tmp: Path, namespace: dict) -> dict:
    from minilearn.data.shapes import shapes_datasets
    train_ds, valid_ds = shapes_datasets(80, 40, size=16)
    return {'train_ds': train_ds, 'valid_ds': valid_ds, 'make_model': _small_model}


# block marker (a line only that block has) -> the names the reader supplies, built from a temporary folder
GIVEN: dict[str, Callable[[Path, dict], dict]] = {
    'grandparent_splitter, valid_name=': lambda tmp, ns: {'path': _image_folder(tmp, 'val'), 'bs': 8},
    'my_auroc(probs, targets)': lambda tmp, ns: {
        'model': _small_model(),
        'data': __import__('minilearn').shapes_databunch(n_train=32, n_valid=16, bs=16, size=16),
        'my_auroc': lambda probs, targets: probs.max(1).values.mean()},
    'label_image_folder(path': lambda tmp, ns: {'path': _image_folder(tmp, 'valid'), 'model': _small_model()},
    'out_of_fold_probs(make_learner': _shapes,
    # the Example's learner, stopped by SIGTERM in its second epoch
    "CheckpointCallback('ckpt', every_n_batches=100)": _preempted,
    "DistributedCallback(), CheckpointCallback('ckpt'": lambda tmp, ns: {  # one process: DistributedCallback idles
        'model': _small_model(), 'loss': torch.nn.functional.cross_entropy,
        'data': __import__('minilearn').shapes_databunch(n_train=32, n_valid=16, bs=16, size=16)},
    "MLflowCallback('sqlite:///mlflow.db'": lambda tmp, ns: {
        'model': _small_model(),
        'data': __import__('minilearn').shapes_databunch(n_train=32, n_valid=16, bs=16, size=16)},
}
# block marker -> (README text, its small stand-in): sizes only, never what the code does
SMALLER: dict[str, list[tuple[str, str]]] = {
    'shapes_databunch(n_train=4000': [('n_train=4000, n_valid=1000', 'n_train=256, n_valid=64'),
                                      ('fit_one_cycle(5,', 'fit_one_cycle(2,')],
    "CheckpointCallback('ckpt', every_n_batches=100)": [('every_n_batches=100', 'every_n_batches=3'),
                                    ('fit_one_cycle(10, cbs=ckpt)', 'fit_one_cycle(2, cbs=ckpt)'),
                                    ("fit_one_cycle(10, resume='ckpt')", "fit_one_cycle(2, resume='ckpt')")],
    'out_of_fold_probs(make_learner': [('k=4, epochs=8', 'k=2, epochs=1'), ('learn.fit(8)', 'learn.fit(1)'),
                                       ('bs=128, c_in=3', 'bs=32, c_in=3')],
    "MLflowCallback('sqlite:///mlflow.db'": [('learn.fit_one_cycle(5)', 'learn.fit_one_cycle(1)')],
    "DistributedCallback(), CheckpointCallback('ckpt'": [('every_n_batches=200', 'every_n_batches=1'),
                                                          ("fit_one_cycle(10, resume='auto')",
                                                           "fit_one_cycle(2, resume='auto')")],
}
# block marker -> the marker of the block it continues (it runs in that block's namespace, after it)
CONTINUES = {"CheckpointCallback('ckpt', every_n_batches=100)": 'shapes_databunch(n_train=4000'}

BLOCKS = python_blocks(README.read_text())


def _marker(source: str) -> str | None:
    found = [m for m in {*GIVEN, *SMALLER, *CONTINUES} if m in source]
    assert len(found) <= 1, f"markers {found} share a block"
    return found[0] if found else None


def _prepared(source: str) -> str:
    for old, new in SMALLER.get(_marker(source), []):
        assert source.count(old) == 1, f"README block no longer has {old!r} exactly once: update SMALLER"
        source = source.replace(old, new)
    return source


def _run(source: str, namespace: dict, where: str) -> dict:
    exec(compile(_prepared(source), where, 'exec'), namespace)
    return namespace


def test_accuracy_figures_are_ranges_not_one_machine_s_decimal():
    text = README.read_text()
    assert not re.search(r"prints `valid accuracy \d+\.\d%`", text)  # one run's decimal, as if every install gave it
    assert 'over seeds 0–2' in text and 'threads' in text


def test_every_marker_names_one_block():
    for marker in {*GIVEN, *SMALLER, *CONTINUES, *CONTINUES.values()}:
        assert sum(marker in src for _, src in BLOCKS) == 1, f"{marker!r} matches no README block, or several"
    assert len(BLOCKS) >= 6


@pytest.mark.slow
@pytest.mark.parametrize('line,source', BLOCKS, ids=[f'line{line}' for line, _ in BLOCKS])
def test_readme_block_runs(line: int, source: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture):
    monkeypatch.chdir(tmp_path)  # blocks write models/, export files... here
    torch.manual_seed(0)
    marker = _marker(source)
    namespace: dict = {'__name__': '__readme__'}
    if marker in CONTINUES:
        earlier = next((ln, src) for ln, src in BLOCKS if CONTINUES[marker] in src)
        _run(earlier[1], namespace, f'README.md:{earlier[0]}')
    if marker in GIVEN: namespace.update(GIVEN[marker](tmp_path, namespace))
    capsys.readouterr()
    _run(source, namespace, f'README.md:{line}')
    if marker in CONTINUES:  # the block's own claims: stopped, told where, resumed to the end
        assert 'training stopped by SIGTERM inside epoch 1' in capsys.readouterr().out
        assert namespace['learn'].epoch == 1 and len(namespace['learn'].avg_stats.history) == 2
