"""A shuffling sampler and DataLoader that report and restore their position between batches, for exact
mid-epoch resume (the resumable loader protocol: `state_dict`, `load_state_dict`, `set_epoch`).

Written here rather than taken from torchdata's StatefulDataLoader: that is a dependency for one feature, and
it restores a sampler by replaying it. Epoch e's order is `randperm(n, Generator().manual_seed(seed + e))`
(as in TensorLoader), so it depends on the seed and the epoch only, and a resumed epoch skips the batches
already done without loading them.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler

__all__ = ['ResumableSampler', 'ResumableLoader', 'LOADER_SETTINGS', 'epoch_order', 'position_kept', 'one_batch']

# DataLoader settings carried over when a loader is rebuilt with another sampler (shards, resumable loaders).
LOADER_SETTINGS = ('num_workers', 'collate_fn', 'pin_memory', 'drop_last', 'timeout', 'worker_init_fn',
                   'multiprocessing_context', 'generator', 'prefetch_factor', 'persistent_workers',
                   'pin_memory_device', 'in_order')
_STATE_KEYS = ('seed', 'epoch', 'batches_done')


def _draw_seed(generator: torch.Generator | None = None) -> int:
    """A seed drawn once from `generator` (torch's global generator when None)."""
    return int(torch.randint(0, 2 ** 62, (), generator=generator))


@contextlib.contextmanager
def position_kept(dl: Any) -> Iterator[Any]:
    """Read `dl` inside the block without moving it: its position (a loader with `state_dict`/`load_state_dict`)
    and torch's CPU random state (which a shuffling DataLoader draws from) are put back after."""
    resumable = callable(getattr(dl, 'state_dict', None)) and callable(getattr(dl, 'load_state_dict', None))
    state = dl.state_dict() if resumable else None
    with torch.random.fork_rng(devices=[]):
        try:
            yield dl
        finally:
            if state is not None: dl.load_state_dict(state)


def one_batch(dl: Any) -> Any:
    """The first batch of `dl`'s next epoch, leaving the loader where it was (show_batch, summaries)."""
    with position_kept(dl):
        batches = iter(dl)
        try:
            return next(batches)
        finally:
            if callable(getattr(batches, 'close', None)): batches.close()  # ends the iteration inside the block


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool, rank: int = 0, world_size: int = 1,
                pad: bool = False) -> torch.Tensor:
    """The item indices one rank reads in `epoch`: a permutation seeded by `seed + epoch` (or 0..n-1), padded by
    repetition to a multiple of `world_size` when `pad`, then every `world_size`-th from `rank`."""
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)) if shuffle else torch.arange(n)
    if pad and n:
        total = math.ceil(n / world_size) * world_size
        idx = torch.cat([idx] * math.ceil(total / n))[:total]
    return idx[rank::world_size]


def checked_batches_done(loader: Any, state: dict, n_items: int, shuffle: bool) -> int:
    """The `batches_done` of a loader `state`, after checking it was taken from a loader like `loader`."""
    who = f'{type(loader).__name__}.load_state_dict'
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing: raise KeyError(f"{who}: the state lacks {missing}; pass what state_dict() returned")
    for key, mine in (('n_items', n_items), ('batch_size', loader.batch_size), ('shuffle', shuffle)):
        if key in state and state[key] != mine:
            raise ValueError(f"{who}: the state was taken with {key}={state[key]}, this loader has {key}={mine}; "
                             f"resume with the same data and batch size")
    done = int(state['batches_done'])
    if not 0 <= done <= len(loader):
        raise ValueError(f"{who}: batches_done={done} is outside [0, {len(loader)}]")
    return done


