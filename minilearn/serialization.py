"""Checkpoints for exact resume: atomic writes, and loads that never run code from the file.

A checkpoint (`learn.save`) is a dict of plain tensors and containers: `model` (state dict), `opt` (optimizer
state, None with `with_opt=False`) and `opt_class`, `epoch` and `iter` (the position: `iter` batches of epoch
`epoch` done; at an epoch's end `iter` is 0 and `epoch` the number of completed epochs, which resumes with
`fit(epochs, start_epoch=epoch)` too), `epochs` (of the fit that wrote it), `n_epochs`, `n_iter`,
`start_hypers` (the optimizer's hyper-parameters when that fit started, which its schedules put back at
`after_fit`: a resumed fit starts from them too), `callbacks` ({name: state} of every callback with a
`state_dict`), `loader` (the training loader's position, when it has a `state_dict`: the resumable loader
protocol), `rng` (torch, CUDA, numpy and python generator states) and `trainable` with `frozen_idx` (which
parameters train: the freeze state of `learn.freeze_to`).
`learn.load` restores all of it, the global random generators included, so that the resumed run draws what
the uninterrupted one would have; `fit(epochs, resume=path)` loads it and continues from its position.

Every checkpoint carries `checksum`, the SHA-256 of its contents (each tensor's dtype, shape and bytes, and every
other value, in order), checked on every load: the zip container torch writes has no check on tensor data, so a
flipped bit would otherwise load as other weights. A file kept with `keep=k` has its k - 1 predecessors beside
it (`name.1.pth` the previous, ...): `latest_checkpoint` falls back to them when the newest is corrupt.
"""
from __future__ import annotations

import contextlib
import copy
import errno
import hashlib
import glob
import os
import pickle
import pickletools
import random
import re
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import torch
from torch import nn

from .callback import Position, has_state
from .core import is_main_process, unwrap_partial
from .freeze import set_trainable_state, trainable_state

__all__ = ['CheckpointError', 'CorruptCheckpointError', 'checkpoint_path', 'atomic_write', 'kept_paths', 'safe_load',
           'save_learner', 'load_learner_state', 'ReadCheckpoint', 'read_checkpoint', 'latest_checkpoint',
           'load_for_resume', 'training_position', 'has_position', 'get_rng_states', 'set_rng_states', 'hyper_params',
           'checksum']

_FORMAT = 'minilearn-checkpoint'
_VERSION = 2  # 2: `checksum` (required from then on). `iter`, `epochs`, `loader`, `start_hypers` were added to 1
# without a new version: older files lack them (iter 0)
_MAX_LISTED = 10


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, is unsafe to read, or does not fit the learner."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint file that is truncated, or whose contents differ from what was written (its checksum)."""


# ---- paths and files --------------------------------------------------------------------------------
def checkpoint_path(learn: Any, path: str | Path) -> Path:
    """A bare name (no folder, no suffix) means `<learn.path>/<learn.model_dir>/<name>.pth`; a path is kept."""
    text = os.fspath(path)
    if not text: raise ValueError("checkpoint path must not be empty")
    is_bare = ('/' not in text and os.sep not in text and not Path(text).suffix and text not in ('.', '..'))
    return Path(learn.path) / learn.model_dir / f'{text}.pth' if is_bare else Path(text)


