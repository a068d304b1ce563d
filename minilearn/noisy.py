"""Learning with noisy labels: inject noise, out-of-fold probabilities, confident learning, clean and retrain.

The workflow (Northcutt et al., "Confident Learning", JAIR 2021):

    probs = out_of_fold_probs(make_learner, train_ds, k=5, epochs=...)   # each row from a model that never saw it
    labels = dataset_labels(train_ds)
    is_issue = find_label_issues(labels=labels, pred_probs=probs)        # confident learning, cleanlab's semantics
    LabelIssues.from_probs(probs, labels, dataset=train_ds, mask=is_issue).show(9)
    clean_ds = clean_dataset(train_ds, is_issue)                         # or action='relabel', pred_probs=probs
    learn = make_learner(DataBunch.from_datasets(clean_ds, valid_ds, bs=...)); learn.fit(...)

Why confident learning is handed to `cleanlab` rather than written here: cleanlab is the field's
well-kept reference implementation (per-class thresholds, the calibrated confident joint, the five
`filter_by` rules, the ranking scores and their edge cases: classes without confident items, rounding
of the per-class counts, `min_examples_per_class`). A copy here would have to track it release by
release and could only be checked against it anyway. So `find_label_issues(labels=..., pred_probs=...)`
converts minilearn's tensors, calls `cleanlab.filter.find_label_issues` with the same keywords and
returns its answer as a tensor; cleanlab is an optional extra (`pip install minilearn[cleanlab]`) and
its absence is a clear ImportError naming that command. What minilearn owns is what cleanlab leaves
to the training framework: the out-of-fold probabilities (stratified folds, a fresh learner per fold,
predictions without MixUp or augmentation) and the in-sample loss ranking `find_label_issues(learn, dl)`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from numbers import Real
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from fastprogress.fastprogress import progress_bar
from torch.utils.data import DataLoader, Subset

from .core import is_interactive, optional_import
from .data.core import DataBunch
from .data.transforms import show_image
from .interpret import _grid
from .predictions import get_preds

if TYPE_CHECKING:
    from .learner import Learner

__all__ = ['NoisyLabels', 'NOISE_KINDS', 'ASYMMETRIC_MAPPINGS', 'check_noise_kind', 'inject_label_noise',
           'add_label_noise', 'LabelIssues', 'find_label_issues', 'dataset_labels', 'stratified_folds',
           'out_of_fold_probs', 'clean_dataset', 'RelabeledDataset']


class NoisyLabels(NamedTuple):
    """New labels and the boolean mask of the positions whose label actually changed."""
    labels: torch.Tensor
    changed: torch.Tensor


def _as_label_tensor(labels: Any) -> torch.Tensor:
    if not isinstance(labels, torch.Tensor):
        try:
            labels = torch.as_tensor(np.asarray(labels))
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"labels must be a 1-D sequence of integer class indices, "
                            f"got {type(labels).__name__}") from e
    if labels.ndim != 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be a 1-D tensor of integer class indices, got shape {tuple(labels.shape)} "
                        f"and dtype {labels.dtype}")
    return labels


def _n_classes(labels: torch.Tensor, n_classes: int | None) -> int:
    if n_classes is None:
        if labels.numel() == 0: raise ValueError("n_classes is needed when there are no labels")
        return int(labels.max()) + 1
    if isinstance(n_classes, bool) or not isinstance(n_classes, int) or n_classes < 1:
        raise ValueError(f"n_classes must be a positive int, got {n_classes!r}")
    return n_classes


NOISE_KINDS = ('symmetric', 'pair', 'asymmetric')
# Class flips of the asymmetric noise of Patrini et al. (CVPR 2017), as used by Co-teaching, ELR, JoCoR and later work.
ASYMMETRIC_MAPPINGS: Mapping[str, Mapping[int, int]] = MappingProxyType({
    'mnist': MappingProxyType({7: 1, 2: 7, 5: 6, 6: 5, 3: 8}),  # 7→1, 2→7, 5↔6, 3→8
    # truck→automobile, bird→airplane, deer→horse, cat↔dog
    'cifar10': MappingProxyType({9: 1, 2: 0, 4: 7, 3: 5, 5: 3}),
})


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_noise_kind(kind: str = 'symmetric', mapping: Mapping[int, int] | str | None = None,
                     n_classes: int | None = None) -> dict[int, int] | None:
    """The validated class mapping of a noise `kind` (None unless 'asymmetric'); a clear ValueError otherwise.

    `mapping` is a dict {class: class it flips to} or the name of one in `ASYMMETRIC_MAPPINGS` ('mnist',
    'cifar10'). With `n_classes`, every class of the mapping must lie in [0, n_classes). Call it before
    any data is read (a CLI's options) and `inject_label_noise` calls it again with the class count.
    """
    if kind not in NOISE_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, NOISE_KINDS))}, got {kind!r}")
    if kind != 'asymmetric':
        if mapping is not None:
            raise ValueError(f"kind={kind!r} draws its own flips and ignores a mapping; pass kind='asymmetric' to use "
                             f"mapping={mapping!r}, or drop the mapping")
        return None
    if mapping is None:
        raise ValueError(f"kind='asymmetric' needs mapping={{class: class it flips to}}, or the name of a known one: "
                         f"{', '.join(map(repr, ASYMMETRIC_MAPPINGS))}")
    if isinstance(mapping, str):
        if mapping not in ASYMMETRIC_MAPPINGS:
            known = ', '.join(map(repr, ASYMMETRIC_MAPPINGS))
            raise ValueError(f"no asymmetric mapping named {mapping!r}; known: {known}, or pass a dict "
                             f"{{class: class it flips to}}")
        mapping = ASYMMETRIC_MAPPINGS[mapping]
    if not isinstance(mapping, Mapping) or not mapping:
        raise ValueError(f"mapping must be a non-empty dict {{class: class it flips to}}, got {mapping!r}")
    for source, target in mapping.items():
        if not _is_int(source) or not _is_int(target):
            raise ValueError(f"mapping entries must be int class indices, got {source!r}: {target!r}")
        if source == target:
            raise ValueError(f"mapping flips class {source} to itself: a flip must change the class (drop that entry)")
        for c in (source, target):
            if c < 0 or (n_classes is not None and c >= n_classes):
                raise ValueError(f"mapping names class {c}, not a class of the labels: classes lie in [0, "
                                 f"{'n_classes' if n_classes is None else n_classes})")
    return {int(s): int(t) for s, t in mapping.items()}


def inject_label_noise(labels: Any, noise_ratio: float, n_classes: int | None = None, exclude_true: bool = False,
                       generator: torch.Generator | None = None, *, kind: str = 'symmetric',
                       mapping: Mapping[int, int] | str | None = None) -> NoisyLabels:
    """Noisy labels of one of three kinds; the input is left untouched.

    - 'symmetric' (default): exactly round(N·noise_ratio) randomly chosen labels are redrawn uniformly at
      random. A redrawn label may equal the original one (the common lab convention), so `changed` can
      have fewer True entries than positions redrawn; `exclude_true=True` always picks another class.
    - 'pair' (Han et al. 2018): exactly round(N·noise_ratio) randomly chosen labels y become (y + 1) mod C.
    - 'asymmetric' (Patrini et al. 2017): for each class c of `mapping`, exactly round(n_c·noise_ratio) of
      its items, chosen at random, become mapping[c]; other classes are untouched. `mapping` is a dict or
      a name in `ASYMMETRIC_MAPPINGS` ('mnist', 'cifar10'); flips are chosen among the original labels,
      so cat↔dog swaps. See `check_noise_kind`.

    `n_classes` defaults to max(labels)+1. Draws come from `generator` (a CPU `torch.Generator`), else
    from torch's global generator.
    """
    labels = _as_label_tensor(labels)
    if isinstance(noise_ratio, bool) or not isinstance(noise_ratio, Real) or not math.isfinite(noise_ratio) \
            or not 0 <= noise_ratio <= 1:
        raise ValueError(f"noise_ratio must be a number in [0, 1], got {noise_ratio!r}")
    n_classes = _n_classes(labels, n_classes)
    mapping = check_noise_kind(kind, mapping, n_classes)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
        raise ValueError(f"labels must lie in [0, n_classes={n_classes}), got values in "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    if exclude_true and kind != 'symmetric':
        raise ValueError(f"exclude_true applies to kind='symmetric' only: kind={kind!r} always changes the class")
    if (exclude_true or kind == 'pair') and n_classes < 2:
        raise ValueError(f"{'exclude_true=True' if exclude_true else 'pair noise'} needs at least 2 classes to pick "
                         f"a different one")
    if kind == 'asymmetric': return _asymmetric(labels, noise_ratio, mapping, generator)
    n_noisy = round(len(labels) * noise_ratio)
    positions = torch.randperm(len(labels), generator=generator)[:n_noisy]
    original = labels.cpu()[positions].long()
    if kind == 'pair':
        drawn = (original + 1) % n_classes
    elif exclude_true:  # a uniform shift in [1, C) is a uniform draw among the other classes
        drawn = (original + torch.randint(1, n_classes, (n_noisy,), generator=generator)) % n_classes
    else:
        drawn = torch.randint(0, n_classes, (n_noisy,), generator=generator)
    noisy = labels.clone()
    noisy[positions.to(labels.device)] = drawn.to(device=labels.device, dtype=labels.dtype)
    return NoisyLabels(noisy, noisy != labels)


def _asymmetric(labels: torch.Tensor, noise_ratio: float, mapping: dict[int, int],
                generator: torch.Generator | None) -> NoisyLabels:
    original = labels.cpu()
    noisy = original.clone()
    for source in sorted(mapping):  # sorted: the same draws whatever the dict's order
        members = (original == source).nonzero().squeeze(1)
        chosen = members[torch.randperm(len(members), generator=generator)[:round(len(members) * noise_ratio)]]
        noisy[chosen] = mapping[source]
    noisy = noisy.to(labels.device)
    return NoisyLabels(noisy, noisy != labels)


# ---- applying noise to a dataset ---------------------------------------------------------------
def _label_slot(data: Any) -> tuple[Any, str, int | None]:
    """(object, attribute) holding the class indices of `data`, and the number of classes when known."""
    if hasattr(data, 'train') and hasattr(data, 'valid'):
        raise TypeError("add noise to one half of a split (usually the training half): add_label_noise(ll.train, ...)")
    if hasattr(data, 'targets'):  # torchvision datasets
        classes = getattr(data, 'classes', None)
        return data, 'targets', len(classes) if classes else None
    y = getattr(data, 'y', None)
    if y is not None and hasattr(y, 'items'):  # minilearn LabeledData: y.items are the processed class indices
        vocab = getattr(getattr(data, 'proc_y', None), 'vocab', None)
        return y, 'items', len(vocab) if vocab else None
    if y is not None:  # minilearn Dataset(x, y)
        vocab = getattr(data, 'vocab', None)
        return data, 'y', len(vocab) if vocab else None
    raise TypeError(f"{type(data).__name__} exposes no labels: add_label_noise needs a dataset with `targets` "
                    f"(torchvision style), labelled data with `y.items` (LabeledData) or a Dataset with `y`")


def _like(new: torch.Tensor, old: Any) -> Any:
    """`new` in the container type of `old` (list, numpy array or tensor)."""
    if isinstance(old, torch.Tensor): return new.to(device=old.device, dtype=old.dtype)
    if isinstance(old, np.ndarray): return new.cpu().numpy().astype(old.dtype)
    return new.tolist()


def _copy(labels: Any) -> Any:
    return labels.clone() if isinstance(labels, torch.Tensor) else labels.copy() if isinstance(labels, np.ndarray) \
        else list(labels)


def add_label_noise(data: Any, noise_ratio: float, n_classes: int | None = None, exclude_true: bool = False,
                    generator: torch.Generator | None = None, *, kind: str = 'symmetric',
                    mapping: Mapping[int, int] | str | None = None) -> NoisyLabels:
    """Replace a dataset's labels by noisy ones (see `inject_label_noise`), keeping the clean ones in `clean_targets`.

    Works on datasets with `targets` (torchvision; an ImageFolder's `samples` follow), minilearn
    `LabeledData` (its `y.items`) and minilearn `Dataset`s (their `y`). `data.noise_mask` marks the
    changed items. Calling it again starts from the clean labels.
    """
    owner, attr, known_classes = _label_slot(data)
    clean = getattr(data, 'clean_targets', None)
    if clean is None: clean = _copy(getattr(owner, attr))
    result = inject_label_noise(clean, noise_ratio, n_classes if n_classes is not None else known_classes,
                                exclude_true=exclude_true, generator=generator, kind=kind, mapping=mapping)
    setattr(owner, attr, _like(result.labels, clean))
    samples = getattr(data, 'samples', None)
    if attr == 'targets' and isinstance(samples, list) and len(samples) == len(result.labels):
        samples[:] = [(item[0], int(t)) for item, t in zip(samples, result.labels)]  # in place: `imgs` is the same list
    data.clean_targets, data.noise_mask = clean, result.changed
    return result


# ---- labels and folds ----------------------------------------------------------------------------
def dataset_labels(data: Any) -> torch.Tensor:
    """The class index of every item of a map-style `(x, y)` dataset, in dataset order, as a 1-D int64 tensor.

    Read from `targets` (torchvision), `y.items` (LabeledData), `y` (Dataset) or through a `Subset`
    without loading the inputs; any other dataset is indexed item by item.
    """
    if isinstance(data, Subset):
        return dataset_labels(data.dataset)[torch.as_tensor(list(data.indices), dtype=torch.long)]
    try:
        owner, attr, _ = _label_slot(data)
        labels = getattr(owner, attr)
    except TypeError:
        labels = [data[i][1] for i in range(len(data))]
    labels = _as_label_tensor([int(t) for t in labels] if isinstance(labels, list) else labels)
    if len(labels) != len(data):
        raise ValueError(f"{type(data).__name__} has {len(data)} items but {len(labels)} labels")
    return labels.cpu().long()


def _known_classes(data: Any) -> int | None:
    if isinstance(data, Subset): return _known_classes(data.dataset)
    try:
        return _label_slot(data)[2]
    except TypeError:
        return None


def _vocab(data: Any) -> list | None:
    if isinstance(data, Subset): return _vocab(data.dataset)
    vocab = getattr(getattr(data, 'proc_y', None), 'vocab', None) or getattr(data, 'vocab', None) \
        or getattr(data, 'classes', None)
    return list(vocab) if vocab else None


def stratified_folds(labels: Any, k: int, seed: int = 0) -> torch.Tensor:
    """The fold (0..k−1) of every item: each class's items shuffled (seeded) and dealt round-robin over the folds.

    Fold sizes differ by at most one, and so does any class's count across folds. The draws come from a
    `torch.Generator` seeded with `seed`; the global RNG is untouched.
    """
    labels = _as_label_tensor(labels).cpu().long()
    _check_k(k, labels)
    g = torch.Generator().manual_seed(seed)
    folds = torch.empty(len(labels), dtype=torch.long)
    offset = 0  # continue the deal where the previous class stopped, so the fold sizes stay balanced
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().squeeze(1)
        members = members[torch.randperm(len(members), generator=g)]
        folds[members] = (torch.arange(len(members)) + offset) % k
        offset = (offset + len(members)) % k
    return folds


def _check_k(k: Any, labels: torch.Tensor) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"k (the number of folds) must be an int of at least 2, got {k!r}")
    if labels.numel() == 0: raise ValueError("out-of-fold probabilities need a non-empty dataset")
    counts = torch.bincount(labels)
    present = counts[counts > 0]
    smallest = int(present.min())
    if k > smallest:
        c = int((counts == smallest).nonzero()[0])
        raise ValueError(f"k={k} folds need at least {k} items of every class, but class {c} has only {smallest}: "
                         f"use k <= {smallest}, or drop or merge the rare classes")


# ---- out-of-fold probabilities -------------------------------------------------------------------
def _c_in(data: Any) -> int | None:
    """Input channels (C of a (C, H, W) image), or features of a vector input, as the models' builders read `c_in`."""
    x = data[0][0]
    if isinstance(x, torch.Tensor) and x.ndim >= 1: return x.shape[0]
    getbands = getattr(x, 'getbands', None)  # PIL images
    return len(getbands()) if callable(getbands) else None


def _check_learner(learn: Any) -> None:
    # Checked by behaviour, not by class: nothing in the package but __init__/cli may import learner.py,
    # and any object that fits and predicts like a Learner can serve.
    missing = [a for a in ('fit', 'model', 'data', 'loss_func', 'cbs') if not hasattr(learn, a)]
    if missing or not callable(getattr(learn, 'fit', None)) or not isinstance(learn.model, torch.nn.Module):
        raise TypeError(f"make_learner(data) must return a minilearn Learner (fit, model, data, loss_func, cbs), got "
                        f"{type(learn).__name__}" + (f" without {', '.join(missing)}" if missing else '') +
                        "; e.g. make_learner = lambda data: Learner(model_fn(), data, loss_func)")


def _fold_bar(k: int, show: bool | None) -> Any:
    if not (is_interactive() if show is None else show): return range(k)
    return progress_bar(range(k), leave=True)


def _fork_rng():
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=devices)


def out_of_fold_probs(make_learner: Callable[[Any], Learner], data: Any, k: int = 5, epochs: int = 1, bs: int = 64,
                      seed: int = 0, *, progress: bool | None = None, **fit_kwargs: Any) -> torch.Tensor:
    """(N, C) softmax probabilities of a map-style `(x, y)` dataset, in order; no row from a model that saw its item.

    The items are split into `k` stratified folds (`stratified_folds`, seeded); for each fold
    `make_learner(databunch)` builds a fresh learner on a DataBunch whose training loader holds the
    other folds and whose validation loader the fold itself (so validation metrics and early stopping
    watch the held-out loss); it trains with `learn.fit(epochs, **fit_kwargs)` and predicts the fold
    with `get_preds` (eval mode, no MixUp or training-only callbacks; augmentation done in training
    callbacks does not apply). Fold f trains with torch's RNG seeded `seed·1000 + f` inside
    `torch.random.fork_rng`, so runs repeat exactly and the caller's RNG state is kept. A progress
    bar over the folds is drawn in terminals and notebooks (`progress=False` to hide it), above each
    fold's own epoch bars.
    """
    if not callable(make_learner):
        raise TypeError(f"make_learner must be a callable data -> Learner, got {type(make_learner).__name__}")
    if not hasattr(data, '__getitem__') or not hasattr(data, '__len__'):
        raise TypeError(f"data must be a map-style dataset of (x, y) items, got {type(data).__name__}")
    for name, value in (('epochs', epochs), ('bs', bs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    labels = dataset_labels(data)
    folds = stratified_folds(labels, k, seed)
    n_classes = _known_classes(data)
    if n_classes is None: n_classes = int(labels.max()) + 1
    elif int(labels.max()) >= n_classes:
        raise ValueError(f"the data names {n_classes} classes but has a label {int(labels.max())}; "
                         f"labels must lie in [0, {n_classes})")
    c_in, vocab = _c_in(data), _vocab(data)
    probs = torch.full((len(labels), n_classes), float('nan'))
    for f in _fold_bar(k, progress):
        held = (folds == f).nonzero().squeeze(1)
        rest = (folds != f).nonzero().squeeze(1)
        with _fork_rng():
            torch.manual_seed(seed * 1000 + f)
            bunch = DataBunch.from_datasets(Subset(data, rest.tolist()), Subset(data, held.tolist()), bs=bs,
                                            c_in=c_in, c_out=n_classes)
            bunch.vocab = vocab
            learn = make_learner(bunch)
            _check_learner(learn)
            if f == 0: _check_outputs(learn, get_preds, data, held, n_classes)
            learn.fit(epochs, **fit_kwargs)
            preds, _ = get_preds(learn, dl=DataLoader(Subset(data, held.tolist()), batch_size=2 * bs))
        probs[held] = preds.float()
    return probs


def _check_outputs(learn: Any, get_preds: Callable, data: Any, held: torch.Tensor, n_classes: int) -> None:
    """The untrained model on two held-out items, so a class-count mismatch fails before any training."""
    preds, _ = get_preds(learn, dl=DataLoader(Subset(data, held[:2].tolist()), batch_size=2))
    if preds.ndim != 2 or preds.shape[1] != n_classes:
        raise ValueError(f"the model of make_learner gives outputs of shape {tuple(preds.shape[1:])} per item but the "
                         f"data has {n_classes} classes: its last layer needs {n_classes} outputs (data.c_out)")


# ---- finding label issues ----------------------------------------------------------------------
class _LabelIssuesFields(NamedTuple):
    indices: torch.Tensor
    losses: torch.Tensor
    labels: Any
    predicted: torch.Tensor


class LabelIssues(_LabelIssuesFields):
    """Suspected label issues, most likely first: dataset indices, losses, given labels and predicted labels.

    Also `probs` (the (n, C) probabilities in the same order, or None), `dataset` (what the indices
    refer to, or None) and `vocab` (class names, or None), which `show` reads.
    """
    probs: torch.Tensor | None = None
    dataset: Any = None
    vocab: list | None = None

    @classmethod
    def from_probs(cls, pred_probs: Any, labels: Any, dataset: Any = None, mask: Any = None,
                   indices: Any = None, vocab: list | None = None) -> LabelIssues:
        """Issues from (N, C) probabilities and given labels, for `show` and for ranking.

        The items are `indices` in their order when given, else those of the boolean `mask` (else all)
        ranked by −log p(given label), highest first.
        """
        probs = torch.as_tensor(np.asarray(pred_probs), dtype=torch.float32)
        labels = _as_label_tensor(labels).cpu().long()
        _check_probs(probs, labels)
        if indices is not None:
            order = torch.as_tensor(np.asarray(indices), dtype=torch.long).reshape(-1)
        else:
            candidates = torch.arange(len(labels)) if mask is None else \
                torch.as_tensor(np.asarray(mask), dtype=torch.bool).nonzero().squeeze(1)
            loss = -probs[candidates, labels[candidates]].clamp_min(1e-12).log()
            order = candidates[loss.argsort(descending=True, stable=True)]
        loss = -probs[order, labels[order]].clamp_min(1e-12).log()
        issues = cls(order, loss, labels[order], probs[order].argmax(1))
        issues.probs, issues.dataset = probs[order], dataset
        issues.vocab = vocab if vocab is not None else (_vocab(dataset) if dataset is not None else None)
        return issues

    def show(self, n: int = 9, figsize_per: float = 2.5):
        """A grid of the top `n` items: image, given and predicted label with probabilities, file name if any."""
        if self.dataset is None:
            raise ValueError("these label issues carry no dataset to show items from; build them with "
                             "find_label_issues(learn, dl) or LabelIssues.from_probs(..., dataset=ds)")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        n = min(n, len(self.indices))
        if n == 0: raise ValueError("there are no label issues to show")
        fig, axes = _grid(n, figsize_per)
        for rank, ax in enumerate(axes[:n]):
            i = int(self.indices[rank])
            given, predicted = int(self.labels[rank]), int(self.predicted[rank])
            title = f'given {self._name(given)}\npred {self._name(predicted)}'
            if self.probs is not None:
                title += f' ({float(self.probs[rank, predicted]):.2f}; given {float(self.probs[rank, given]):.2f})'
            name = _file_name(self.dataset, i)
            if name is not None: title += f'\n{name}'
            show_image(self.dataset[i][0], ax=ax, title=title)
            ax.title.set_fontsize(8)
        fig.suptitle('suspected label issues: given / predicted (probability)')
        fig.tight_layout()
        return fig

    def _name(self, c: int) -> str:
        return str(self.vocab[c]) if self.vocab is not None and 0 <= c < len(self.vocab) else str(c)


def _file_name(data: Any, i: int) -> str | None:
    """The file name of item `i` when the dataset was read from files (item lists of paths, ImageFolder)."""
    if isinstance(data, Subset): return _file_name(data.dataset, int(data.indices[i]))
    samples = getattr(data, 'samples', None)
    if isinstance(samples, list) and i < len(samples) and isinstance(samples[i], tuple):
        item = samples[i][0]
    else:
        item = getattr(getattr(data, 'x', None), 'items', None)
        item = item[i] if item is not None and i < len(item) else None
    if hasattr(item, 'name') and hasattr(item, 'parent'):  # a Path: with its folder, often the class's name
        return f'{item.parent.name}/{item.name}' if item.parent.name else item.name
    if isinstance(item, str) and ('/' in item or '.' in item): return '/'.join(item.split('/')[-2:])
    return None


def _check_probs(probs: torch.Tensor, labels: torch.Tensor) -> None:
    if probs.ndim != 2 or probs.shape[0] != len(labels):
        raise ValueError(f"pred_probs must have shape (N, C) with one row per label: got {tuple(probs.shape)} for "
                         f"{len(labels)} labels")
    if len(labels) and (int(labels.min()) < 0 or int(labels.max()) >= probs.shape[1]):
        raise ValueError(f"labels must lie in [0, C={probs.shape[1]}) (one column of pred_probs per class), got "
                         f"values in [{int(labels.min())}, {int(labels.max())}]")


def find_label_issues(learn: Any = None, dl: Any = None, *, labels: Any = None, pred_probs: Any = None,
                      aum: Any = None, n_issues: int | None = None,
                      filter_by: str = 'prune_by_noise_rate', return_indices_ranked_by: str | None = None,
                      n_jobs: int | None = 1, **cleanlab_kwargs: Any) -> Any:
    """Likely label errors: confident learning on `labels`/`pred_probs`, or a learner's in-sample loss ranking.

    `find_label_issues(labels=..., pred_probs=...)` is `cleanlab.filter.find_label_issues` with its
    keywords and semantics (`filter_by`, `return_indices_ranked_by`, `frac_noise`, ...; see the module
    docstring): a boolean mask over the items, or their indices ranked by the chosen score, as a
    tensor. Pass out-of-fold probabilities (`out_of_fold_probs`). `n_jobs` defaults to 1 (no worker
    processes; the result does not depend on it).

    `find_label_issues(learn, dl)` ranks the items of a loader (validation by default) by the model's
    per-item loss, highest first, as `LabelIssues`; predictions run in eval mode without MixUp
    (`get_preds`). On the training set these are in-sample losses, informative only while the model
    has not memorised the noise; pass a loader without augmentation, e.g.
    `DataLoader(learn.data.train_ds, batch_size=256)`.

    `find_label_issues(aum=scores, n_issues=n)` ranks by area under the margin (`AreaUnderMargin().scores`,
    one training run, no folds), lowest first: the indices (int64) of the `n_issues` items of lowest AUM, items
    never trained on (NaN) left out. Without `n_issues`, give `labels=` and `pred_probs=`: the count is then the
    number of issues confident learning estimates (`cleanlab.count.num_label_issues`). Show them with
    `LabelIssues.from_probs(probs, labels, indices=..., dataset=...)`.
    """
    if aum is not None:
        if learn is not None or dl is not None:
            raise TypeError("give either a learner (find_label_issues(learn, dl)) or aum=..., not both")
        return _aum_issues(aum, n_issues, labels, pred_probs)
    if n_issues is not None: raise TypeError("n_issues=... goes with aum=... (the ranking it cuts)")
    if labels is not None or pred_probs is not None:
        if learn is not None or dl is not None:
            raise TypeError("give either a learner (find_label_issues(learn, dl)) or labels=... and pred_probs=..., "
                            "not both")
        if labels is None or pred_probs is None:
            raise TypeError("confident learning needs both labels=... and pred_probs=... (e.g. out_of_fold_probs)")
        labels_t = _as_label_tensor(labels).cpu().long()
        probs = torch.as_tensor(np.asarray(pred_probs.detach().cpu() if isinstance(pred_probs, torch.Tensor)
                                           else pred_probs), dtype=torch.float64)
        _check_probs(probs, labels_t)
        result = optional_import('cleanlab.filter', 'confident learning (find_label_issues(labels=..., pred_probs=...))',
                                 'cleanlab').find_label_issues(
            labels=labels_t.numpy(), pred_probs=probs.numpy(), filter_by=filter_by,
            return_indices_ranked_by=return_indices_ranked_by, n_jobs=n_jobs, **cleanlab_kwargs)
        return torch.from_numpy(np.asarray(result, dtype=bool if return_indices_ranked_by is None else np.int64))
    if learn is None:
        raise TypeError("find_label_issues needs a learner (find_label_issues(learn, dl)) or labels=... and "
                        "pred_probs=...")
    preds, targets, losses = get_preds(learn, dl=dl, with_loss=True)
    order = losses.argsort(descending=True, stable=True)
    predicted = preds.argmax(1) if isinstance(preds, torch.Tensor) and preds.ndim > 1 else preds
    ranked_labels = targets[order] if isinstance(targets, torch.Tensor) else [targets[int(i)] for i in order]
    issues = LabelIssues(order, losses[order], ranked_labels, predicted[order])
    if isinstance(preds, torch.Tensor) and preds.ndim == 2: issues.probs = preds[order]
    loader = learn.data.valid_dl if dl is None else dl
    issues.dataset = getattr(loader, 'dataset', None)
    issues.vocab = getattr(learn.data, 'vocab', None) or \
        (_vocab(issues.dataset) if issues.dataset is not None else None)
    return issues


def _aum_issues(aum: Any, n_issues: int | None, labels: Any, pred_probs: Any) -> torch.Tensor:
    scores = torch.as_tensor(np.asarray(aum.detach().cpu() if isinstance(aum, torch.Tensor) else aum))
    if scores.ndim != 1 or not scores.is_floating_point():
        raise TypeError(f"aum must be a 1-D float tensor of one score per item (AreaUnderMargin().scores), got "
                        f"dtype {scores.dtype} and shape {tuple(scores.shape)}")
    if n_issues is not None:
        if labels is not None or pred_probs is not None:
            raise TypeError("give n_issues=... or labels=... and pred_probs=... (confident learning's count), not both")
        if isinstance(n_issues, bool) or not isinstance(n_issues, int) or n_issues < 0:
            raise ValueError(f"n_issues must be an int >= 0, got {n_issues!r}")
    else:
        if labels is None or pred_probs is None:
            raise TypeError("find_label_issues(aum=...) needs the number of issues: n_issues=..., or labels=... and "
                            "pred_probs=... for the count confident learning estimates")
        labels_t = _as_label_tensor(labels).cpu().long()
        probs = torch.as_tensor(np.asarray(pred_probs.detach().cpu() if isinstance(pred_probs, torch.Tensor)
                                           else pred_probs), dtype=torch.float64)
        _check_probs(probs, labels_t)
        if len(labels_t) != len(scores):
            raise ValueError(f"aum has {len(scores)} scores but there are {len(labels_t)} labels; give both for the "
                             f"same items in the same order")
        n_issues = int(optional_import('cleanlab.count', 'the count of label issues (find_label_issues(aum=..., '
                                       'labels=..., pred_probs=...))', 'cleanlab').num_label_issues(
            labels=labels_t.numpy(), pred_probs=probs.numpy()))
    seen = (~scores.isnan()).nonzero().squeeze(1)
    return seen[scores[seen].argsort(stable=True)][:n_issues]


# ---- clean and retrain -----------------------------------------------------------------------------
class RelabeledDataset(torch.utils.data.Dataset):
    """A view of a map-style `(x, y)` dataset with new labels: item i is `(data[i][0], targets[i])`."""

    def __init__(self, data: Any, targets: torch.Tensor):
        if len(targets) != len(data):
            raise ValueError(f"{len(targets)} new labels for a dataset of {len(data)} items")
        self.data, self.targets = data, targets
        self.classes = getattr(data, 'classes', None) or _vocab(data)

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> tuple[Any, Any]:
        return self.data[i][0], self.targets[i]


def clean_dataset(data: Any, is_issue: Any, action: str = 'drop', pred_probs: Any = None) -> Any:
    """The dataset without its flagged items (`action='drop'`, a `Subset`) or with them relabelled as predicted.

    `is_issue` is a boolean mask over the items (`find_label_issues(labels=..., pred_probs=...)`);
    'relabel' needs `pred_probs` and returns a `RelabeledDataset`. `data` is left unchanged.
    """
    mask = torch.as_tensor(np.asarray(is_issue.cpu() if isinstance(is_issue, torch.Tensor) else is_issue))
    if mask.dtype != torch.bool or mask.shape != (len(data),):
        raise ValueError(f"is_issue must be a boolean mask with one entry per item ({len(data)}), got dtype "
                         f"{mask.dtype} and shape {tuple(mask.shape)}; pass find_label_issues(labels=..., "
                         f"pred_probs=...) without return_indices_ranked_by")
    if action == 'drop': return Subset(data, (~mask).nonzero().squeeze(1).tolist())
    if action != 'relabel': raise ValueError(f"action must be 'drop' or 'relabel', got {action!r}")
    if pred_probs is None: raise ValueError("action='relabel' needs pred_probs=... to take the predicted classes from")
    probs = torch.as_tensor(np.asarray(pred_probs.cpu() if isinstance(pred_probs, torch.Tensor) else pred_probs))
    labels = dataset_labels(data)
    _check_probs(probs, labels)
    return RelabeledDataset(data, torch.where(mask, probs.argmax(1), labels))