class ResumableSampler(Sampler[int]):
    """Epoch e's item indices: a permutation seeded with `seed + e` (or dataset order), one rank's share of it
    under DDP (padded as DistributedSampler pads, so every rank has as many), from item `start` on.

    Each iteration yields epoch `epoch` and moves on to the next; `set_epoch` chooses it explicitly. `seed`
    is drawn from torch's global generator when None, so `torch.manual_seed` makes runs reproducible.
    """

    def __init__(self, n_items: int, shuffle: bool = True, seed: int | None = None, rank: int = 0,
                 world_size: int = 1, pad: bool | None = None):
        _check_int('n_items', n_items, 0)
        _check_int('world_size', world_size, 1)
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        self.n_items, self.shuffle, self.rank, self.world_size = n_items, bool(shuffle), rank, world_size
        self.pad = world_size > 1 if pad is None else bool(pad)
        self.seed = _draw_seed() if seed is None else int(seed)
        self.epoch = 0  # the epoch the next iteration yields
        self.start = 0  # how many of its items to skip (set when resuming)

    def order(self, epoch: int | None = None) -> torch.Tensor:
        """The indices this rank reads in `epoch` (the next epoch by default), in order, from the first."""
        return epoch_order(self.n_items, self.seed, self.epoch if epoch is None else epoch, self.shuffle,
                           self.rank, self.world_size, self.pad)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration yield epoch `epoch` (the DistributedSampler convention)."""
        if epoch != self.epoch: self.start = 0
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        epoch, start = self.epoch, self.start
        self.epoch, self.start = epoch + 1, 0
        return iter(self.order(epoch)[start:].tolist())  # once per epoch, on the CPU

    def __len__(self) -> int:
        if self.pad: return math.ceil(self.n_items / self.world_size)
        return max(0, math.ceil((self.n_items - self.rank) / self.world_size))


class ResumableLoader(DataLoader):
    """A DataLoader over a `ResumableSampler` that knows how many batches of the current epoch it has yielded.

    `state_dict()` between batches gives the position (seed, epoch, batches done); after `load_state_dict`
    the next iteration yields the rest of that epoch without loading the batches done, and later epochs are
    the ones an uninterrupted run reads. Worker processes get seeds drawn from `seed + epoch` (not from
    torch's global generator). `last_idx` is the dataset indices (CPU) of the batch yielded last (the learner's
    `idx`), read from the epoch's order, so worker processes do not change it. `len` is always the whole epoch's number of batches. Other keyword arguments
    go to DataLoader; `generator`, when given, only draws the seed.
    """

    def __init__(self, dataset: Any, batch_size: int = 1, shuffle: bool = True, seed: int | None = None,
                 rank: int = 0, world_size: int = 1, pad: bool | None = None, generator: torch.Generator | None = None,
                 **kwargs: Any):
        _check_int('batch_size', batch_size, 1)
        for name in ('sampler', 'batch_sampler'):
            if kwargs.get(name) is not None:
                raise ValueError(f"ResumableLoader makes its own sampler; for a custom `{name}` use a DataLoader")
        sampler = ResumableSampler(len(dataset), shuffle=shuffle, seed=_draw_seed(generator) if seed is None else seed,
                                   rank=rank, world_size=world_size, pad=pad)
        super().__init__(dataset, batch_size=batch_size, sampler=sampler, generator=torch.Generator(), **kwargs)
        self._iter_epoch: int | None = None  # the epoch being read, and how many of its batches were yielded
        self._done = 0
        self._current: object | None = None  # the iteration those describe
        self.last_idx: torch.Tensor | None = None  # dataset indices of the batch yielded last (learn.idx)

    def __iter__(self) -> Iterator[Any]:
        sampler, token = self.sampler, object()
        self._iter_epoch, self._done, self._current = sampler.epoch, sampler.start // self.batch_size, token
        self.generator.manual_seed((sampler.seed + sampler.epoch) ^ 0x5DEECE66D)  # the workers' base seed
        order, done, bs = sampler.order(sampler.epoch), self._done, self.batch_size  # the order the sampler yields
        try:
            for batch in super().__iter__():
                if self._current is token: self._done += 1
                self.last_idx, done = order[done * bs:(done + 1) * bs], done + 1
                yield batch
        finally:
            # Finished, or dropped after a few batches: the sampler has moved on, so the position is the next
            # epoch's start (show_batch and channel_stats read through position_kept, which puts it back).
            if self._current is token: self._iter_epoch = self._current = None

    def one_batch(self) -> Any:
        """The first batch of the next epoch, leaving the loader's position as it is (show_batch)."""
        return one_batch(self)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iteration yield epoch `epoch` (the DistributedSampler convention)."""
        self.sampler.set_epoch(epoch)

    def state_dict(self) -> dict:
        """The position between batches: seed, the epoch being read and how many of its batches were yielded."""
        sampler = self.sampler
        if self._iter_epoch is not None and self._done < len(self):
            epoch, done = self._iter_epoch, self._done
        else:
            epoch, done = sampler.epoch, sampler.start // self.batch_size
        return {'seed': sampler.seed, 'epoch': epoch, 'batches_done': done, 'n_items': sampler.n_items,
                'batch_size': self.batch_size, 'shuffle': sampler.shuffle}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state`: the next iteration yields the rest of its epoch, without loading the batches done."""
        sampler = self.sampler
        done = checked_batches_done(self, state, n_items=sampler.n_items, shuffle=sampler.shuffle)
        sampler.seed, sampler.epoch, sampler.start = int(state['seed']), int(state['epoch']), done * self.batch_size
        if done == len(self): sampler.epoch, sampler.start = sampler.epoch + 1, 0
        self._iter_epoch, self._done = None, 0

    def settings(self) -> dict:
        """The DataLoader keyword arguments this loader was built with (workers, collate_fn, pinning...)."""
        accepted = inspect.signature(DataLoader).parameters
        found = {name: getattr(self, name) for name in LOADER_SETTINGS
                 if name in accepted and name != 'generator' and hasattr(self, name)}
        if not found.get('num_workers'): found.pop('prefetch_factor', None)
        return found

    def shard(self, rank: int, world_size: int, seed: int | None = None) -> ResumableLoader:
        """Rank `rank`'s share of each epoch (padded), at the same position; reseeded with `seed` when given."""
        if self.sampler.world_size != 1:
            raise ValueError("this ResumableLoader is a shard already; shard the full loader")
        sampler = self.sampler
        loader = type(self)(self.dataset, batch_size=self.batch_size, shuffle=sampler.shuffle,
                            seed=sampler.seed if seed is None else seed, rank=rank, world_size=world_size,
                            **self.settings())
        loader.sampler.epoch, loader.sampler.start = sampler.epoch, sampler.start
        return loader
