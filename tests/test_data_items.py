"""Item lists, splitting, labelling and the course-v3 10b pipeline on a generated image folder."""
import pickle
from functools import partial
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minilearn.data.core import DataBunch
from minilearn.data.sampler import ResumableSampler
from minilearn.data.items import (CategoryProcessor, ImageList, ItemList, LabeledData, Processor, SplitData,
                                  get_files, grandparent_splitter, image_extensions, label_by_func,
                                  label_image_folder, parent_labeler, random_splitter)
from minilearn.data.transforms import ResizeFixed, make_rgb, to_byte_tensor, to_float_tensor
from minilearn.learner import Learner

CLASSES = ('bird', 'cat', 'dog')
COLORS = {'bird': (0, 0, 230), 'cat': (230, 0, 0), 'dog': (0, 230, 0)}
N_TRAIN, N_VALID = 4, 2  # per class


def _save(path: Path, cls: str, i: int, mode: str = 'RGB') -> None:
    rng = np.random.default_rng(i)
    arr = np.clip(np.array(COLORS[cls]) + rng.integers(0, 25, (10 + i, 12, 3)), 0, 255).astype(np.uint8)
    im = PIL.Image.fromarray(arr, 'RGB')
    path.parent.mkdir(parents=True, exist_ok=True)
    (im.convert(mode) if mode != 'RGB' else im).save(path)


@pytest.fixture
def tree(tmp_path):
    """train/<cls>/*.jpg (mixed modes), val/<cls>/*.png, plus files every step must ignore or drop."""
    modes = ['RGB', 'L', 'RGB', 'P']
    for cls in CLASSES:
        for i in range(N_TRAIN): _save(tmp_path / 'train' / cls / f'{i}.jpg', cls, i, 'L' if modes[i] == 'L' else 'RGB')
        for i in range(N_VALID): _save(tmp_path / 'val' / cls / f'{i}.png', cls, i, modes[i + 2])
    _save(tmp_path / 'test' / 'cat' / '0.jpg', 'cat', 0)  # neither train nor val: dropped by the splitter
    (tmp_path / 'train' / 'cat' / 'notes.txt').write_text('not an image')
    (tmp_path / 'train' / 'cat' / '.hidden.jpg').write_bytes(b'')
    (tmp_path / '.cache').mkdir()
    _save(tmp_path / '.cache' / 'x.jpg', 'cat', 0)
    return tmp_path


def _pipeline(path, size=16, **dl_kwargs):
    tfms = [make_rgb, ResizeFixed(size), to_byte_tensor, to_float_tensor]
    il = ImageList.from_files(path, tfms=tfms)
    sd = SplitData.split_by_func(il, partial(grandparent_splitter, valid_name='val'))
    ll = label_by_func(sd, parent_labeler, proc_y=CategoryProcessor())
    return il, sd, ll


# ---- files and item lists ----------------------------------------------------------------------

def test_get_files_sorted_filtered_and_skips_hidden(tree):
    files = get_files(tree, image_extensions)
    assert files == sorted(files)
    assert len(files) == len(CLASSES) * (N_TRAIN + N_VALID) + 1
    assert all(not any(part.startswith('.') for part in f.relative_to(tree).parts) for f in files)
    assert not any(f.suffix == '.txt' for f in files)
    assert get_files(tree, ['PNG']) == [f for f in files if f.suffix == '.png']  # extensions are case-insensitive
    assert get_files(tree / 'train' / 'cat', '.txt', recurse=False) == [tree / 'train' / 'cat' / 'notes.txt']
    assert get_files(tree, '.jpg', recurse=False) == []
    assert {f.parts[-3] for f in get_files(tree, image_extensions, include=['val'])} == {'val'}
    with pytest.raises(FileNotFoundError, match='not a folder'):
        get_files(tree / 'missing')


