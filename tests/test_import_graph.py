"""The package's import graph points one way: no cycle (function-local imports included); nothing inside
the package but the public API (`_api.py`, which `__init__.py` loads on first use) and the `minilearn train` job
(`train_job.py`) imports `learner.py`; `cli.py` imports only the standard library and the torch-free
`train_spec.py` at the top, and the jobs (`jobs.py`: `train_job.py`, and `tune_job.py` above it) once, inside
`main`; the trackers' callbacks import no tracker at the top (mlflow and optuna are optional); the modules split out of `inference`,
`callbacks/metrics`, `data/external` and `data/items` sit below the modules that re-export them."""
import ast
import sys
from pathlib import Path

import minilearn

PACKAGE = Path(minilearn.__file__).parent


def _module_name(path: Path) -> str:
    parts = ('minilearn',) + path.relative_to(PACKAGE).with_suffix('').parts
    return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == 'TYPE_CHECKING' or \
        isinstance(node.test, ast.Attribute) and node.test.attr == 'TYPE_CHECKING'


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every package module that `path` imports anywhere (functions included, `if TYPE_CHECKING:` excluded)."""
    name = _module_name(path)
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse: visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1): base = base.rpartition('.')[0]
            target = (f'{base}.{node.module}' if node.module else base) if node.level else node.module
            for alias in node.names:  # `from . import models` names a module
                sub = f'{target}.{alias.name}'
                found.add(sub if sub in modules else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        for child in ast.iter_child_nodes(node): visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in modules and m != name}


def _graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in PACKAGE.rglob('*.py')}
    return {name: _imports(path, set(paths)) for name, path in paths.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v: break
            if len(component) > 1: out.append(sorted(component))

    for v in sorted(graph):
        if v not in index: strong(v)
    return out


def test_the_checker_finds_a_cycle_and_ignores_type_checking_imports(tmp_path, monkeypatch):
    pkg = tmp_path / 'minilearn'
    (pkg / 'sub').mkdir(parents=True)
    (pkg / '__init__.py').write_text('')
    (pkg / 'sub' / '__init__.py').write_text('')
    (pkg / 'a.py').write_text('def f():\n    from .sub import b\n')
    (pkg / 'sub' / 'b.py').write_text('from ..a import f\n')
    (pkg / 'c.py').write_text('from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n')
    (pkg / 'd.py').write_text('from . import c\n')
    monkeypatch.setitem(globals(), 'PACKAGE', pkg)
    graph = _graph()
    assert _cycles(graph) == [['minilearn.a', 'minilearn.sub.b']]
    assert graph['minilearn.c'] == set() and graph['minilearn.d'] == {'minilearn.c'}


def test_no_import_cycle_in_the_package():
    assert _cycles(_graph()) == []


def test_only_the_api_and_the_train_job_import_the_learner():
    importers = sorted(name for name, deps in _graph().items() if 'minilearn.learner' in deps)
    assert importers == ['minilearn._api', 'minilearn.train_job']  # _api: what `minilearn/__init__.py` loads on use


def _top_and_local_imports(path: Path) -> tuple[set[str], list[str]]:
    """The modules `path` imports at module level (`from . import x` as the package), and those imported inside
    functions, in order (relative ones as `.name`)."""
    top, local = set(), []

    def names(node: ast.Import | ast.ImportFrom) -> list[str]:
        if isinstance(node, ast.Import): return [alias.name for alias in node.names]
        return ['.' * node.level + (node.module or '')]

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if in_function: local.extend(names(node))
            else: top.update(names(node))
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(path.read_text(), str(path)), False)
    return top, local


def _standard(name: str) -> bool:
    return name.split('.')[0] in sys.stdlib_module_names or name == '__future__'


def test_cli_imports_the_standard_library_and_reaches_the_job_once():
    top, local = _top_and_local_imports(PACKAGE / 'cli.py')
    # '.': the package itself, for __version__ (torch-free, and imported already with any of its modules)
    assert {name for name in top if not _standard(name)} == {'.', '.train_spec'}
    assert local == ['.jobs']  # inside main, once the command line is checked
    spec_top, spec_local = _top_and_local_imports(PACKAGE / 'train_spec.py')
    assert all(_standard(name) for name in spec_top) and spec_local == []
    assert _graph()['minilearn.train_spec'] == set()  # what cli.py and the job share imports nothing of the package
    graph = _graph()
    assert graph['minilearn.jobs'] == {'minilearn.train_job', 'minilearn.tune_job'}
    job, tune = graph['minilearn.train_job'], graph['minilearn.tune_job']
    assert 'minilearn.learner' in job and 'minilearn.train_spec' in job and 'minilearn.cli' not in job
    assert 'minilearn.train_job' in tune and 'minilearn.jobs' not in job | tune and 'minilearn.cli' not in tune


def test_the_trackers_are_imported_only_when_used():
    for module in ('callbacks/mlflow_logger.py', 'callbacks/optuna_pruning.py', 'tune_job.py', 'train_job.py',
                   'jobs.py', '_api.py'):
        top, local = _top_and_local_imports(PACKAGE / module)
        assert not {n for n in top | set(local) if n.split('.')[0] in ('mlflow', 'optuna')}, module
    assert 'minilearn.callbacks.loggers' in _graph()['minilearn.callbacks.mlflow_logger']  # the logger protocol


def test_the_protocol_and_core_import_nothing_above_them():
    graph = _graph()
    assert graph['minilearn.core'] == set()
    assert graph['minilearn.callback'] == {'minilearn.core'}
    data = [name for name in graph if name.startswith('minilearn.data')]
    assert not {dep for name in data for dep in graph[name] if dep.startswith('minilearn.callback')}


def test_the_split_modules_point_one_way():
    """Each concept split out of a two-concept module imports nothing above it; the old module re-exports it."""
    graph = _graph()
    assert graph['minilearn.metrics'] <= {'minilearn.core'}  # metric functions: no callback, no learner
    assert 'minilearn.metrics' in graph['minilearn.callbacks.metrics']
    assert graph['minilearn.inference'] == {'minilearn.predictions', 'minilearn.interpret', 'minilearn.model_summary'}
    above = {'minilearn.inference', 'minilearn.interpret', 'minilearn.model_summary'}
    assert not graph['minilearn.predictions'] & above
    assert 'minilearn.predictions' in graph['minilearn.interpret'] & graph['minilearn.model_summary']
    assert 'minilearn.interpret' not in graph['minilearn.model_summary']
    assert 'minilearn.model_summary' not in graph['minilearn.interpret']
    assert 'minilearn.data.formats' in graph['minilearn.data.external']  # downloads re-export the readers
    assert 'minilearn.data.external' not in graph['minilearn.data.formats']
    assert 'minilearn.data.cache' in graph['minilearn.data.items']  # item lists decode through the cache
    assert 'minilearn.data.items' not in graph['minilearn.data.cache']  # (its type hints: under TYPE_CHECKING)