def kept_paths(path: str | Path, keep: int = 1) -> list[Path]:
    """`path` and the names of the `keep - 1` earlier versions `atomic_write(..., keep=keep)` keeps, newest first."""
    path = Path(path)
    return [path] + [path.with_name(f'{path.stem}.{i}{path.suffix}') for i in range(1, keep)]


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None], keep: int = 1) -> Path:
    """Write a file through `write(f)` so that readers see the old file or the complete new one, never a part;
    with `keep` > 1 the previous `keep - 1` versions stay beside it (`kept_paths`).

    A write that fails (a full disk, a file-size limit) raises an OSError naming the file and the cause, and
    leaves no temporary file behind and the previous versions as they were."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    # Same folder, so os.replace is an atomic rename on the same file system; unique so writers never collide.
    tmp = path.with_name(f'.{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')
    try:
        with open(tmp, 'xb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if keep > 1 and path.exists(): _keep_previous(kept_paths(path, keep))
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        cause = _write_error(e)
        if cause is None: raise
        raise OSError(cause.errno, f"could not write {str(path)!r}: {cause.strerror or cause} ({_hint(cause)}); "
                                   f"the previous file is unchanged and no temporary file is left", str(path)) from e
    _fsync_folder(path.parent)
    return path


def _write_error(e: BaseException) -> OSError | None:
    # torch.save reports a failed write of its zip writer as a RuntimeError; the OSError is its cause or context.
    while e is not None and not isinstance(e, OSError): e = e.__cause__ or e.__context__
    return e


def _hint(e: OSError) -> str:
    if e.errno in (errno.ENOSPC, errno.EDQUOT): return 'the disk is full: free space or write elsewhere'
    if e.errno == errno.EFBIG: return 'the file exceeds the file-size limit (ulimit -f) or the file system\'s'
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS): return 'no permission to write there'
    return errno.errorcode.get(e.errno, 'write failed')


def _keep_previous(paths: list[Path]) -> None:
    # Shift the kept versions one place older; the newest is linked (not moved) to its older name, so the file
    # under `paths[0]` exists at every moment until the new one replaces it.
    for newer, older in reversed(list(zip(paths[1:], paths[2:]))):
        if newer.exists(): os.replace(newer, older)
    link = paths[1].with_name(f'.{paths[1].name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp')
    try:
        os.link(paths[0], link)
        os.replace(link, paths[1])
    except OSError:  # no hard links on this file system: move it (a moment without the newest file)
        link.unlink(missing_ok=True)
        os.replace(paths[0], paths[1])


def _remove_stale_temporaries(path: Path) -> None:
    # Temporaries of earlier writes to `path` by processes that no longer exist (killed mid-save).
    pattern = re.compile(rf'\.{re.escape(path.name)}\.(\d+)\.[0-9a-f]{{8}}\.tmp')
    for candidate in path.parent.glob(f'.{glob.escape(path.name)}.*.tmp'):
        found = pattern.fullmatch(candidate.name)
        if found and not _process_alive(int(found.group(1))): candidate.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    if os.name == 'nt': return True  # os.kill would terminate the process there; keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # exists (another user's), or cannot tell: keep its file
    return True


def _fsync_folder(folder: Path) -> None:
    # Makes the rename itself durable; not possible everywhere (Windows), where it is skipped.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def safe_load(path: str | Path, map_location: Any = 'cpu') -> Any:
    """`torch.load(path, weights_only=True)`: tensors and plain containers only, clear errors naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {str(path)!r}" + ('' if path.parent.is_dir() else
                                f" (the folder {str(path.parent)!r} does not exist)"))
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.findall(r'\bGLOBAL ([\w.]+)', str(e)) or _pickled_globals(path)
        if found: raise CheckpointError(_unpickling_message(path, found)) from e
        raise CorruptCheckpointError(f"cannot read checkpoint {str(path)!r}: the file is corrupt, or not a PyTorch "
                                     f"checkpoint (the safe loader stopped on invalid data). Save it again, or use "
                                     f"an earlier checkpoint") from e
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError, UnicodeDecodeError,
            OverflowError, MemoryError, AttributeError) as e:
        detail = str(e).split('\n')[0][:200] or type(e).__name__
        raise CorruptCheckpointError(f"cannot read checkpoint {str(path)!r}: the file is corrupt: truncated or "
                                     f"corrupted, or not a PyTorch file ({detail}). Was it completely written and "
                                     f"copied? Save it again, or use an earlier checkpoint") from e


