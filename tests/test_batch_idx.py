"""`learn.idx`: the dataset indices of the items of every batch (issue 21, item 1).

Each test reads the batch back from the dataset through `learn.idx` (`x[idx]` must be the batch the model got),
for the in-memory loader and the resumable one, shuffled or not, training and validation, a DDP shard, and the
epoch a mid-epoch resume continues; a plain DataLoader gives None and the callbacks that need it refuse it.
"""
import os

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from helpers import forbid_host_reads, free_ports, mlp, run_two_processes
from minilearn.callback import require_idx
from minilearn.callbacks.checkpoint import CheckpointCallback
from minilearn.callbacks.device import DeviceCallback
from minilearn.callbacks.distributed import shard_loader
from minilearn.data.core import DataBunch, Dataset, TensorLoader
from minilearn.data.sampler import ResumableLoader
from minilearn.learner import Callback, Learner

N_TRAIN, N_VALID = 40, 12


def tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N_TRAIN + N_VALID, 8, generator=g)
    return x, (x @ torch.randn(8, 3, generator=g)).argmax(1)


def tensor_data(shuffle=True, bs=8, seed=3):
    x, y = tensors()
    return DataBunch.from_tensors(x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:], bs=bs, shuffle=shuffle, seed=seed)


def dataset_data(bs=8, seed=3, **kwargs):
    x, y = tensors()
    return DataBunch.from_datasets(Dataset(x[:N_TRAIN], y[:N_TRAIN]), Dataset(x[N_TRAIN:], y[N_TRAIN:]), bs=bs,
                                   seed=seed, **kwargs)


class IdxProbe(Callback):
    """Per batch: (in_train, epoch, iter, idx, xb, yb) as the batch reaches `begin_batch`."""
    _order = -100  # before any callback changes the batch

    def __init__(self): self.seen = []

    def begin_batch(self):
        idx = self.run.idx
        self.seen.append((self.run.in_train, self.run.epoch, self.run.iter,
                          None if idx is None else idx.clone(), self.run.xb.clone(), self.run.yb.clone()))


def fit(data, epochs=2, cbs=(), **kwargs):
    torch.manual_seed(0)
    learn = Learner(mlp(), data, F.cross_entropy, lr=0.1)
    probe = IdxProbe()
    learn.fit(epochs, cbs=[probe, *cbs], **kwargs)
    return learn, probe.seen


def check_batches_name_their_items(seen, data, bs, shuffle):
    x_train, y_train = data.train_ds.x, data.train_ds.y
    x_valid, y_valid = data.valid_ds.x, data.valid_ds.y
    epochs = sorted({e for _, e, *_ in seen})
    for epoch in epochs:
        for in_train, x, y, n in ((True, x_train, y_train, N_TRAIN), (False, x_valid, y_valid, N_VALID)):
            batches = [(i, idx, xb, yb) for t, e, i, idx, xb, yb in seen if t == in_train and e == epoch]
            for i, idx, xb, yb in batches:
                assert idx.dtype == torch.long and idx.shape == (len(xb),) and idx.device == xb.device
                assert torch.equal(x[idx], xb) and torch.equal(y[idx], yb)
            order = torch.cat([idx for _, idx, _, _ in batches])
            assert sorted(order.tolist()) == list(range(n))  # every item once per pass
            if not (shuffle and in_train): assert order.tolist() == list(range(n))
    if shuffle:  # each epoch its own order
        firsts = [torch.cat([idx for t, e, _, idx, _, _ in seen if t and e == epoch]) for epoch in epochs]
        assert not torch.equal(firsts[0], firsts[1])


@pytest.mark.parametrize('shuffle', [True, False])
def test_tensor_loader_names_the_items_of_training_and_validation_batches(shuffle):
    data = tensor_data(shuffle)
    learn, seen = fit(data)
    check_batches_name_their_items(seen, data, 8, shuffle)
    assert isinstance(learn.idx, torch.Tensor)  # the last batch's, kept for inspection like xb


