"""`import minilearn` is cheap and loads its API on first use; every module still imports first, in any order."""
import json
import subprocess
import sys

import minilearn


def _run(code):
    result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_import_minilearn_does_not_import_torch_until_a_name_is_used():
    out = _run("import json, sys, minilearn\n"
               "before = 'torch' in sys.modules\n"
               "learner = minilearn.Learner\n"
               "print(json.dumps([before, 'torch' in sys.modules, learner.__module__]))")
    assert json.loads(out) == [False, True, 'minilearn.learner']


# Each module imported first, in a process that has imported no minilearn module yet (torch stays loaded, so
# forgetting minilearn's modules between rounds is cheap): its own `from . import x` must not load the API early.
EACH_FIRST = r"""
import json, sys, torch
names = json.loads(sys.argv[1])
failed = {}
for name in names:
    for m in [m for m in sys.modules if m == 'minilearn' or m.startswith('minilearn.')]: del sys.modules[m]
    try:
        __import__(name)
        import minilearn
        namespace = {}
        exec('from minilearn import *', namespace)
        assert namespace['Learner'] is sys.modules['minilearn.learner'].Learner
    except Exception as e:
        failed[name] = f'{type(e).__name__}: {e}'
print(json.dumps(failed))
"""


def test_every_module_can_be_imported_first():
    from pathlib import Path
    root = Path(minilearn.__file__).parent
    names = sorted('.'.join(('minilearn',) + p.relative_to(root).with_suffix('').parts).removesuffix('.__init__')
                   for p in root.rglob('*.py') if p.name not in ('__main__.py',))
    assert 'minilearn.learner' in names and 'minilearn.export' in names and len(names) > 20
    out = subprocess.run([sys.executable, '-c', EACH_FIRST, json.dumps(names)], capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {}


def test_modules_and_names_resolve_and_unknown_names_fail():
    assert minilearn.datasets.untar_data is minilearn.untar_data
    assert minilearn.models.get_cnn_model is minilearn.get_cnn_model
    assert set(minilearn.__all__) <= set(dir(minilearn))
    try:
        minilearn.no_such_name
    except AttributeError as e:
        assert "has no attribute 'no_such_name'" in str(e)
    else:
        raise AssertionError('an unknown name resolved')


def test_every_public_name_is_imported_by_the_api_module():
    from minilearn import _api
    missing = sorted(set(minilearn.__all__) - set(vars(_api)))
    assert missing == [], f"names in minilearn.__all__ that minilearn/_api.py does not import: {missing}"