def _unpickling_message(path: Path, found: list[str]) -> str:
    return (f"refusing to load {str(path)!r}: it holds pickled Python objects ({', '.join(found[:3])}), and "
            f"unpickling them could run arbitrary code. minilearn only loads tensors and plain containers "
            f"(torch.load(weights_only=True)); checkpoints written by learn.save() are always loadable. "
            f"If you trust the file completely, convert it yourself with torch.load(..., weights_only=False).")


# ---- checksum -----------------------------------------------------------------------------------------
def checksum(state: Any) -> str:
    """SHA-256 (hex) of a checkpoint's contents: each tensor's dtype, shape and bytes, every other value's type
    and repr, containers with their keys and lengths, in order."""
    digest = hashlib.sha256()
    _feed(digest, state)
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach()
        digest.update(f'T{t.dtype}{tuple(t.shape)};'.encode())
        if t.numel(): digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        digest.update(f'D{len(value)};'.encode())
        for k, v in value.items():
            _feed(digest, k)
            _feed(digest, v)
    elif isinstance(value, (list, tuple)):
        digest.update(f'{type(value).__name__}{len(value)};'.encode())
        for v in value: _feed(digest, v)
    else:
        text = repr(value)
        digest.update(f'{type(value).__name__}{len(text)}:{text};'.encode())


def _check_checksum(ckpt: dict, path: Path) -> None:
    expected = ckpt.get('checksum')
    if expected is None and ckpt.get('version', 0) < 2: return  # written before checksums
    if not isinstance(expected, str) or checksum({k: v for k, v in ckpt.items() if k != 'checksum'}) != expected:
        raise CorruptCheckpointError(f"checkpoint {str(path)!r} is corrupt: its contents differ from the SHA-256 "
                                     f"checksum written with it (a flipped bit on the disk, in memory or in a copy); "
                                     f"nothing was loaded. Use an earlier checkpoint (CheckpointCallback(keep=2) "
                                     f"keeps one), or save again")


def _pickled_globals(path: Path) -> list[str]:
    """The classes/functions a raw pickle file refers to, found by reading its opcodes (nothing is executed)."""
    names, strings = [], []
    try:
        with open(path, 'rb') as f:
            for opcode, arg, _ in pickletools.genops(f):
                if opcode.name in ('GLOBAL', 'INST'): names.append(str(arg).replace(' ', '.'))
                elif opcode.name == 'STACK_GLOBAL' and len(strings) >= 2: names.append('.'.join(strings[-2:]))
                elif isinstance(arg, str): strings.append(arg)
    except Exception:  # not a pickle (a zip, garbage): report what was found up to there
        pass
    return list(dict.fromkeys(names))


# ---- random number generators -------------------------------------------------------------------------
def get_rng_states() -> dict:
    """The states of torch (CPU and every CUDA device), numpy and python's `random`, as plain tensors/containers."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, mt_state, gauss_next = random.getstate()
    return {'torch': torch.get_rng_state(),
            # Not initialised means no CUDA generator was used yet (and initialising would claim every GPU).
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else [],
            'numpy': {'kind': str(kind), 'keys': torch.from_numpy(keys.astype(np.int64)), 'pos': int(pos),
                      'has_gauss': int(has_gauss), 'cached_gaussian': float(cached_gaussian)},
            'python': {'version': int(version), 'state': torch.tensor(mt_state, dtype=torch.int64),
                       'gauss_next': gauss_next}}


def _rng_setters(states: dict) -> list[Callable[[], None]]:
    # Converted (and so checked) up front; calling the setters cannot fail halfway.
    setters = [lambda: torch.set_rng_state(states['torch'])]
    cuda_states = states.get('cuda') or []
    if cuda_states and torch.cuda.is_available():
        usable = cuda_states[:torch.cuda.device_count()]
        setters.append(lambda: [torch.cuda.set_rng_state(s, i) for i, s in enumerate(usable)])
    np_state = states['numpy']
    np_tuple = (np_state['kind'], np_state['keys'].numpy().astype(np.uint32), np_state['pos'],
                np_state['has_gauss'], np_state['cached_gaussian'])
    py_state = states['python']
    py_tuple = (py_state['version'], tuple(int(v) for v in py_state['state'].tolist()), py_state['gauss_next'])
    setters += [lambda: np.random.set_state(np_tuple), lambda: random.setstate(py_tuple)]
    return setters


def set_rng_states(states: dict) -> None:
    """Restore the generators saved by `get_rng_states` (CUDA only where available)."""
    for setter in _rng_setters(states): setter()


# ---- optimizer hyper-parameters ------------------------------------------------------------------------
def hyper_params(opt: Any) -> list[dict] | None:
    """Every param group's hyper-parameters (all its entries but `params`), copied; None without an optimizer."""
    if opt is None: return None
    return [{k: v.detach().clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v) for k, v in g.items()
             if k != 'params'} for g in opt.param_groups]


