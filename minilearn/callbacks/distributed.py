"""Multi-process data-parallel training on torch.distributed, for runs launched with `torchrun`."""
from __future__ import annotations

import atexit
import copy
import inspect
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, RandomSampler, Sampler, SequentialSampler

from ..callback import Callback, Order
from ..core import do_nothing, to_device
from ..data.core import TensorLoader
from ..data.sampler import LOADER_SETTINGS, ResumableLoader
from .device import DeviceCallback

if TYPE_CHECKING:
    from ..learner import Learner

__all__ = ['DistributedCallback', 'distrib_ctx', 'rank_distrib', 'num_distrib', 'shard_loader', 'ShardSampler',
           'all_gather_rows']


def num_distrib() -> int:
    """The number of processes of this run: the initialised group's size, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_available() and dist.is_initialized(): return dist.get_world_size()
    return int(os.environ.get('WORLD_SIZE', 1))


def rank_distrib() -> int:
    """This process's global rank: the initialised group's rank, else torchrun's RANK, else 0."""
    if dist.is_available() and dist.is_initialized(): return dist.get_rank()
    return int(os.environ.get('RANK', 0))


def _env_int(name: str) -> int:
    value = os.environ.get(name)
    if value is None:
        raise RuntimeError(f"WORLD_SIZE is set but {name} is not: launch with `torchrun --nproc_per_node N "
                           f"script.py`, which sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT")
    return int(value)


class ShardSampler(Sampler):
    """Every `world_size`-th index from `rank`: a shard of a dataset without padding (for validation)."""

    def __init__(self, n_items: int, rank: int, world_size: int):
        self.n_items, self.rank, self.world_size = n_items, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n_items, self.world_size))

    def __len__(self) -> int:
        return max(0, math.ceil((self.n_items - self.rank) / self.world_size))


def _shuffles(dl: DataLoader) -> bool:
    sampler = dl.sampler
    if isinstance(sampler, SequentialSampler): return False
    if isinstance(sampler, RandomSampler) and not sampler.replacement and sampler._num_samples is None: return True
    raise ValueError(f"DistributedCallback cannot shard a DataLoader with a custom sampler "
                     f"({type(sampler).__name__}): build it with shuffle=True/False, or give it a "
                     f"DistributedSampler yourself (it is then used as it is)")


def shard_loader(dl: DataLoader, rank: int, world_size: int, train: bool, seed: int = 0) -> DataLoader:
    """A copy of `dl` (same batch size, collate_fn, workers, pinning, drop_last...) reading only this rank's shard.

    Training shards come from a `DistributedSampler` (shuffled like `dl`, padded so every rank runs the
    same number of steps); validation shards are disjoint and unpadded, so the ranks together see every
    item exactly once. A `TensorLoader` (DataBunch.from_tensors) gives its own shard, a view of the same tensors,
    and a training `ResumableLoader` (get_dls) its own shard; both at their position, so a resumed run
    continues each rank's share of the epoch.
    """
    if isinstance(dl, TensorLoader): return dl.shard(rank, world_size, train=train, seed=seed if train else None)
    if isinstance(dl, ResumableLoader):
        if train: return dl.shard(rank, world_size, seed=seed)
        if dl.sampler.shuffle:
            raise ValueError("DistributedCallback shards validation without shuffling; build the validation "
                             "DataLoader with shuffle=False")
        return DataLoader(dl.dataset, batch_size=dl.batch_size, sampler=ShardSampler(len(dl.dataset), rank, world_size),
                          **dl.settings())
    if isinstance(dl.sampler, DistributedSampler): return dl  # sharded by the user already
    if isinstance(dl.dataset, IterableDataset):
        raise ValueError("DistributedCallback cannot shard an IterableDataset; split the stream per rank in the "
                         "dataset itself (torch.distributed.get_rank()) and give it a DistributedSampler-free loader")
    if dl.batch_size is None:
        raise ValueError(f"DistributedCallback cannot shard a DataLoader with a custom batch_sampler "
                         f"({type(dl.batch_sampler).__name__}); build it with batch_size=..., or shard it yourself")
    shuffle = _shuffles(dl)
    if train:
        sampler = DistributedSampler(dl.dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed)
    elif shuffle:
        raise ValueError("DistributedCallback shards validation without shuffling; build the validation "
                         "DataLoader with shuffle=False")
    else:
        sampler = ShardSampler(len(dl.dataset), rank, world_size)
    accepted = inspect.signature(DataLoader).parameters
    settings = {name: getattr(dl, name) for name in LOADER_SETTINGS if name in accepted and hasattr(dl, name)}
    if not settings.get('num_workers'): settings.pop('prefetch_factor', None)
    return DataLoader(dl.dataset, batch_size=dl.batch_size, sampler=sampler, **settings)