def test_resumable_loader_names_the_items_of_training_batches_and_a_plain_validation_loader_gives_none():
    data = dataset_data()
    _, seen = fit(data)
    x, y = data.train_ds.x, data.train_ds.y
    train = [s for s in seen if s[0]]
    assert len(train) == 2 * 5
    for _, _, _, idx, xb, yb in train:
        assert idx.dtype == torch.long and idx.device == xb.device and torch.equal(x[idx], xb) and torch.equal(y[idx], yb)
    epoch0 = torch.cat([s[3] for s in train if s[1] == 0])
    assert sorted(epoch0.tolist()) == list(range(N_TRAIN)) and epoch0.tolist() != list(range(N_TRAIN))
    assert all(s[3] is None for s in seen if not s[0])  # from_datasets validates with a plain DataLoader


def test_an_unshuffled_resumable_loader_and_worker_processes():
    x, y = tensors()
    for kwargs in ({'shuffle': False}, {'shuffle': True, 'num_workers': 2}):
        dl = ResumableLoader(Dataset(x, y), batch_size=7, seed=5, drop_last=True, **kwargs)
        data = DataBunch(dl, None)
        _, seen = fit(data, epochs=1)
        order = torch.cat([s[3] for s in seen])
        assert len(seen) == len(x) // 7 and len(order) == len(x) // 7 * 7
        for _, _, _, idx, xb, yb in seen: assert torch.equal(x[idx], xb) and torch.equal(y[idx], yb)
        if not kwargs['shuffle']: assert order.tolist() == list(range(len(order)))


def test_a_plain_dataloader_gives_none_and_a_callback_that_needs_idx_refuses_it_before_any_step():
    x, y = tensors()
    data = DataBunch(DataLoader(Dataset(x, y), batch_size=8, shuffle=True), None)
    _, seen = fit(data, epochs=1)
    assert seen and all(s[3] is None for s in seen)

    class NeedsIdx(Callback):
        def begin_fit(self): require_idx(self)

    torch.manual_seed(0)
    learn = Learner(mlp(), data, F.cross_entropy, lr=0.1)
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    with pytest.raises(ValueError, match=r"NeedsIdx.*learn\.idx.*DataLoader.*DataBunch\.from_tensors.*from_datasets"):
        learn.fit(1, cbs=[NeedsIdx()])
    assert all(torch.equal(v, before[k]) for k, v in learn.model.state_dict().items())
    require_idx(Learner(mlp(), tensor_data(), F.cross_entropy).cbs[0])  # a loader that can tell passes


def test_idx_follows_the_batch_to_the_device():
    data = dataset_data()
    _, seen = fit(data, epochs=1, cbs=[DeviceCallback('cpu')])  # a no-op move on the CPU: the same objects
    assert all(s[3] is not None for s in seen if s[0])
    if torch.cuda.is_available():
        class OnDevice(Callback):
            def __init__(self): self.devices = set()
            def begin_batch(self): self.devices.add((self.run.idx.device.type, self.run.xb.device.type))

        probe = OnDevice()
        torch.manual_seed(0)
        Learner(mlp(), data, F.cross_entropy, lr=0.1).fit(1, cbs=[DeviceCallback('cuda'), probe])
        assert probe.devices == {('cuda', 'cuda')}


def test_ddp_shards_name_items_of_the_full_dataset():
    x, y = tensors()
    for full in (TensorLoader(x, y, bs=6, shuffle=True, seed=1),
                 ResumableLoader(Dataset(x, y), batch_size=6, shuffle=True, seed=1)):
        for train in (True, False):
            if not train and isinstance(full, ResumableLoader): continue  # validation shards are plain DataLoaders
            if not train: full = TensorLoader(x, y, bs=6, shuffle=False)
            seen = []
            for rank in range(2):
                shard = shard_loader(full, rank, 2, train=train, seed=1)
                for xb, yb in shard:
                    idx = shard.last_idx
                    assert torch.equal(x[idx], xb) and torch.equal(y[idx], yb)
                    seen.append(idx)
            assert sorted(torch.cat(seen).tolist()) == list(range(len(x)))  # 52 items: no padding needed


class Crash(Callback):
    def after_pred(self):
        if self.run.in_train and (self.run.epoch, self.run.iter) == (1, 3): raise RuntimeError('node lost')


