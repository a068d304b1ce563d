"""The package's import graph points one way: no cycle (function-local imports included); nothing inside
the package but the public API (`_api.py`, which `__init__.py` loads on first use), the `minilearn train` job
(`train_job.py`) and `vision.py` (vision_learner builds a Learner) imports `learner.py`; `cli.py` imports only
the standard library and the torch-free `train_spec.py` at the top, and the jobs (`jobs.py`: `train_job.py`, and
`tune_job.py` above it) once, inside `main`; the trackers' callbacks import no tracker at the top (mlflow and
optuna are optional); the modules split out of `inference`, `callbacks/metrics`, `data/external` and `data/items`
sit below the modules that re-export them."""
import ast
import sys
from pathlib import Path

import minilearn
import torch

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


def test_only_the_api_the_train_job_and_vision_import_the_learner():
    importers = sorted(name for name, deps in _graph().items() if 'minilearn.learner' in deps)
    # _api: what `minilearn/__init__.py` loads on use; vision: vision_learner builds a Learner (it sits above it)
    assert importers == ['minilearn._api', 'minilearn.train_job', 'minilearn.vision']


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


# ---- callbacks cooperate through the learner: none writes another callback's attributes ------------------------
def _callback_names() -> set[str]:
    """The learner attribute names of the package's callbacks (`learn.avg_stats`, `learn.device`...)."""
    import importlib
    import inspect
    from minilearn.callback import Callback, callback_name
    names = set()
    for path in (PACKAGE / 'callbacks').glob('*.py'):
        module = importlib.import_module(_module_name(path))
        names |= {callback_name(c) for _, c in inspect.getmembers(module, inspect.isclass) if issubclass(c, Callback)}
    # a name the learner itself holds is never a callback's (add_cb refuses it): the base LoggerCallback's 'logger'
    from minilearn.learner import Learner
    from helpers import linear_data, mlp
    return names - set(vars(Learner(mlp(), linear_data(), torch.nn.functional.cross_entropy))) - set(dir(Learner))


def _is_learner(node: ast.AST) -> bool:
    return isinstance(node, ast.Name) and node.id in ('run', 'learn') or \
        isinstance(node, ast.Attribute) and node.attr == 'run' and isinstance(node.value, ast.Name)


