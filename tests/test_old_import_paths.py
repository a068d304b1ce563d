"""The modules split in two or three keep their old import paths: every name they had is the object of its new home,
and the package's top-level name is that same object."""
import importlib

import pytest

import minilearn

# old module -> {name: the module that holds it now}
MOVED = {
    'minilearn.callbacks.metrics': {'accuracy': 'minilearn.metrics'},
    'minilearn.inference': {
        **dict.fromkeys(['get_preds', 'predict', 'tta', 'hflip', 'inference_callbacks', 'item_to_tensor',
                         'decode_prediction'], 'minilearn.predictions'),
        **dict.fromkeys(['show_results', 'ClassificationInterpretation'], 'minilearn.interpret'),
        **dict.fromkeys(['summary', 'ModelSummary'], 'minilearn.model_summary')},
    'minilearn.data.external': dict.fromkeys(['read_idx', 'read_mnist', 'read_cifar10', 'CIFAR10_CLASSES',
                                              'cifar10_data', 'cifar10_databunch', 'mnist_data', 'mnist_databunch'],
                                             'minilearn.data.formats'),
}
CASES = [(old, name, new) for old, names in MOVED.items() for name, new in names.items()]


@pytest.mark.parametrize('old, name, new', CASES)
def test_an_old_import_path_gives_the_object_of_its_new_home(old, name, new):
    moved = getattr(importlib.import_module(new), name)
    assert getattr(importlib.import_module(old), name) is moved
    assert name in importlib.import_module(new).__all__
    if name in minilearn.__all__: assert getattr(minilearn, name) is moved


def test_functions_and_classes_say_their_new_home():
    for old, name, new in CASES:
        moved = getattr(importlib.import_module(new), name)
        if callable(moved) and hasattr(moved, '__module__'): assert moved.__module__ == new, (old, name)


def test_the_old_modules_still_export_every_name_they_had():
    from minilearn import inference
    from minilearn.callbacks import metrics
    from minilearn.data import external
    assert set(inference.__all__) == set(MOVED['minilearn.inference'])
    assert {'accuracy', 'AccumMetric', 'AvgStats', 'AvgStatsCallback', 'f1_score', 'balanced_accuracy',
            'top_k_accuracy', 'precision_score', 'recall_score'} <= set(metrics.__all__)
    assert set(MOVED['minilearn.data.external']) | {'URLs', 'untar_data', 'download_url', 'download_mnist'} \
        <= set(external.__all__)
    for module in (inference, metrics, external):
        assert [n for n in module.__all__ if not hasattr(module, n)] == []


def test_the_course_datasets_namespace_gives_the_moved_readers():
    from minilearn import datasets
    from minilearn.data import external, formats
    assert datasets.read_mnist is formats.read_mnist and datasets.untar_data is external.untar_data
