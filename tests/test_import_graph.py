"""The package's import graph points one way: no cycle (function-local imports included), and nothing inside
the package but the public API (`_api.py`, which `__init__.py` loads on first use), `cli.py` and `vision.py` import
`learner.py`."""
import ast
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


def test_only_init_cli_and_vision_import_the_learner():
    importers = sorted(name for name, deps in _graph().items() if 'minilearn.learner' in deps)
    # _api: the names `minilearn/__init__.py` loads on first use; vision: vision_learner builds a Learner (above it)
    assert importers == ['minilearn._api', 'minilearn.cli', 'minilearn.vision']


def test_the_protocol_and_core_import_nothing_above_them():
    graph = _graph()
    assert graph['minilearn.core'] == set()
    assert graph['minilearn.callback'] == {'minilearn.core'}
    data = [name for name in graph if name.startswith('minilearn.data')]
    assert not {dep for name in data for dep in graph[name] if dep.startswith('minilearn.callback')}
