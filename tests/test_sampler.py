"""minilearn.data.sampler: the epoch orders (epoch_order, ResumableSampler), ResumableLoader's position
(state_dict/load_state_dict, shards, last_idx) and reading a loader without moving it (one_batch)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from helpers import batches
from minilearn import Callback, DataBunch, Learner
from minilearn.data.core import Dataset, get_dls
from minilearn.data.sampler import ResumableLoader, ResumableSampler, epoch_order, one_batch


class Counted(Dataset):
    def __init__(self, n):
        super().__init__(torch.arange(n), torch.arange(n))
        self.reads = 0

    def __getitem__(self, i):
        self.reads += 1
        return super().__getitem__(i)


def test_loader_started_at_batch_k_continues_the_uninterrupted_order():
    ds = Counted(22)
    straight = ResumableLoader(ds, batch_size=4, seed=7)
    epochs = [batches(straight) for _ in range(3)]
    assert len(straight) == 6 and all(sorted(sum(e, [])) == list(range(22)) for e in epochs)
    assert epochs[0] != epochs[1]
    stopped = ResumableLoader(ds, batch_size=4, seed=7)
    batches(stopped)
    it = iter(stopped)
    head = [next(it)[0].tolist() for _ in range(2)]
    state = stopped.state_dict()
    assert (state['epoch'], state['batches_done'], state['seed']) == (1, 2, 7) and head == epochs[1][:2]
    resumed = ResumableLoader(ds, batch_size=4, seed=123)
    resumed.load_state_dict(state)
    assert len(resumed) == 6
    ds.reads = 0
    rest = batches(resumed)
    assert rest == epochs[1][2:] and ds.reads == 22 - 8  # the 2 batches done are skipped, not loaded
    assert batches(resumed) == epochs[2]


def test_epoch_orders_depend_on_the_seed_and_epoch_only():
    sampler = ResumableSampler(10, seed=3)
    expected = torch.randperm(10, generator=torch.Generator().manual_seed(3 + 4)).tolist()
    sampler.set_epoch(4)
    assert list(sampler) == expected and sampler.epoch == 5
    dl = ResumableLoader(Counted(10), batch_size=3, seed=3)
    next(iter(dl))  # a partial epoch (show_batch) does not change the next one's order
    assert sum(batches(dl), []) == torch.randperm(10, generator=torch.Generator().manual_seed(3 + 1)).tolist()
    torch.manual_seed(0)
    a = ResumableLoader(Counted(10), batch_size=3)
    torch.manual_seed(0)
    b = ResumableLoader(Counted(10), batch_size=3)
    rng = torch.get_rng_state()
    assert batches(a) == batches(b) and torch.equal(torch.get_rng_state(), rng)  # iterating draws nothing global


def test_an_epoch_end_state_starts_the_next_epoch_and_bad_states_are_named():
    dl = ResumableLoader(Counted(8), batch_size=4, seed=1)
    first = batches(dl)
    state = dl.state_dict()
    assert (state['epoch'], state['batches_done']) == (1, 0)
    second = batches(dl)
    other = ResumableLoader(Counted(8), batch_size=4, seed=1)
    other.load_state_dict({**state, 'epoch': 0, 'batches_done': 2})  # all of epoch 0 done: epoch 1 is next
    assert batches(other) == second != first
    with pytest.raises(ValueError, match='batch_size=4, this loader has batch_size=2'):
        ResumableLoader(Counted(8), batch_size=2).load_state_dict(state)
    with pytest.raises(KeyError, match='batches_done'):
        dl.load_state_dict({'seed': 1, 'epoch': 0})
    with pytest.raises(ValueError, match='outside'):
        dl.load_state_dict({**state, 'batches_done': 3})


def test_each_rank_resumes_its_own_shard():
    ds = Counted(21)
    full = ResumableLoader(ds, batch_size=3, seed=2)
    shards = [full.shard(r, 2) for r in range(2)]
    epoch0 = [batches(s) for s in shards]
    assert all(len(s) == 4 for s in shards)  # 11 items per rank (padded), 4 batches
    assert sorted(sum(sum(epoch0, []), [])) == sorted(list(range(21)) + [torch.randperm(
        21, generator=torch.Generator().manual_seed(2)).tolist()[0]])
    uninterrupted = [batches(s) for s in shards]  # epoch 1
    stopped = [full.shard(r, 2) for r in range(2)]
    for s in stopped: batches(s)
    states = []
    for s in stopped:
        it = iter(s)
        next(it)
        states.append(s.state_dict())
    assert states[0] == states[1]  # what rank 0 writes fits every rank
    for r in range(2):
        restarted = ResumableLoader(ds, batch_size=3, seed=99)
        restarted.load_state_dict(states[0])
        assert batches(restarted.shard(r, 2)) == uninterrupted[r][1:]


@pytest.mark.parametrize('n, world_size', [(10, 1), (20, 2), (23, 3), (5, 4)])
def test_shards_equal_torch_distributed_sampler(n, world_size):
    ds = Dataset(torch.arange(n), torch.arange(n))
    for epoch in (0, 3):
        for rank in range(world_size):
            reference = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=True, seed=11)
            reference.set_epoch(epoch)
            sampler = ResumableSampler(n, seed=11, rank=rank, world_size=world_size)
            sampler.set_epoch(epoch)
            expected = list(reference)
            assert len(sampler) == len(reference)
            assert epoch_order(n, 11, epoch, True, rank, world_size, pad=True).tolist() == expected
            assert list(sampler) == expected


def test_last_idx_names_the_items_of_the_batch_yielded_last():
    ds = Counted(11)  # item i is i: the batch shows which items it holds
    dl = ResumableLoader(ds, batch_size=4, seed=5)
    for xb, _ in dl:
        assert torch.equal(dl.last_idx, xb)
    resumed = ResumableLoader(ds, batch_size=4, seed=0)
    state = {**dl.state_dict(), 'batches_done': 1}  # epoch 1, its first batch done
    resumed.load_state_dict(state)
    xb, _ = next(iter(resumed))
    assert torch.equal(resumed.last_idx, xb) and torch.equal(xb, epoch_order(11, 5, state['epoch'], True)[4:8])


def test_one_batch_of_a_plain_shuffling_loader_is_its_next_first_batch_and_draws_nothing():
    ds = Dataset(torch.arange(20), torch.arange(20))
    dl = DataLoader(ds, batch_size=4, shuffle=True)
    rng = torch.get_rng_state()
    xb, _ = one_batch(dl)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(next(iter(dl))[0], xb)


def test_bad_arguments_are_named():
    ds = Dataset(torch.arange(8), torch.arange(8))
    with pytest.raises(ValueError, match=r'rank must be an int in \[0, world_size=2\), got 2'):
        ResumableSampler(8, rank=2, world_size=2)
    with pytest.raises(ValueError, match='n_items must be an int >= 0, got -1'): ResumableSampler(-1)
    with pytest.raises(ValueError, match='batch_size must be an int >= 1, got 0'): ResumableLoader(ds, batch_size=0)
    with pytest.raises(ValueError, match='makes its own sampler.*custom `sampler` use a DataLoader'):
        ResumableLoader(ds, sampler=range(8))
    with pytest.raises(ValueError, match='a shard already'):
        ResumableLoader(ds, batch_size=2).shard(0, 2).shard(0, 2)


def test_a_shard_keeps_the_loader_settings():
    ds = Dataset(torch.arange(8), torch.arange(8))
    collate = torch.utils.data.default_collate
    dl = ResumableLoader(ds, batch_size=3, seed=1, drop_last=True, collate_fn=collate)
    shard = dl.shard(1, 2)
    assert shard.drop_last and shard.collate_fn is collate and shard.sampler.seed == 1 and len(shard) == 1


def test_a_second_learner_reads_the_next_epochs_unless_the_loader_is_set_back_to_epoch_0():
    """What the README and the 10b notebook tell a user who wants several learners to see the same batches."""
    class SeenItems(Callback):
        def begin_fit(self): self.items = []
        def begin_batch(self):
            if self.in_train: self.items.append(self.run.idx.tolist())

    ds = Dataset(torch.randn(40, 3), torch.randint(0, 2, (40,)))
    generator = torch.Generator().manual_seed(0)
    data = DataBunch(*get_dls(ds, None, bs=8, generator=generator), c_in=3, c_out=2)

    def items_seen(before=None) -> list:
        if before: before()
        seen = SeenItems()
        Learner(nn.Linear(3, 2), data, F.cross_entropy, cbs=seen).fit(2)
        return seen.items

    first = items_seen()
    assert items_seen(lambda: generator.manual_seed(0)) != first  # the generator only drew the loader's seed
    assert items_seen(lambda: data.train_dl.set_epoch(0)) == first