def _destroy_process_group_at_exit() -> None:
    """Destroy the default process group if it is still there (registered when a DistributedCallback made it)."""
    if dist.is_available() and dist.is_initialized(): dist.destroy_process_group()


def _init_process_group(backend: str | None, device: torch.device) -> bool:
    """Initialise the default process group from torchrun's environment if needed; True if this call did."""
    if dist.is_initialized(): return False
    if device.type == 'cuda': torch.cuda.set_device(device)
    backend = backend or ('nccl' if device.type == 'cuda' else 'gloo')
    attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT')
    if attempt is None:
        dist.init_process_group(backend, init_method='env://')
    else:
        # torchrun's agent serves one store for every restart of the group, which still holds the addresses the
        # processes of the attempt before published: a restarted rank would connect to them (gloo's
        # "connectFullMesh failed ... Connection refused", or a hang). Each attempt's group keeps its keys apart.
        store, rank, world_size = next(dist.rendezvous('env://'))
        dist.init_process_group(backend, store=dist.PrefixStore(f'minilearn/attempt_{attempt}', store), rank=rank,
                                world_size=world_size)
    # The group outlives the fit (a script may fit again). Left to the interpreter's teardown, gloo's threads
    # can abort the process as it exits ("terminate called without an active exception", SIGABRT: torchrun
    # then reports the run failed); destroyed at exit instead. Registered once however many groups are made.
    atexit.unregister(_destroy_process_group_at_exit)
    atexit.register(_destroy_process_group_at_exit)
    return True


def _local_device(device: Any, backend: str | None) -> torch.device:
    if device is not None: return torch.device(device)
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if backend != 'gloo' and torch.cuda.is_available(): return torch.device('cuda', local_rank)
    return torch.device('cpu')


def all_gather_rows(t: torch.Tensor | None, device: torch.device | str) -> torch.Tensor | None:
    """Every rank's `t` joined along dim 0 (ranks may hold different numbers of rows, or None), on `t`'s device
    (`device` where this rank holds none); a collective that every rank calls, exchanging on `device`."""
    meta = None if t is None else (t.shape[0], tuple(t.shape[1:]), str(t.dtype).replace('torch.', ''))
    metas: list = [None] * dist.get_world_size()
    dist.all_gather_object(metas, meta)
    known = [m for m in metas if m is not None]
    if not known: return t
    if any(m[1:] != known[0][1:] for m in known):
        raise RuntimeError(f"all_gather_rows: the ranks hold rows of different shapes or dtypes "
                           f"({sorted({m[1:] for m in known})}); every rank must give the same per-row shape")
    trailing, dtype, device = known[0][1], getattr(torch, known[0][2]), torch.device(device)
    rows = [0 if m is None else m[0] for m in metas]
    padded = torch.zeros((max(rows),) + trailing, dtype=dtype, device=device)  # all_gather needs one shape
    if t is not None: padded[:t.shape[0]] = t.to(device)
    out = [torch.empty_like(padded) for _ in metas]
    dist.all_gather(out, padded)
    return torch.cat([o[:n] for o, n in zip(out, rows)]).to(device if t is None else t.device)