def _foreign_writes(source: str, callback_names: set[str]) -> list[str]:
    """The statements of `source` that write to a callback other than `self`: assignments and `del` of its
    attributes or items, `setattr`/`delattr` on it, `vars(...)`/`__dict__` of it. A callback is what the learner
    hands out (`find_cb(...)`, `learn.cbs`, `learn.<callback name>`), any local name or `self.<attribute>`
    bound to an expression holding one, the loop variables over such an expression, and parameters annotated
    as callbacks."""
    tree = ast.parse(source)
    self_attrs: set[str] = set()  # attributes of `self` that hold another callback (anywhere in the module)

    def reaches(node: ast.AST, names: set[str]) -> bool:
        pending = [node]
        while pending:
            sub = pending.pop()
            if isinstance(sub, ast.Call) and isinstance(sub.func, ast.Attribute):
                if sub.func.attr == 'find_cb': return True
                # what a callback's method returns (`recorder.losses_from(0)`) is not the callback: only its arguments
                pending.extend([*sub.args, *(k.value for k in sub.keywords)])
                continue
            pending.extend(ast.iter_child_nodes(sub))
            if isinstance(sub, ast.Name) and sub.id in names: return True
            if isinstance(sub, ast.Attribute):
                if sub.attr == 'cbs' or sub.attr in callback_names and _is_learner(sub.value): return True
                if isinstance(sub.value, ast.Name) and sub.value.id == 'self' and sub.attr in self_attrs: return True
        return False

    def bound(target: ast.AST) -> list[ast.AST]:  # the names and `self.<attribute>`s a target binds
        if isinstance(target, (ast.Tuple, ast.List)): return [n for e in target.elts for n in bound(e)]
        if isinstance(target, ast.Starred): return bound(target.value)
        is_self_attr = isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and \
            target.value.id == 'self'
        return [target] if isinstance(target, ast.Name) or is_self_attr else []

    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    local = {id(f): {a.arg for a in f.args.args + f.args.kwonlyargs  # parameters typed as callbacks
                     if a.annotation is not None and 'Callback' in ast.unparse(a.annotation)} for f in functions}
    changed = True
    while changed:  # to a fixed point: a name bound from a bound name, `self.x` set in one method read in another
        changed = False
        for f in functions:
            for node in ast.walk(f):
                pairs = []
                if isinstance(node, ast.Assign): pairs = [(t, node.value) for t in node.targets]
                elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and node.value:
                    pairs = [(node.target, node.value)]
                elif isinstance(node, (ast.For, ast.comprehension)): pairs = [(node.target, node.iter)]
                for target, value in pairs:
                    if not reaches(value, local[id(f)]): continue
                    for n in bound(target):
                        names, key = (local[id(f)], n.id) if isinstance(n, ast.Name) else (self_attrs, n.attr)
                        if key not in names: names.add(key); changed = True
    found = []
    for f in functions:
        names = local[id(f)]
        for node in ast.walk(f):
            targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else \
                [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
            targets = [e for t in targets for e in (t.elts if isinstance(t, ast.Tuple) else [t])]
            if any(isinstance(t, (ast.Attribute, ast.Subscript)) and reaches(t.value, names) for t in targets):
                found.append(f'line {node.lineno}: {ast.unparse(node)}')
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.args and \
                    node.func.id in ('setattr', 'delattr', 'vars') and reaches(node.args[0], names):
                found.append(f'line {node.lineno}: {ast.unparse(node)}')
            elif isinstance(node, ast.Attribute) and node.attr == '__dict__' and reaches(node.value, names):
                found.append(f'line {node.lineno}: {ast.unparse(node)}')
    return sorted(set(found))


def test_the_checker_finds_writes_to_other_callbacks():
    names = {'device', 'avg_stats'}
    bad = '''
class Meddler(Callback):
    def begin_fit(self):
        run = self.run
        self.saved = {'devices': [(cb, cb.device) for cb in [run.find_cb(DeviceCallback)] if cb is not None]}
        for cb, _ in self.saved['devices']: cb.device = self.device
        stats = self.run.find_cb(AvgStatsCallback)
        stats.train_stats.count += 1
        self.run.avg_stats.history = []
        self.run.find_cb(Recorder).lrs[0] = 1
        for cb in run.cbs: setattr(cb, 'after_batch', print)
        other = [c for c in self.run.cbs if c.main_process_only][0]
        del other.after_batch
    def after_fit(self):
        for cb, device in self.saved['devices']: vars(cb).update(device=device)
    def _mute(self, cb: Callback) -> None:
        cb.begin_batch = do_nothing
'''
    found = _foreign_writes(bad, names)
    assert [f.split(':')[0] for f in found] == [f'line {n}' for n in (10, 11, 13, 15, 17, 6, 8, 9)], found
    good = '''
class Polite(Callback):
    def begin_fit(self):
        run = self.run
        self.stats = run.find_cb(AvgStatsCallback)
        data = copy.copy(run.data)
        data.train_dl = shard(run.data.train_dl)
        run.model, run.data, run.fit_device = self.model, data, self.device
        self.run.rank = 1
        self.rows = self.stats.history[-1]
        self.saved = {'model': run.model, 'n': len(run.cbs)}
        setattr(self.module, 'weight', None)
'''
    assert _foreign_writes(good, names) == []


def test_no_callback_writes_another_callbacks_attributes():
    names = _callback_names()
    assert {'device', 'avg_stats', 'recorder', 'distributed', 'progress'} <= names
    paths = sorted((PACKAGE / 'callbacks').glob('*.py'))
    found = {path.name: _foreign_writes(path.read_text(), names) for path in paths}
    assert {k: v for k, v in found.items() if v} == {}