@pytest.mark.parametrize('make_data', [tensor_data, dataset_data])
def test_the_epoch_a_mid_epoch_resume_continues_names_the_same_items(make_data, tmp_path):
    _, straight = fit(make_data(), epochs=3)
    ckpt = CheckpointCallback(tmp_path / 'ckpt', every_n_batches=2, signals=None)
    with pytest.raises(RuntimeError, match='node lost'):
        fit(make_data(), epochs=3, cbs=[ckpt, Crash()])
    learn = Learner(mlp(), make_data(seed=11), F.cross_entropy, lr=0.1)  # the checkpoint's seed replaces 11
    probe = IdxProbe()
    learn.fit(3, cbs=[probe], resume=ckpt.path)
    resumed = [s for s in probe.seen if s[0]]
    assert (resumed[0][1], resumed[0][2]) == (1, 3)  # checkpoints after 8 of the 5-batch epochs' batches
    by_batch = {(e, i): (idx, xb) for t, e, i, idx, xb, _ in straight if t}
    for _, e, i, idx, xb, _ in resumed:
        assert torch.equal(idx, by_batch[e, i][0]) and torch.equal(xb, by_batch[e, i][1])
    assert len(resumed) == 2 + 5


class NoReadWhileLoading(Callback):
    """Host reads raise from the end of a batch to the start of the next: the loader's `next` and `learn.idx`."""
    _order = -100

    def __init__(self, monkeypatch): self.monkeypatch, self.windows = monkeypatch, 0

    def after_batch(self):
        if self.run.iter < self.run.iters - 1: forbid_host_reads(self.monkeypatch)

    def begin_batch(self):
        self.windows += self.run.iter > 0
        self.monkeypatch.undo()
        assert self.run.idx is not None


@pytest.mark.parametrize('make_data', [tensor_data, dataset_data])
def test_reading_idx_costs_no_host_read(make_data, monkeypatch):
    data = make_data(bs=4)  # 10 training batches; validation: 2 batches of TensorLoader
    if make_data is dataset_data: data.valid_dl = None  # its plain validation loader has no idx
    probe = NoReadWhileLoading(monkeypatch)
    fit(data, epochs=2, cbs=[probe])
    assert probe.windows == (2 * (9 + 1) if make_data is tensor_data else 2 * 9)
    with pytest.raises(AssertionError, match='host read'):  # the window does catch a read
        forbid_host_reads(monkeypatch)
        try:
            torch.ones(1).item()
        finally:
            monkeypatch.undo()


def _ddp_worker(rank, ports, out_dir):
    os.environ.update(MASTER_ADDR='127.0.0.1', RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2')
    torch.set_num_threads(1)
    result = {}
    for port, (name, make_data) in zip(ports, (('tensors', tensor_data), ('datasets', dataset_data))):
        # A group of its own for each: on the port just freed, rank 1 could reach the store rank 0 was closing
        # ("Failed to recv, got 0 bytes").
        os.environ['MASTER_PORT'] = str(port)
        torch.manual_seed(0)
        learn = Learner(mlp(), make_data(), F.cross_entropy, lr=0.1)
        probe = IdxProbe()
        with learn.distrib_ctx():
            learn.fit(1, cbs=[probe])
        result[name] = probe.seen
    torch.save(result, os.path.join(out_dir, f'rank{rank}.pt'))


@pytest.mark.slow
def test_under_distributed_callback_each_rank_names_its_items_in_the_full_dataset(tmp_path):
    torch.optim.SGD(mlp().parameters(), lr=0.1)  # import what building an optimizer imports before forking
    run_two_processes(_ddp_worker, (free_ports(2), str(tmp_path)), timeout=120)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=False) for r in range(2)]
    x, y = tensors()
    for name in ('tensors', 'datasets'):
        for in_train, xs, ys, n in ((True, x[:N_TRAIN], y[:N_TRAIN], N_TRAIN), (False, x[N_TRAIN:], y[N_TRAIN:], N_VALID)):
            items = []
            for seen in (r[name] for r in ranks):
                for t, _, _, idx, xb, yb in seen:
                    if t != in_train: continue
                    if idx is None:
                        assert name == 'datasets' and not in_train  # a plain DataLoader's shard
                        continue
                    assert torch.equal(xs[idx], xb) and torch.equal(ys[idx], yb)
                    items.append(idx)
            if items: assert sorted(torch.cat(items).tolist()) == list(range(n))  # the ranks split the dataset
            else: assert name == 'datasets' and not in_train