def _with_start_hypers(opt_state: dict, start: Any, path: Path) -> dict:
    # A resumed fit starts from the hyper-parameters the interrupted fit started with (its schedules set the
    # current ones before the next step), so that after_fit puts back what the uninterrupted fit puts back.
    groups = opt_state.get('param_groups', [])
    if not isinstance(start, list) or len(start) != len(groups) or not all(isinstance(h, dict) for h in start):
        raise CheckpointError(f"checkpoint {str(path)!r} has malformed start hyper-parameters ({len(groups)} param "
                              f"groups in the optimizer state)")
    return {**opt_state, 'param_groups': [{**g, **{k: v for k, v in h.items() if k in g}}
                                          for g, h in zip(groups, start)]}


# ---- save ---------------------------------------------------------------------------------------------
def _bare_model(model: nn.Module) -> nn.Module:
    """The user's module behind DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)): model = model.module
        elif isinstance(getattr(model, '_orig_mod', None), nn.Module): model = model._orig_mod
        else: return model


def _stateful_callbacks(learn: Any) -> dict[str, Any]:
    return {cb.name: cb for cb in learn.cbs if has_state(cb)}


def has_position(dl: Any) -> bool:
    """Whether a loader follows the resumable loader protocol (`state_dict`/`load_state_dict` of its position)."""
    return callable(getattr(dl, 'state_dict', None)) and callable(getattr(dl, 'load_state_dict', None))


def training_position(learn: Any) -> tuple[int, int]:
    """(epoch, batches of it done) a checkpoint written now resumes from: inside the training pass after a
    batch, else the number of completed epochs and 0."""
    if learn.in_train and learn.dl is learn.data.train_dl and 0 < learn.iter + 1 < learn.iters:
        return int(learn.epoch), int(learn.iter) + 1
    return int(learn.n_epochs), 0


def _rank_and_world() -> tuple[int, int]:
    # Before the process group exists (a resumed fit loads before DistributedCallback starts it): torchrun's env.
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized(): return dist.get_rank(), dist.get_world_size()
    return int(os.environ.get('RANK', 0)), int(os.environ.get('WORLD_SIZE', 1))


def rank_states(learn: Any) -> list[dict] | None:
    """Under DDP, every rank's RNG and callback states (a collective: every rank calls it); None otherwise.

    Ranks draw different random numbers and keep their own running sums and loss records, so an exact
    resume restores each rank's own; the weights, optimizer and position are the same on every rank.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1: return None
    states: list = [None] * dist.get_world_size()
    dist.all_gather_object(states, {'rng': get_rng_states(), 'callbacks': _callback_states(learn)})
    return states


def _callback_states(learn: Any) -> dict:
    return {name: cb.state_dict() for name, cb in _stateful_callbacks(learn).items()}


