"""Small generated data and models shared by the tests (no network, no files)."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from minilearn.callback import Callback
from minilearn.data.core import DataBunch, Dataset


def linear_data(n_train: int = 96, n_valid: int = 64, n_features: int = 8, n_classes: int = 3, bs: int = 16,
                seed: int = 0, **dl_kwargs) -> DataBunch:
    """A learnable classification problem: the class is the argmax of a fixed linear map."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_valid, n_features, generator=g)
    w = torch.randn(n_features, n_classes, generator=g)
    y = (x @ w).argmax(1)
    return DataBunch.from_datasets(Dataset(x[:n_train], y[:n_train]), Dataset(x[n_train:], y[n_train:]), bs=bs,
                                   c_in=n_features, c_out=n_classes, **dl_kwargs)


def mlp(n_features: int = 8, n_classes: int = 3, n_hidden: int = 16) -> nn.Module:
    return nn.Sequential(nn.Linear(n_features, n_hidden), nn.ReLU(), nn.Linear(n_hidden, n_classes))


def image_data(n_train: int = 512, n_valid: int = 256, size: int = 12, n_classes: int = 4, bs: int = 32,
               seed: int = 0) -> DataBunch:
    """3-channel images whose class sets which quadrant holds a bright blob, under noise."""
    g = torch.Generator().manual_seed(seed)
    n = n_train + n_valid
    y = torch.randint(0, n_classes, (n,), generator=g)
    x = torch.rand(n, 3, size, size, generator=g) * 0.6
    half = size // 2
    for c in range(n_classes):
        r, col = divmod(c, 2)
        idx = (y == c).nonzero().flatten()
        x[idx, :, r * half:(r + 1) * half, col * half:(col + 1) * half] += 0.5
    return DataBunch.from_datasets(Dataset(x[:n_train], y[:n_train]), Dataset(x[n_train:], y[n_train:]), bs=bs,
                                   c_in=3, c_out=n_classes)


def small_cnn(c_in: int = 3, n_classes: int = 4) -> nn.Module:
    return nn.Sequential(nn.Conv2d(c_in, 8, 3, stride=2, padding=1), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, n_classes))


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def images(n=40, c=3, h=8, w=8, seed=0):
    """`n` random uint8 images (N, C, H, W) and class indices in [0, 4)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, c, h, w), dtype=torch.uint8, generator=g), torch.randint(0, 4, (n,), generator=g)


class BatchLog(Callback):
    """Keeps the inputs and targets of every batch (after the callbacks of lower _order ran)."""
    _order = 100

    def __init__(self, train_only=True):
        self.train_only, self.batches = train_only, []

    def begin_batch(self):
        if self.in_train or not self.train_only: self.batches.append((self.in_train, self.xb.clone(), self.yb.clone()))


def quiet_fit(learn, *args, **kwargs):
    """`learn.fit` without the epoch table."""
    learn.logger = lambda *a: None
    learn.fit(*args, **kwargs)


def batches(dl):
    """The inputs of every batch of one pass over `dl`, as lists."""
    return [xb.tolist() for xb, _ in dl]


# The Tensor methods that read a value back to the host.
READ_BACK = ('item', 'tolist', 'cpu', 'numpy', '__bool__', '__float__', '__int__', '__index__')


def forbid_host_reads(monkeypatch) -> None:
    """Make every host read of a tensor raise until `monkeypatch.undo()`."""
    def forbidden(*args, **kwargs): raise AssertionError('host read on the batch path')
    for name in READ_BACK: monkeypatch.setattr(torch.Tensor, name, forbidden)


def load_bench(name: str) -> ModuleType:
    """bench/<name>.py as a module (the bench folder is not a package)."""
    path = Path(__file__).resolve().parents[1] / 'bench' / f'{name}.py'
    spec = importlib.util.spec_from_file_location(f'bench_{name}', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_ports(n: int) -> list[int]:
    """`n` different free TCP ports on the loopback address, for a test's process groups."""
    import contextlib
    import socket
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks: sock.bind(('127.0.0.1', 0))  # all bound at once: n different ports
        return [sock.getsockname()[1] for sock in socks]


def free_port() -> int:
    """A free TCP port on the loopback address, for a test's process group."""
    return free_ports(1)[0]


def run_two_processes(worker, args: tuple, timeout: float) -> None:
    """Run `worker(rank, *args)` in 2 forked processes; fail the test (killing them) past `timeout` seconds."""
    import time
    import pytest
    import torch.multiprocessing as mp
    ctx = mp.start_processes(worker, args=args, nprocs=2, join=False, start_method='fork')
    deadline = time.time() + timeout
    while not ctx.join(timeout=1):
        if time.time() > deadline:
            for p in ctx.processes: p.kill()
            pytest.fail(f'the 2-process run did not finish within {timeout:g} s')