class DistributedCallback(Callback):
    """Data-parallel training over the processes of a `torchrun` launch (DistributedDataParallel).

    At `begin_fit`: initialises the process group from torchrun's environment if needed (NCCL on GPUs,
    gloo on CPU), moves the model to this process's device (`cuda:LOCAL_RANK` or the CPU) and wraps it
    in DistributedDataParallel, and replaces the DataLoaders by per-rank shards with the same settings
    (`shard_loader`). It sets the learner's `rank`, `world_size` and `fit_device` (DeviceCallback then moves
    to this process's device), so AvgStatsCallback combines every rank's figures through `learn.all_reduce`
    and `learn.all_gather_rows` and every rank reports those of the whole dataset, and the learner leaves
    the callbacks with `main_process_only = True` (progress, loggers) to rank 0. Every epoch it reseeds the
    training sampler (`set_epoch`). On ranks other than 0 the logger does nothing; checkpoints are
    written by rank 0 only (`learn.save`). `after_fit` restores the learner's model, data, logger, rank,
    world size and device.
    Without a distributed launch (WORLD_SIZE unset or 1) it does nothing, so the same script runs with
    plain `python`. The Recorder keeps each rank's own training losses.
    """
    _order = Order.DISTRIBUTED

    def __init__(self, backend: str | None = None, device: Any = None, seed: int = 0, **ddp_kwargs: Any):
        self.backend, self.device_arg, self.seed, self.ddp_kwargs = backend, device, seed, ddp_kwargs
        self.active, self.saved = False, None

    def init_process_group(self) -> bool:
        """Initialise torch.distributed from torchrun's environment when launched so; True if this call did."""
        if not dist.is_available() or dist.is_initialized() or int(os.environ.get('WORLD_SIZE', 1)) <= 1: return False
        for name in ('RANK', 'LOCAL_RANK'): _env_int(name)
        return _init_process_group(self.backend, _local_device(self.device_arg, self.backend))

    def begin_fit(self) -> None:
        self.init_process_group()
        self.active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        if not self.active: return
        rank, world_size = dist.get_rank(), dist.get_world_size()
        self.device = _local_device(self.device_arg, self.backend)
        run = self.run
        data = copy.copy(run.data)
        data.train_dl = shard_loader(run.data.train_dl, rank, world_size, train=True, seed=self.seed)
        if run.data.valid_dl is not None:
            data.valid_dl = shard_loader(run.data.valid_dl, rank, world_size, train=False)
        model = run.model.to(self.device)
        device_ids = [self.device] if self.device.type == 'cuda' else None
        self.ddp = DistributedDataParallel(model, device_ids=device_ids, **self.ddp_kwargs)
        self.saved = {'model': run.model, 'data': run.data, 'logger': run.logger, 'fit_device': run.fit_device,
                      'rank': run.rank, 'world_size': run.world_size}
        self.move_batches = run.find_cb(DeviceCallback) is None and self.device.type != 'cpu'
        run.model, run.data, run.fit_device = self.ddp, data, self.device
        run.rank, run.world_size = rank, world_size  # from the next callback on, main_process_only ones wait
        if rank != 0: run.logger = do_nothing

    def begin_epoch(self) -> None:
        if not self.active: return
        dl = self.run.data.train_dl
        sampler = dl if hasattr(dl, 'set_epoch') else dl.sampler  # resumable loaders keep their epoch themselves
        if hasattr(sampler, 'set_epoch'): sampler.set_epoch(self.run.epoch)

    def begin_batch(self) -> None:
        if not self.active or not self.move_batches: return
        self.run.xb, self.run.yb = to_device(self.run.xb, self.device), to_device(self.run.yb, self.device)
        self.run.idx = to_device(self.run.idx, self.device)

    def begin_validate(self) -> None:
        if not self.active: return
        # Every rank validates with rank 0's buffers (BatchNorm statistics); no collective runs inside the
        # validation batches, so ranks may have different numbers of them.
        if self.ddp.broadcast_buffers:
            for buffer in self.ddp.module.buffers(): dist.broadcast(buffer.data, src=0)
        self.ddp.require_forward_param_sync = False

    def after_fit(self) -> None:
        if self.saved is None: return  # begin_fit did not wrap anything
        saved, self.saved, self.active = self.saved, None, False
        run = self.run
        run.model, run.data, run.logger = saved['model'], saved['data'], saved['logger']
        run.fit_device, run.rank, run.world_size = saved['fit_device'], saved['rank'], saved['world_size']
        self.ddp = None


@contextmanager
def distrib_ctx(learn: Learner, **kwargs: Any) -> Iterator[Learner]:
    """Within the block, `learn` trains with a DistributedCallback (kwargs go to it); removed on exit.

    The process group is initialised on entry when launched by torchrun, and destroyed on exit if it was
    initialised here.
    """
    cb = DistributedCallback(**kwargs)
    created = cb.init_process_group()
    try:
        learn.add_cb(cb)
        try:
            yield learn
        finally:
            learn.remove_cbs(cb)
    finally:
        if created: dist.destroy_process_group()
