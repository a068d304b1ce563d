"""The fast data path (issue 15): from_tensors (TensorLoader) and decode once (ChannelsLast: test_device.py, batch
augmentation: test_augment.py)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from helpers import BatchLog, images, quiet_fit, small_cnn
from minilearn import (CancelTrainException, DataBunch, Dataset, Learner, TensorLoader, make_rgb, label_image_folder,
                       save_shapes_folder, shard_loader, to_byte_tensor, to_float_tensor)
from minilearn.callback import Callback
from minilearn.callbacks.transforms import channel_stats


# ---- TensorLoader ---------------------------------------------------------------------------------------
def test_batches_equal_a_hand_indexed_reference_for_a_fixed_seed():
    x, y = images(37)
    data = DataBunch.from_tensors(x, y, x[:10], y[:10], bs=8, seed=123)
    dl = data.train_dl
    for epoch in range(2):
        perm = torch.randperm(37, generator=torch.Generator().manual_seed(123 + epoch))
        got = list(dl)
        assert len(got) == len(dl) == 5
        for b, (xb, yb) in enumerate(got):
            idx = perm[b * 8:(b + 1) * 8]
            expected = torch.stack([to_float_tensor(x[i]) for i in idx])  # the item transform, one by one
            assert xb.dtype == torch.float32 and torch.equal(xb, expected) and torch.equal(yb, y[idx])
    valid = list(data.valid_dl)  # in order, at twice the batch size
    assert [len(b[1]) for b in valid] == [10] and torch.equal(valid[0][1], y[:10])
    assert data.c_in == 3 and len(data.train_ds) == 37 and len(data.valid_ds) == 10


def test_every_item_once_per_epoch_and_a_new_order_each_epoch():
    x = torch.arange(50.).view(50, 1)
    dl = TensorLoader(x, torch.arange(50), bs=7, shuffle=True, seed=5)
    orders = [torch.cat([yb for _, yb in dl]) for _ in range(3)]
    for order in orders: assert sorted(order.tolist()) == list(range(50))
    assert not torch.equal(orders[0], orders[1]) and not torch.equal(orders[1], orders[2])


def test_the_order_of_an_epoch_does_not_depend_on_how_much_of_earlier_epochs_was_read():
    x = torch.arange(30.).view(30, 1)
    full = TensorLoader(x, torch.arange(30), bs=4, shuffle=True, seed=9)
    partial = TensorLoader(x, torch.arange(30), bs=4, shuffle=True, seed=9)
    list(full)
    next(iter(partial))  # epoch 0 abandoned after one batch
    assert torch.equal(torch.cat([y for _, y in full]), torch.cat([y for _, y in partial]))
    partial.set_epoch(0)
    assert torch.equal(torch.cat([y for _, y in partial]), full.order(0))


def test_show_batch_leaves_the_training_order_alone():
    x, y = images(20)
    data = DataBunch.from_tensors(x, y, bs=4, seed=1)
    state = data.train_dl.state_dict()
    first = data.train_dl.one_batch()
    data.show_batch(n=4)
    assert data.train_dl.state_dict() == state
    xb, yb = next(iter(data.train_dl))
    assert data.train_dl.epoch == 1 and torch.equal(yb, first[1]) and torch.equal(yb, y[data.train_dl.order(0)[:4]])


def test_show_batch_and_channel_stats_leave_a_resumable_loader_and_the_global_generator_alone():
    x, y = images(20)
    data = DataBunch.from_datasets(Dataset(x, y), Dataset(x, y), bs=4, seed=1)
    state, rng = data.train_dl.state_dict(), torch.get_rng_state()
    first = data.train_dl.one_batch()
    data.show_batch(n=4)
    mean, std = channel_stats(data.train_dl)
    assert data.train_dl.state_dict() == state and torch.equal(torch.get_rng_state(), rng)
    assert torch.allclose(mean, x.double().mean((0, 2, 3)).float())  # the whole set, not one batch
    xb, yb = next(iter(data.train_dl))  # epoch 0 is still the next one
    assert torch.equal(yb, first[1]) and torch.equal(yb, y[data.train_dl.sampler.order(0)[:4]])
    plain = DataBunch(DataLoader(Dataset(x, y), batch_size=4, shuffle=True), None)
    rng = torch.get_rng_state()
    plain.show_batch(n=4)
    channel_stats(plain.train_dl, n_batches=2)
    assert torch.equal(torch.get_rng_state(), rng)  # a shuffling DataLoader's draws are undone


def test_the_default_seed_comes_from_torch_global_generator():
    x, y = images(20)
    torch.manual_seed(3)
    a = DataBunch.from_tensors(x, y, bs=4).train_dl
    torch.manual_seed(3)
    b = DataBunch.from_tensors(x, y, bs=4).train_dl
    torch.manual_seed(4)
    c = DataBunch.from_tensors(x, y, bs=4).train_dl
    assert a.seed == b.seed != c.seed and torch.equal(a.order(0), b.order(0))


def test_drop_last():
    x = torch.arange(10.).view(10, 1)
    keep = TensorLoader(x, torch.arange(10), bs=4)
    drop = TensorLoader(x, torch.arange(10), bs=4, drop_last=True)
    assert len(keep) == 3 and [len(y) for _, y in keep] == [4, 4, 2]
    assert len(drop) == 2 and [len(y) for _, y in drop] == [4, 4]
    with pytest.raises(ValueError, match='training loader is empty.*lower bs'):
        DataBunch.from_tensors(x, torch.arange(10), bs=16, drop_last=True)


def test_bad_input_is_named():
    x, y = images(10)
    with pytest.raises(ValueError, match='same length'): TensorLoader(x, y[:5])
    with pytest.raises(TypeError, match='needs tensors'): TensorLoader(x.tolist(), y)
    with pytest.raises(ValueError, match='positive int'): TensorLoader(x, y, bs=0)
    with pytest.raises(ValueError, match='both x_valid and y_valid'): DataBunch.from_tensors(x, y, x_valid=x)


def test_resume_mid_way_through_a_fit_gives_identical_batches():
    x, y = images(40)

    def learner(seed):
        torch.manual_seed(0)
        return Learner(small_cnn(), DataBunch.from_tensors(x, y, x[:8], y[:8], bs=6, seed=seed), F.cross_entropy)

    class StopAt(Callback):
        def after_batch(self):
            if self.in_train and self.epoch == 1 and self.iter == 2:
                self.state = self.data.train_dl.state_dict()  # between batches: 3 of epoch 1 done
                raise CancelTrainException()

    uninterrupted, log = learner(seed=11), BatchLog()
    quiet_fit(uninterrupted, 3, cbs=[log])
    first, log_a, stop = learner(seed=11), BatchLog(), StopAt()
    quiet_fit(first, 3, cbs=[log_a, stop])
    assert stop.state['epoch'] == 1 and stop.state['batches_done'] == 3
    resumed, log_b = learner(seed=999), BatchLog()  # another seed: the state brings the right one
    resumed.data.train_dl.load_state_dict(stop.state)
    quiet_fit(resumed, 3, cbs=[log_b], start_epoch=1)
    n_batches = len(uninterrupted.data.train_dl)
    assert len(log_a.batches) == n_batches + 3 and len(log_b.batches) == n_batches - 3 + n_batches
    for (_, xa, ya), (_, xb, yb) in zip(log.batches, log_a.batches + log_b.batches, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_state_dict_between_epochs_and_mismatched_states():
    dl = TensorLoader(torch.zeros(10, 1), torch.arange(10), bs=3, shuffle=True, seed=1)
    assert dl.state_dict() == {'seed': 1, 'epoch': 0, 'batches_done': 0, 'n_items': 10, 'batch_size': 3,
                               'shuffle': True}
    list(dl)
    assert dl.state_dict()['epoch'] == 1 and dl.state_dict()['batches_done'] == 0
    other = TensorLoader(torch.zeros(12, 1), torch.arange(12), bs=3, shuffle=True)
    with pytest.raises(ValueError, match='n_items=10.*n_items=12'): other.load_state_dict(dl.state_dict())
    with pytest.raises(KeyError, match='batches_done'): other.load_state_dict({'seed': 1, 'epoch': 0})
    fresh = TensorLoader(torch.zeros(10, 1), torch.arange(10), bs=3, shuffle=True, seed=7)
    fresh.load_state_dict({**dl.state_dict(), 'epoch': 4, 'batches_done': 4})  # epoch 4 complete: epoch 5 next
    assert torch.equal(torch.cat([y for _, y in fresh]), dl.order(5))


@pytest.mark.parametrize('n, world_size', [(20, 2), (23, 3), (5, 4)])
def test_ddp_shards_partition_the_data(n, world_size):
    dl = TensorLoader(torch.arange(float(n)).view(n, 1), torch.arange(n), bs=3, shuffle=True, seed=2)
    valid = TensorLoader(torch.arange(float(n)).view(n, 1), torch.arange(n), bs=3)
    for epoch in (0, 1):
        shards = [shard_loader(dl, r, world_size, train=True, seed=7) for r in range(world_size)]
        for s in shards: s.set_epoch(epoch)
        seen = [torch.cat([y for _, y in s]) for s in shards]
        assert len({len(s) for s in shards}) == 1 and len({len(v) for v in seen}) == 1  # same steps on every rank
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(7 + epoch))
        interleaved = torch.stack(seen, 1).flatten()  # rank r holds items r, r + w, ... of the epoch's order
        padded = torch.cat([perm] * world_size)[:len(interleaved)]
        assert torch.equal(interleaved, padded) and set(interleaved.tolist()) == set(range(n))
    vshards = [torch.cat([y for _, y in shard_loader(valid, r, world_size, train=False)] or [torch.tensor([])])
               for r in range(world_size)]
    assert sorted(torch.cat(vshards).tolist()) == list(range(n))  # every validation item exactly once
    with pytest.raises(ValueError, match='without shuffling'): shard_loader(dl, 0, 2, train=False)


def test_device_resident_data_and_predictions_in_dataset_order():
    x, y = images(30)
    data = DataBunch.from_tensors(x, y, x[:10], y[:10], bs=8, device='cpu', seed=0)
    assert data.train_dl.x.dtype == torch.uint8  # stays bytes in memory; floats per batch
    torch.manual_seed(0)
    learn = Learner(small_cnn(), data, F.cross_entropy)
    preds, targets = learn.get_preds(dl=data.train_dl)  # shuffled loader: back in dataset order
    assert torch.equal(targets, y)
    with torch.no_grad(): expected = learn.model(x.float() / 255)
    torch.testing.assert_close(preds, expected.softmax(1))
    assert 'Conv2d' in learn.summary()


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA: a device-resident dataset')
def test_cuda_resident_data():
    x, y = images(30)
    data = DataBunch.from_tensors(x, y, x[:10], y[:10], bs=8, device='cuda', seed=0)
    xb, yb = next(iter(data.train_dl))
    assert xb.is_cuda and yb.is_cuda and data.train_dl.x.dtype == torch.uint8
    torch.testing.assert_close(xb.cpu(), x[data.train_dl.order(0)[:8]].float() / 255)


# ---- decode once ----------------------------------------------------------------------------------------
@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return save_shapes_folder(tmp_path_factory.mktemp('shapes'), n_per_class=3, n_valid_per_class=1, size=12,
                              n_classes=4)


def test_to_tensors_decodes_every_item_once_as_uint8(folder):
    sd = label_image_folder(folder, tfms=[make_rgb, to_byte_tensor, to_float_tensor], valid_name='val')
    (x, y), (xv, yv) = sd.to_tensors(progress=False)
    assert x.dtype == torch.uint8 and x.shape == (12, 3, 12, 12) and x.is_contiguous(memory_format=torch.channels_last)
    for i in range(len(sd.train)):
        xi, yi = sd.train[i]
        assert torch.equal(x[i].float() / 255, xi) and y[i] == yi
    assert torch.equal(yv, torch.tensor([sd.valid[i][1] for i in range(len(sd.valid))]))


def test_to_tensors_shows_a_progress_bar_only_when_asked(folder, capsys):
    sd = label_image_folder(folder, tfms=[make_rgb, to_byte_tensor, to_float_tensor], valid_name='val')
    sd.train.to_tensors(progress=False)
    assert capsys.readouterr().out == ''
    sd.train.to_tensors(bs=4, progress=True)
    assert '3/3' in capsys.readouterr().out  # three batches of 4 decoded


def test_to_databunch_cache_trains_from_memory_with_the_same_items(folder):
    sd = label_image_folder(folder, tfms=[make_rgb, to_byte_tensor, to_float_tensor], valid_name='val')
    data = sd.to_databunch(4, c_in=3, cache=True, progress=False, generator=torch.Generator().manual_seed(0))
    assert isinstance(data.train_dl, TensorLoader) and data.vocab == sd.train.proc_y.vocab and data.c_out == 4
    ref = DataLoader(sd.valid, batch_size=8)
    for (xa, ya), (xb, yb) in zip(data.valid_dl, ref, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    with pytest.raises(TypeError, match='pin_memory.*cache=False'): sd.to_databunch(4, cache=True, pin_memory=True)


def test_to_tensors_names_items_of_different_shapes(tmp_path):
    from PIL import Image
    for cls, size in (('a', 8), ('b', 10)):
        for split in ('train', 'val'):
            (tmp_path / split / cls).mkdir(parents=True)
            Image.new('RGB', (size, size)).save(tmp_path / split / cls / '0.png')
    sd = label_image_folder(tmp_path, tfms=[make_rgb, to_byte_tensor], valid_name='val')
    with pytest.raises(ValueError, match='different shapes.*ResizeFixed'): sd.train.to_tensors(progress=False)
    with pytest.raises(ValueError, match='different shapes.*ResizeFixed'):  # in different batches
        sd.train.to_tensors(bs=1, progress=False)