def save_learner(learn: Any, path: str | Path, with_opt: bool = True, ranks: list[dict] | None = None,
                 keep: int = 1) -> Path:
    """Write model, optimizer, position, callback, loader and RNG states atomically (rank 0 only); returns the path.

    `ranks` (from `rank_states`) adds every rank's own RNG and callback states; `keep` > 1 keeps the previous
    `keep - 1` checkpoints beside it (`kept_paths`).
    """
    path = checkpoint_path(learn, path)
    if not is_main_process(): return path
    opt = learn.opt if with_opt else None
    epoch, it = training_position(learn)
    dl = learn.data.train_dl
    state = {'format': _FORMAT, 'version': _VERSION,
             'model': _bare_model(learn.model).state_dict(),
             'opt': None if opt is None else opt.state_dict(),
             'opt_class': None if opt is None else type(opt).__name__,
             'epoch': epoch, 'iter': it, 'epochs': int(learn.epochs),
             'n_epochs': float(learn.n_epochs), 'n_iter': int(learn.n_iter),
             'start_hypers': None if opt is None else getattr(learn, 'start_hypers', None),
             'callbacks': _callback_states(learn),
             'loader': dl.state_dict() if has_position(dl) else None,
             'rng': get_rng_states(), 'ranks': ranks,
             'trainable': trainable_state(_bare_model(learn.model)), 'frozen_idx': int(getattr(learn, 'frozen_idx', 0))}
    state['checksum'] = checksum(state)
    return atomic_write(path, lambda f: torch.save(state, f), keep=keep)


# ---- load ---------------------------------------------------------------------------------------------
def listed(items: list[str]) -> str:
    """The first names of a long list, and how many more there are."""
    shown = ', '.join(items[:_MAX_LISTED])
    return shown + (f' (+{len(items) - _MAX_LISTED} more)' if len(items) > _MAX_LISTED else '')


def is_tensor_dict(state: Any) -> bool:
    """Whether `state` is a state dict: a dict of tensors."""
    return isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())


def state_differences(expected: dict, state: dict, keys: list[str],
                      names: tuple[str, str] = ('checkpoint', 'model')) -> tuple[list[str], list[str], list[str]]:
    """What keeps `state` from loading into a module whose state dict is `expected`: the `keys` missing from it,
    its keys the module lacks, and the shape mismatches among `keys` ('name: <file> (...) vs <module> (...)')."""
    missing = [k for k in keys if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f'{k}: {names[0]} {tuple(state[k].shape)} vs {names[1]} {tuple(expected[k].shape)}'
                  for k in keys if k in state and state[k].shape != expected[k].shape]
    return missing, unexpected, mismatched


def _check_model_state(model: nn.Module, state: Any, strict: bool, path: Path) -> None:
    if not is_tensor_dict(state):
        raise CheckpointError(f"checkpoint {str(path)!r} has no valid model state (a dict of tensors)")
    expected = model.state_dict()
    missing, unexpected, mismatched = state_differences(expected, state, list(expected))
    problems = []
    if strict and missing: problems.append(f"missing keys (in the model, not in the file): {listed(missing)}")
    if strict and unexpected: problems.append(f"unexpected keys (in the file, not in the model): {listed(unexpected)}")
    if mismatched: problems.append(f"shape mismatches: {listed(mismatched)}")
    if problems:
        hint = ("Build the learner with the model architecture the checkpoint was saved from"
                + (", or pass strict=False to load only the matching keys." if not mismatched else "."))
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model ({type(model).__name__}); "
                              f"the learner is unchanged. " + '; '.join(problems) + '. ' + hint)


def _check_format(ckpt: Any, path: Path) -> None:
    if not isinstance(ckpt, dict) or ckpt.get('format') != _FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a minilearn checkpoint written by learn.save() (for a bare "
                              f"state_dict use learn.model.load_state_dict(torch.load(path, weights_only=True)))")
    version = ckpt.get('version', 0)
    if not isinstance(version, int) or version > _VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {version!r}, newer than this "
                              f"minilearn reads ({_VERSION}); upgrade minilearn")
    _check_checksum(ckpt, path)


