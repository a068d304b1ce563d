"""Checkpoints for exact resume: atomic writes, and loads that never run code from the file.

A checkpoint (`learn.save`) is a dict of plain tensors and containers: `model` (state dict), `opt` (optimizer
state, None with `with_opt=False`) and `opt_class`, `epoch` and `iter` (the position: `iter` batches of epoch
`epoch` done; at an epoch's end `iter` is 0 and `epoch` the number of completed epochs, which resumes with
`fit(epochs, start_epoch=epoch)` too), `epochs` (of the fit that wrote it), `n_epochs`, `n_iter`, `callbacks`
({name: state} of every callback with a `state_dict`), `loader` (the training loader's position, when it has
a `state_dict`: the resumable loader protocol) and `rng` (torch, CUDA, numpy and python generator states).
`learn.load` restores all of it, the global random generators included, so that the resumed run draws what
the uninterrupted one would have; `fit(epochs, resume=path)` loads it and continues from its position.
"""
from __future__ import annotations

import contextlib
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

__all__ = ['CheckpointError', 'checkpoint_path', 'atomic_write', 'safe_load', 'save_learner', 'load_learner_state',
           'ReadCheckpoint', 'read_checkpoint', 'load_for_resume', 'training_position', 'has_position',
           'get_rng_states', 'set_rng_states']

_FORMAT = 'minilearn-checkpoint'
_VERSION = 1  # `iter`, `epochs` and `loader` were added without a new version: older files lack them (iter 0)
_MAX_LISTED = 10


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read, is unsafe to read, or does not fit the learner."""


# ---- paths and files --------------------------------------------------------------------------------
def checkpoint_path(learn: Any, path: str | Path) -> Path:
    """A bare name (no folder, no suffix) means `<learn.path>/<learn.model_dir>/<name>.pth`; a path is kept."""
    text = os.fspath(path)
    if not text: raise ValueError("checkpoint path must not be empty")
    is_bare = ('/' not in text and os.sep not in text and not Path(text).suffix and text not in ('.', '..'))
    return Path(learn.path) / learn.model_dir / f'{text}.pth' if is_bare else Path(text)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write a file through `write(f)` so that readers see the old file or the complete new one, never a part."""
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
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_folder(path.parent)
    return path


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
        raise CheckpointError(_unpickling_message(path, str(e))) from e
    except (RuntimeError, EOFError, ValueError, OSError, KeyError, IndexError, TypeError) as e:
        detail = str(e).split('\n')[0][:200] or type(e).__name__
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: the file is truncated or corrupted, or not a "
                              f"PyTorch file ({detail}). Was it completely written and copied? Save it again.") from e


def _unpickling_message(path: Path, message: str) -> str:
    found = re.findall(r'\bGLOBAL ([\w.]+)', message) or _pickled_globals(path)
    if found:
        return (f"refusing to load {str(path)!r}: it holds pickled Python objects ({', '.join(found[:3])}), and "
                f"unpickling them could run arbitrary code. minilearn only loads tensors and plain containers "
                f"(torch.load(weights_only=True)); checkpoints written by learn.save() are always loadable. "
                f"If you trust the file completely, convert it yourself with torch.load(..., weights_only=False).")
    return (f"cannot read checkpoint {str(path)!r}: the file is corrupted or not a PyTorch checkpoint "
            f"(the safe loader stopped on invalid data). Save it again.")


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


def save_learner(learn: Any, path: str | Path, with_opt: bool = True, ranks: list[dict] | None = None) -> Path:
    """Write model, optimizer, position, callback, loader and RNG states atomically (rank 0 only); returns the path.

    `ranks` (from `rank_states`) adds every rank's own RNG and callback states.
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
             'callbacks': _callback_states(learn),
             'loader': dl.state_dict() if has_position(dl) else None,
             'rng': get_rng_states(), 'ranks': ranks}
    return atomic_write(path, lambda f: torch.save(state, f))


# ---- load ---------------------------------------------------------------------------------------------
def _listed(items: list[str]) -> str:
    shown = ', '.join(items[:_MAX_LISTED])
    return shown + (f' (+{len(items) - _MAX_LISTED} more)' if len(items) > _MAX_LISTED else '')


def _check_model_state(model: nn.Module, state: Any, strict: bool, path: Path) -> None:
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {str(path)!r} has no valid model state (a dict of tensors)")
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f'{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}'
                  for k in expected if k in state and state[k].shape != expected[k].shape]
    problems = []
    if strict and missing: problems.append(f"missing keys (in the model, not in the file): {_listed(missing)}")
    if strict and unexpected: problems.append(f"unexpected keys (in the file, not in the model): {_listed(unexpected)}")
    if mismatched: problems.append(f"shape mismatches: {_listed(mismatched)}")
    if problems:
        hint = ("Build the learner with the model architecture the checkpoint was saved from"
                + (", or pass strict=False to load only the matching keys." if not mismatched else "."))
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model ({type(model).__name__}); "
                              f"the learner is unchanged. " + '; '.join(problems) + '. ' + hint)


def _check_format(ckpt: Any, path: Path) -> None:
    if not isinstance(ckpt, dict) or ckpt.get('format') != _FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a minilearn checkpoint written by learn.save() (for a bare "
                              f"state_dict use learn.model.load_state_dict(torch.load(path, weights_only=True)))")
    if ckpt.get('version', 0) > _VERSION:
        raise CheckpointError(f"checkpoint {str(path)!r} has format version {ckpt['version']}, newer than this "
                              f"minilearn reads ({_VERSION}); upgrade minilearn")


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


def _check_resume_args(ckpt: dict, path: Path, epochs: int, start_epoch: int, reset_opt: bool) -> tuple[int, int]:
    if start_epoch:
        raise ValueError(f"fit(resume=...) continues from the checkpoint's own position; leave start_epoch out "
                         f"(got start_epoch={start_epoch})")
    if reset_opt: raise ValueError("fit(resume=...) restores the optimizer from the checkpoint; leave reset_opt out")
    epoch, it = int(ckpt.get('epoch', 0)), int(ckpt.get('iter', 0))
    if epoch >= epochs:
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


def load_for_resume(learn: Any, resume: str | Path | ReadCheckpoint, epochs: int, start_epoch: int = 0,
                    reset_opt: bool = False) -> Position:
    """Load a checkpoint (a path, or one already read) for `learn.fit(epochs, resume=...)`; returns the `Position`
    the fit starts at: the checkpoint's epoch and batches done of it, where the training loader it loaded stands."""
    path, ckpt = resume if isinstance(resume, ReadCheckpoint) else read_checkpoint(checkpoint_path(learn, resume))
    epoch, it = _check_resume_args(ckpt, path, epochs, start_epoch, reset_opt)
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
    opt_state = _optimizer_to_load(learn, ckpt, with_opt, path)
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
    learn.n_epochs, learn.n_iter = float(ckpt.get('n_epochs', 0.)), int(ckpt.get('n_iter', 0))
    for setter in rng_setters: setter()


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
