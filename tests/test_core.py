"""minilearn.core: the small helpers the package shares, against hand-written expectations."""
import io
import math
import re
from collections import namedtuple
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import minilearn.core as core
from minilearn.core import (batch_size, callable_name, camel2snake, check_positive, is_interactive, is_main_process,
                            listify, model_device, optional_import, to_device, unwrap_loss, unwrap_partial)


def test_listify():
    items = [1, 2]
    assert listify(None) == [] and listify(items) is items  # a list is kept, not copied
    assert listify((1, 2)) == [1, 2] and listify(range(3)) == [0, 1, 2] and listify(x for x in 'ab') == ['a', 'b']
    assert listify('abc') == ['abc'] and listify(b'ab') == [b'ab'] and listify(5) == [5]
    t, d = torch.arange(3), {'a': 1}
    assert listify(t)[0] is t and len(listify(t)) == 1 and listify(d) == [d]  # not split into elements / keys


@pytest.mark.parametrize('name, snake', [('AvgStatsCallback', 'avg_stats_callback'), ('Recorder', 'recorder'),
                                         ('TrainEvalCallback', 'train_eval_callback'), ('LRFinder', 'lr_finder'),
                                         ('CSVLogger', 'csv_logger'), ('MixUp', 'mix_up')])
def test_camel2snake(name, snake):
    assert camel2snake(name) == snake


def test_to_device_keeps_the_structure_and_moves_only_tensors():
    Pair = namedtuple('Pair', 'x y')
    cpu = torch.zeros(2)
    moved = to_device({'a': [cpu, (cpu, 'label')], 'b': Pair(cpu, 3)}, 'meta')
    assert moved['a'][0].is_meta and moved['a'][1][0].is_meta and moved['a'][1][1] == 'label'
    assert isinstance(moved['a'], list) and isinstance(moved['a'][1], tuple)
    assert type(moved['b']) is Pair and moved['b'].x.is_meta and moved['b'].y == 3
    assert to_device(cpu, 'cpu') is cpu  # already there: the same tensor, no copy


def test_unwrap_loss_and_unwrap_partial_go_through_every_layer():
    class Wrapper:
        def __init__(self, inner): self.base_loss_func = inner

    loss = nn.CrossEntropyLoss()
    assert unwrap_loss(Wrapper(Wrapper(loss))) is loss and unwrap_loss(loss) is loss
    assert unwrap_partial(partial(partial(F.cross_entropy, reduction='sum'), label_smoothing=0.1)) is F.cross_entropy
    assert callable_name(partial(partial(F.mse_loss))) == 'mse_loss' and callable_name(nn.MSELoss()) == 'MSELoss'


def test_is_main_process_without_torch_distributed():
    assert not torch.distributed.is_initialized() and is_main_process()


@pytest.mark.parametrize('value', [1, 0.5, 1e-8, np.float64(2.)])
def test_check_positive_accepts_positive_finite_numbers(value):
    check_positive('lr', value)


@pytest.mark.parametrize('value', [0, -1, math.nan, math.inf, True, '0.1', None, torch.tensor(1.)])
def test_check_positive_names_the_argument_and_the_value(value):
    with pytest.raises(ValueError, match=f"lr must be a positive finite number, got {re.escape(repr(value))}"):
        check_positive('lr', value)


def test_batch_size_reads_targets_then_inputs_then_len():
    x = torch.zeros(5, 3)
    assert batch_size(x, torch.zeros(4)) == 4  # the targets decide
    assert batch_size(x, torch.tensor(1.)) == 5  # 0-d targets: the inputs
    assert batch_size((x, x), [torch.zeros(6, 2), torch.zeros(6)]) == 6  # a tuple of targets: its first
    assert batch_size([x, torch.zeros(5)], torch.tensor(0)) == 5
    assert batch_size('text', ['a', 'b', 'c']) == 3


def test_model_device_reads_parameters_then_buffers_else_the_default():
    assert model_device(nn.Linear(2, 2)) == torch.device('cpu')
    buffers_only = nn.BatchNorm1d(3, affine=False).to('meta')
    assert next(iter(buffers_only.parameters()), None) is None and model_device(buffers_only) == torch.device('meta')
    assert model_device(nn.ReLU()) is None and model_device(nn.ReLU(), torch.device('meta')) == torch.device('meta')


def test_is_interactive_follows_the_stream(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self): return True

    monkeypatch.setattr(core, 'IN_NOTEBOOK', False)
    assert is_interactive(Terminal()) and not is_interactive(io.StringIO()) and not is_interactive(object())
    monkeypatch.setattr(core, 'IN_NOTEBOOK', True)
    assert is_interactive(io.StringIO())


def test_optional_import_names_the_extra_that_installs_it():
    assert optional_import('math', 'X', 'extra') is math
    with pytest.raises(ImportError, match=r"MLflowLogger needs the mlflow-skinny package: "
                                          r"pip install 'minilearn\[mlflow\]' \(or pip install mlflow-skinny\)") as e:
        optional_import('no_such_module_xyz', 'MLflowLogger', 'mlflow', package='mlflow-skinny')
    assert isinstance(e.value.__cause__, ModuleNotFoundError)
    with pytest.raises(ImportError, match=r"needs the wandb package: pip install 'minilearn\[wandb\]'"):
        optional_import('no_such_module_xyz', 'WandbLogger', 'wandb')