def test_get_files_order_is_sorted_paths(tmp_path):
    for rel in ('a/x.jpg', 'a-c/y.jpg', 'a.jpg', 'B/z.JPG', 'a/b/w.png', 'a/c.png'):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).touch()
    files = get_files(tmp_path, ['.jpg', '.png'])
    assert files == sorted(files) and len(files) == 6
    assert [str(f.relative_to(tmp_path)) for f in files][:3] == ['B/z.JPG', 'a/b/w.png', 'a/c.png']


def test_get_files_follows_folder_symlinks_without_looping(tree):
    (tree / 'train' / 'cat' / 'loop').symlink_to(tree / 'train')
    files = get_files(tree / 'train' / 'cat', '.jpg')
    assert len(files) == N_TRAIN + N_TRAIN * (len(CLASSES) - 1)  # the loop is entered once, never again


def test_item_list_indexing():
    il = ItemList(list('abcdef'), tfms=[str.upper])
    assert il[0] == 'A' and il[-1] == 'F' and il[np.int64(1)] == 'B' and il[torch.tensor(2)] == 'C'
    assert il[1:3] == ['B', 'C']
    assert il[[True, False, True, False, False, True]] == ['A', 'C', 'F']
    assert il[np.array([1, 0, 0, 0, 0, 1], dtype=bool)] == ['A', 'F']
    assert il[torch.tensor([0, 5])] == ['A', 'F'] and il[[3, 3]] == ['D', 'D']
    with pytest.raises(IndexError, match='mask of length 2'):
        il[[True, False]]
    assert list(il) == list('ABCDEF') and len(il) == 6
    new = il.new(['x'])
    assert type(new) is ItemList and new.tfms is il.tfms and new[0] == 'X'
    text = repr(ItemList(range(10)))
    assert 'ItemList (10 items)' in text and '0, 1, 2, 3, 4, ...' in text


def test_transform_errors_name_the_item():
    def boom(x): raise RuntimeError('bad transform')
    with pytest.raises(RuntimeError, match='bad transform') as info:
        ItemList(['item-7'], tfms=[boom])[0]
    assert any('item-7' in note for note in info.value.__notes__)


def test_unreadable_image_names_its_path(tree):
    bad = tree / 'train' / 'cat' / 'broken.jpg'
    bad.write_bytes(b'this is not a jpeg')
    good = tree / 'train' / 'cat' / '0.jpg'
    truncated = tree / 'train' / 'dog' / 'truncated.jpg'
    truncated.write_bytes(good.read_bytes()[:200])
    il = ImageList([bad, truncated, tree / 'nope.png'], tree)
    for i, path in enumerate(il.items):
        with pytest.raises(OSError, match=str(path).replace('.', r'\.')):
            il[i]


def test_image_list_opens_with_pil(tree):
    il = ImageList.from_files(tree)
    assert isinstance(il[0], PIL.Image.Image)
    assert il.path == tree and 'ImageList (' in repr(il)


# ---- splitting and labelling -------------------------------------------------------------------

def test_grandparent_splitter():
    assert grandparent_splitter(Path('a/val/cat/1.jpg'), valid_name='val') is True
    assert grandparent_splitter(Path('a/train/cat/1.jpg'), valid_name='val') is False
    assert grandparent_splitter(Path('a/test/cat/1.jpg'), valid_name='val') is None
    assert grandparent_splitter('x/valid/c/f', 'valid', 'tr') is True


def test_random_splitter_is_repeatable_with_seed():
    items = [f'f{i}' for i in range(2000)]
    first = [random_splitter(o, p_valid=0.25, seed=3) for o in items]
    assert first == [random_splitter(o, p_valid=0.25, seed=3) for o in items]
    assert first != [random_splitter(o, p_valid=0.25, seed=4) for o in items]
    assert 0.2 < sum(first) / len(first) < 0.3
    with pytest.raises(ValueError, match='p_valid'):
        random_splitter('x', p_valid=1.5)
    sd = SplitData.split_by_func(ItemList(items), partial(random_splitter, p_valid=0.25, seed=3))
    assert len(sd.train) + len(sd.valid) == 2000 and sd.valid.items[0] == items[first.index(True)]