def _optimizer_to_load(learn: Any, ckpt: dict, with_opt: bool, path: Path) -> dict | None:
    if not with_opt: return None
    if ckpt.get('opt') is None:
        warnings.warn(f"checkpoint {str(path)!r} holds no optimizer state (saved with with_opt=False); "
                      f"the optimizer is left as it is", stacklevel=5)
        return None
    opt_class = type(learn.opt).__name__ if learn.opt is not None else _class_name(learn.opt_func)
    if opt_class is not None and opt_class != ckpt['opt_class']:
        raise CheckpointError(f"checkpoint {str(path)!r} holds the state of a {ckpt['opt_class']} optimizer, this "
                              f"learner uses {opt_class}; use the same opt_func, or load with with_opt=False")
    return ckpt['opt']


def _class_name(opt_func: Any) -> str | None:
    opt_func = unwrap_partial(opt_func)
    return opt_func.__name__ if isinstance(opt_func, type) else None  # a factory function: checked by loading


def _rng_to_restore(ckpt: dict, path: Path) -> list[Callable[[], None]]:
    if not ckpt.get('rng'): return []
    try:
        return _rng_setters(ckpt['rng'])
    except (KeyError, TypeError, AttributeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {str(path)!r} has malformed random-generator states ({e!r})") from e


def _loader_to_load(learn: Any, ckpt: dict, path: Path, resume: bool) -> dict | None:
    # A resume inside an epoch needs the loader at that batch; a plain load only restores what fits, at the
    # start of the epoch (its next fit counts whole epochs).
    state, it, dl = ckpt.get('loader'), int(ckpt.get('iter', 0)) if resume else 0, learn.data.train_dl
    if it and not has_position(dl):
        raise CheckpointError(f"checkpoint {str(path)!r} was written inside epoch {ckpt['epoch']} ({it} batches done), "
                              f"but this training loader ({type(dl).__name__}) cannot start at a batch: it has no "
                              f"load_state_dict. Build the data with DataBunch.from_datasets or get_dls "
                              f"(a ResumableLoader), or DataBunch.from_tensors")
    if it and (state is None or state.get('batches_done', it) != it):
        found = 'no training loader position' if state is None else f"a loader at batch {state['batches_done']}"
        raise CheckpointError(f"checkpoint {str(path)!r} was written inside epoch {ckpt['epoch']} ({it} batches done) "
                              f"but holds {found}: the loop could not continue where the loader starts. Resume "
                              f"from a checkpoint written by CheckpointCallback or learn.save() during the fit")
    if state is None or not has_position(dl): return None
    if not resume and state.get('batches_done'):
        state = {**state, 'batches_done': 0}  # a plain load's next fit reads that epoch whole, from its first batch
    try:
        _check_loader_state(dl, state)
    except (KeyError, ValueError, TypeError) as e:
        if it: raise CheckpointError(f"checkpoint {str(path)!r} does not fit this training loader: {e}") from e
        warnings.warn(f"checkpoint {str(path)!r}: the training loader's position is not restored ({e})", stacklevel=5)
        return None
    return state


def _check_loader_state(dl: Any, state: dict) -> None:
    # Loads `state` and puts the loader's own back: the loader's checks run, nothing changes.
    previous = dl.state_dict()
    dl.load_state_dict(state)
    dl.load_state_dict(previous)


def _check_resume_args(ckpt: dict, path: Path, epochs: int, start_epoch: int, reset_opt: bool,
                       finished_ok: bool = False) -> tuple[int, int]:
    if start_epoch:
        raise ValueError(f"fit(resume=...) continues from the checkpoint's own position; leave start_epoch out "
                         f"(got start_epoch={start_epoch})")
    if reset_opt: raise ValueError("fit(resume=...) restores the optimizer from the checkpoint; leave reset_opt out")
    epoch, it = int(ckpt.get('epoch', 0)), int(ckpt.get('iter', 0))
    if epoch >= epochs and not (finished_ok and (epoch, it) == (epochs, 0)):
        raise ValueError(f"checkpoint {str(path)!r} was written after {epoch} completed epochs: fit({epochs}) has "
                         f"nothing left to train; give the total number of epochs of the run (more than {epoch})")
    written_for = ckpt.get('epochs')
    if written_for and written_for != epochs:
        warnings.warn(f"checkpoint {str(path)!r} was written by a fit of {written_for} epochs, resumed with "
                      f"{epochs}: schedules (one-cycle...) follow the new length, so the run differs from the "
                      f"original", stacklevel=5)
    return epoch, it


class ReadCheckpoint(NamedTuple):
    """A checkpoint file and what `read_checkpoint` read from it: `fit(resume=...)` takes it without reading again."""
    path: Path
    state: dict


def read_checkpoint(path: str | Path) -> ReadCheckpoint:
    """Read a checkpoint written by `learn.save` (format checked), to look at its position before resuming from it."""
    path = Path(path)
    state = safe_load(path)
    _check_format(state, path)
    return ReadCheckpoint(path, state)


def latest_checkpoint(path: str | Path, keep: int = 1) -> ReadCheckpoint | None:
    """The newest of `kept_paths(path, keep)` that reads and is intact; None when none exists. A corrupt one is
    passed over with a warning naming it; CorruptCheckpointError when every one there is corrupt."""
    corrupt = []
    for candidate in kept_paths(path, keep):
        if not candidate.is_file(): continue
        try:
            found = read_checkpoint(candidate)
        except CorruptCheckpointError as e:
            corrupt.append(e)
            continue
        if corrupt:
            warnings.warn(f"{corrupt[0]}; resuming from the previous checkpoint {str(candidate)!r} instead",
                          stacklevel=2)
        return found
    if corrupt:
        raise CorruptCheckpointError(f"no intact checkpoint to resume from: " + '; '.join(map(str, corrupt)))
    return None


def load_for_resume(learn: Any, resume: str | Path | ReadCheckpoint, epochs: int, start_epoch: int = 0,
                    reset_opt: bool = False, finished_ok: bool = False) -> Position:
    """Load a checkpoint (a path, or one already read) for `learn.fit(epochs, resume=...)`; returns the `Position`
    the fit starts at: the checkpoint's epoch and batches done of it, where the training loader it loaded stands.
    With `finished_ok`, a checkpoint written at the end of the last epoch is loaded too (nothing is left to run)."""
    path, ckpt = resume if isinstance(resume, ReadCheckpoint) else read_checkpoint(checkpoint_path(learn, resume))
    epoch, it = _check_resume_args(ckpt, path, epochs, start_epoch, reset_opt, finished_ok)
    _load_checkpoint(learn, ckpt, path, with_opt=True, strict=True, resume=True)
    return Position(epoch, it)


def load_learner_state(learn: Any, path: str | Path, with_opt: bool = True, strict: bool = True) -> None:
    """Restore a checkpoint written by `save_learner`; everything is checked first, so on error nothing changed."""
    path = checkpoint_path(learn, path)
    ckpt = safe_load(path)
    _check_format(ckpt, path)
    if ckpt.get('iter'):
        warnings.warn(f"checkpoint {str(path)!r} was written inside epoch {ckpt['epoch']} ({ckpt['iter']} batches "
                      f"done): continue it with learn.fit(epochs, resume=path), which starts at that batch (after "
                      f"this load, the training loader is at the start of epoch {ckpt['epoch']})", stacklevel=3)
    _load_checkpoint(learn, ckpt, path, with_opt=with_opt, strict=strict, resume=False)


def _this_rank(ckpt: dict, path: Path) -> dict:
    """The checkpoint with this rank's own RNG and callback states, when it holds every rank's."""
    ranks = ckpt.get('ranks')
    if not ranks: return ckpt
    rank, world = _rank_and_world()
    if world != len(ranks):
        warnings.warn(f"checkpoint {str(path)!r} was written by {len(ranks)} processes, this run has {world}: every "
                      f"rank gets rank 0's random-generator and callback states (the run is not an exact resume)",
                      stacklevel=5)
        return ckpt
    return {**ckpt, 'rng': ranks[rank]['rng'], 'callbacks': ranks[rank]['callbacks']}


def _load_checkpoint(learn: Any, ckpt: dict, path: Path, with_opt: bool, strict: bool, resume: bool) -> None:
    ckpt = _this_rank(ckpt, path)
    model = _bare_model(learn.model)
    _check_model_state(model, ckpt['model'], strict, path)
    trainable = _trainable_to_load(model, ckpt, path, strict)
    opt_state = _optimizer_to_load(learn, ckpt, with_opt, path)
    if resume and opt_state is not None and ckpt.get('start_hypers') is not None:
        opt_state = _with_start_hypers(opt_state, ckpt['start_hypers'], path)
    rng_setters = _rng_to_restore(ckpt, path)
    loader_state = _loader_to_load(learn, ckpt, path, resume)
    stateful = _stateful_callbacks(learn)
    cb_states = {}
    for name, state in ckpt.get('callbacks', {}).items():
        if name in stateful: cb_states[name] = state
        else: warnings.warn(f"checkpoint {str(path)!r} holds state for a callback {name!r} this learner does not "
                            f"have; skipped", stacklevel=4)
    _apply(learn, opt_state, {stateful[n]: s for n, s in cb_states.items()})
    # Checked above, so these cannot fail: shapes and keys match, the RNG states are converted, the loader
    # accepted its state.
    if loader_state is not None: learn.data.train_dl.load_state_dict(loader_state)
    model.load_state_dict(ckpt['model'], strict=strict)
    if trainable is not None:
        set_trainable_state(model, trainable)
        learn.frozen_idx = int(ckpt.get('frozen_idx', 0))
    learn.n_epochs, learn.n_iter = float(ckpt.get('n_epochs', 0.)), int(ckpt.get('n_iter', 0))
    for setter in rng_setters: setter()


def _trainable_to_load(model: nn.Module, ckpt: dict, path: Path, strict: bool) -> list[bool] | None:
    # Checkpoints older than the freeze state have none: the parameters keep theirs.
    trainable = ckpt.get('trainable')
    if trainable is None: return None
    n_params = sum(1 for _ in model.parameters())
    if len(trainable) != n_params:
        if not strict:
            warnings.warn(f"checkpoint {str(path)!r}: the freeze state ({len(trainable)} parameters) does not fit "
                          f"this model ({n_params}); not restored", stacklevel=5)
            return None
        raise CheckpointError(f"checkpoint {str(path)!r} has the freeze state of {len(trainable)} parameters, the "
                              f"model has {n_params}; build the learner with the architecture it was saved from")
    return [bool(t) for t in trainable]


def _apply(learn: Any, opt_state: dict | None, cb_states: dict) -> None:
    # Optimizer and callback states are loaded with their old state kept aside, put back if any load fails.
    previous_opt = learn.opt
    previous_opt_state = previous_opt.state_dict() if previous_opt is not None and opt_state is not None else None
    done = []
    try:
        if opt_state is not None:
            if learn.opt is None: learn.create_opt()
            learn.opt.load_state_dict(opt_state)
        for cb, state in cb_states.items():
            done.append((cb, cb.state_dict()))
            cb.load_state_dict(state)
    except Exception as e:
        for cb, old in reversed(done):
            with contextlib.suppress(Exception):  # the failing callback may refuse its own state too
                cb.load_state_dict(old)
        learn.opt = previous_opt
        if previous_opt_state is not None: previous_opt.load_state_dict(previous_opt_state)
        raise CheckpointError(f"could not restore the optimizer or callback state from the checkpoint: {e}; "
                              f"the learner is unchanged") from e