def test_split_sizes_vocab_and_labels(tree):
    il, sd, ll = _pipeline(tree)
    assert len(il) == len(CLASSES) * (N_TRAIN + N_VALID) + 1
    assert (len(sd.train), len(sd.valid)) == (len(CLASSES) * N_TRAIN, len(CLASSES) * N_VALID)
    assert sd.path == tree  # attribute reads fall through to the training list
    vocab = ll.train.proc_y.vocab
    assert vocab == list(CLASSES) and ll.train.proc_y.otoi == {c: i for i, c in enumerate(CLASSES)}
    for part in (ll.train, ll.valid):
        assert [vocab[i] for i in part.y.items] == [f.parent.name for f in part.x.items]
        assert all(isinstance(i, int) for i in part.y.items)
        assert part.y_obj(0) == part.x.items[0].parent.name
        assert part.y_obj(slice(0, 2)) == [f.parent.name for f in part.x.items[:2]]
    assert all(f.parts[-3] == 'val' for f in ll.valid.x.items)
    x, y = ll.train[0]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 0


def test_category_processor():
    proc = CategoryProcessor()
    assert proc(['dog', 'cat', 'dog', 'ant']) == [2, 1, 2, 0]
    assert proc.vocab == ['ant', 'cat', 'dog'] and proc.otoi['dog'] == 2
    assert proc(['cat']) == [1]  # the vocab is kept after the first (training) list
    assert proc.deprocess([0, 2]) == ['ant', 'dog'] and proc.deproc1(torch.tensor(1)) == 'cat'
    with pytest.raises(ValueError, match=r"\['fox'\].*not in the vocab"):
        proc(['cat', 'fox'])
    with pytest.raises(ValueError, match='no vocab yet'):
        CategoryProcessor().deprocess([0])
    assert CategoryProcessor(vocab=['b', 'a'])(['a']) == [1]
    assert Processor()(('x',)) == ['x']


def test_unknown_validation_label_is_an_error(tree):
    _save(tree / 'val' / 'fox' / '0.png', 'cat', 0)
    il = ImageList.from_files(tree)
    sd = SplitData.split_by_func(il, partial(grandparent_splitter, valid_name='val'))
    with pytest.raises(ValueError, match='fox'):
        label_by_func(sd, parent_labeler, proc_y=CategoryProcessor())


def test_labeled_data_checks_lengths():
    with pytest.raises(ValueError, match='same length'):
        LabeledData(ItemList([1, 2]), ItemList([1]))


# ---- DataBunch ---------------------------------------------------------------------------------

def test_to_databunch_batches(tree):
    tfms_list = [make_rgb, ResizeFixed(16), to_byte_tensor, to_float_tensor]
    il = ImageList.from_files(tree, tfms=tfms_list)
    sd = SplitData.split_by_func(il, partial(grandparent_splitter, valid_name='val'))
    ll = label_by_func(sd, parent_labeler, proc_y=CategoryProcessor())
    data = ll.to_databunch(4, c_in=3)
    assert isinstance(data, DataBunch)
    assert data.vocab == list(CLASSES) and data.c_out == 3 and data.c_in == 3
    assert data.item_tfms is tfms_list
    assert data.train_dl.batch_size == 4 and data.valid_dl.batch_size == 8
    assert isinstance(data.train_dl.sampler, ResumableSampler) and data.train_dl.sampler.shuffle
    assert isinstance(data.valid_dl.sampler, torch.utils.data.SequentialSampler)
    xb, yb = next(iter(data.train_dl))
    assert xb.shape == (4, 3, 16, 16) and xb.dtype == torch.float32 and 0 <= xb.min() and xb.max() <= 1
    assert yb.shape == (4,) and yb.dtype == torch.int64
    xv, yv = next(iter(data.valid_dl))
    assert xv.shape == (6, 3, 16, 16) and yv.tolist() == [0, 0, 1, 1, 2, 2]
    assert ll.to_databunch(4, c_out=7).c_out == 7
    with pytest.raises(TypeError, match='label the split first'):
        sd.to_databunch(4)


def test_labeled_data_alone_gives_training_only_databunch(tree):
    _, _, ll = _pipeline(tree)
    data = ll.train.to_databunch(5)
    assert data.valid_dl is None and data.vocab == list(CLASSES) and len(data.train_ds) == 12


@pytest.mark.filterwarnings("ignore:This DataLoader will create")
def test_course_10b_snippet_runs_unchanged(tree):
    path, bs = tree, 4
    tfms = [make_rgb, ResizeFixed(128), to_byte_tensor, to_float_tensor]
    il = ImageList.from_files(path, tfms=tfms)
    sd = SplitData.split_by_func(il, partial(grandparent_splitter, valid_name='val'))
    ll = label_by_func(sd, parent_labeler, proc_y=CategoryProcessor())
    data = ll.to_databunch(bs, c_in=3, c_out=10, num_workers=4)

    assert data.c_in == 3 and data.c_out == 10 and data.train_dl.num_workers == 4
    xb, yb = next(iter(data.valid_dl))  # through 4 worker processes
    assert xb.shape == (6, 3, 128, 128) and yb.tolist() == [0, 0, 1, 1, 2, 2]


def test_pipeline_pickles_for_spawned_workers(tree):
    _, _, ll = _pipeline(tree)
    clone = pickle.loads(pickle.dumps(ll))
    assert clone.train.proc_y.vocab == list(CLASSES)
    torch.testing.assert_close(clone.train[3][0], ll.train[3][0])
    dl = torch.utils.data.DataLoader(ll.valid, batch_size=6, num_workers=2)
    xb, yb = next(iter(dl))
    assert xb.shape == (6, 3, 16, 16) and yb.tolist() == [0, 0, 1, 1, 2, 2]


def test_torchvision_transforms_in_the_pipeline(tree):
    from torchvision.transforms import v2
    tfms = [make_rgb, v2.Resize((8, 8)), v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
    il = ImageList.from_files(tree, tfms=tfms)
    ll = label_by_func(SplitData.split_by_func(il, partial(grandparent_splitter, valid_name='val')),
                       parent_labeler, proc_y=CategoryProcessor())
    xb, yb = next(iter(ll.to_databunch(4).valid_dl))
    assert xb.shape == (6, 3, 8, 8) and xb.dtype == torch.float32


def test_label_image_folder_truncates_per_class(tree):
    sd = label_image_folder(tree, tfms=[make_rgb, ResizeFixed(8), to_byte_tensor, to_float_tensor],
                            valid_name='val', n_per_class=2, valid_n_per_class=1)
    assert [f.name for f in sd.train.x.items] == ['0.jpg', '1.jpg'] * 3
    assert sd.train.y.items == [0, 0, 1, 1, 2, 2] and sd.valid.y.items == [0, 1, 2]
    with pytest.raises(FileNotFoundError, match='valid'):
        label_image_folder(tree)  # there is no valid/ folder


def test_show_batch_on_databunch(tree):
    _, _, ll = _pipeline(tree)
    data = ll.to_databunch(6)
    fig = data.show_batch(n=4, valid=True)
    titles = [ax.get_title() for ax in fig.axes if ax.images]
    assert titles == ['bird', 'bird', 'cat', 'cat']


def test_learner_trains_one_epoch(tree):
    _, _, ll = _pipeline(tree, size=16)
    data = ll.to_databunch(4, c_in=3)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(4, data.c_out))
    before = [p.detach().clone() for p in model.parameters()]
    learn = Learner(model, data, F.cross_entropy, lr=0.1)
    learn.fit(1)
    assert learn.n_iter == 3 and learn.n_epochs == 1.0
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert torch.isfinite(learn.loss)
