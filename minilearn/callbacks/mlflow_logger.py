"""MLflowCallback: a fit's hyper-parameters, epoch rows, per-step losses, status and files in an MLflow run.

It follows the logger protocol of `callbacks/loggers.py` and talks to MLflow through its client
(`MlflowClient`), never through the fluent API (`mlflow.start_run`), whose one active run per process is how
several fits in a notebook end up in one run. Each fit opens a new run, unless it continues one: the run
named by `run_id`, or, when a fit resumes from a checkpoint (`fit(resume=...)`, `minilearn train --resume`),
the run whose id that checkpoint holds (this callback's `state_dict`), so an interrupted run is continued
instead of split in two (Lightning #6205). A continued run never takes a second value at a step it has
(wandb #1626 drops them silently; here a warning names them), nor a new value for a parameter it has.
Names and values MLflow would reject are made acceptable (characters, lengths, nesting), never dropped.
"""
from __future__ import annotations

import re
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core import optional_import
from .checkpoint import CheckpointCallback, SaveModelCallback
from .loggers import LoggerCallback

__all__ = ['MLflowCallback', 'mlflow_params', 'MLFLOW_STATUS']

MLFLOW_STATUS = {'finished': 'FINISHED', 'failed': 'FAILED', 'interrupted': 'KILLED'}
# MLflow's limits (mlflow.utils.validation): name length, parameter and tag value length, entities per call.
_MAX_KEY, _MAX_PARAM_VALUE, _MAX_TAG_VALUE = 250, 6000, 8000
_MAX_PARAMS_PER_CALL, _MAX_METRICS_PER_CALL = 100, 1000
_BAD_KEY_CHARACTER = re.compile(r'[^\w.\- ]')  # MLflow's rule, less '/' and ':' (paths and Windows)


def _shortened(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 3] + '...'


def _key(name: str) -> str:
    """`name` as MLflow accepts it: letters, digits, `_ - . space`, at most 250 characters, not a path."""
    key = _BAD_KEY_CHARACTER.sub('_', str(name)).strip() or '_'
    if key.startswith('.'): key = '_' + key
    return _shortened(key, _MAX_KEY)


def mlflow_params(params: Mapping[str, Any], prefix: str = '') -> dict[str, str]:
    """`params` as MLflow parameters: nested mappings flattened (`a.b`), names made valid, values as text of at
    most 6000 characters (MLflow's limits)."""
    flat: dict[str, str] = {}
    for name, value in params.items():
        key = f'{prefix}{name}'
        if isinstance(value, Mapping): flat.update(mlflow_params(value, f'{key}.'))
        else: flat[_key(key)] = _shortened(str(value), _MAX_PARAM_VALUE)
    return flat


class MLflowCallback(LoggerCallback):
    """Log each fit to an MLflow run: hyper-parameters, every AvgStats column per epoch (step = epoch index), the
    training loss and lr per batch (`train_loss_step`, `lr_group<k>`; step = batches before it, from the
    Recorder), the status (`FINISHED`, `FAILED` with an `error` tag, `KILLED` on Ctrl-C or a signal) and files.

    `tracking_uri`: the store (None: MLflow's default, or `MLFLOW_TRACKING_URI`); `experiment`: its name (created
    when missing); `run_name`: the new runs' name; `run_id`: continue that run instead of opening one;
    `log_checkpoints`: keep the checkpoint files of the learner's CheckpointCallback and SaveModelCallback as
    artifacts at the end of the fit; `params`: more parameters to log with the learner's (nested ones flattened).
    After the fit, `run_id` names the run it logged to, and `log_artifact(path)` adds files to it.
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = 'minilearn', run_name: str | None = None,
                 run_id: str | None = None, log_checkpoints: bool = False, params: Mapping[str, Any] | None = None):
        # At construction, so that a missing mlflow fails before any training.
        tracking = optional_import('mlflow.tracking', 'MLflowCallback', 'mlflow')
        self._client_class = tracking.MlflowClient
        self._entities = optional_import('mlflow.entities', 'MLflowCallback', 'mlflow')
        for name, value in (('tracking_uri', tracking_uri), ('run_name', run_name), ('run_id', run_id)):
            if value is not None and (not isinstance(value, str) or not value):
                raise TypeError(f"MLflowCallback: {name} must be a non-empty string or None, got {value!r}")
        if not isinstance(experiment, str) or not experiment:
            raise TypeError(f"MLflowCallback: experiment must be a non-empty name, got {experiment!r}")
        if params is not None and not isinstance(params, Mapping):
            raise TypeError(f"MLflowCallback: params must be a dict of names and values, got {type(params).__name__}")
        self.tracking_uri, self.experiment, self.run_name = tracking_uri, experiment, run_name
        self.log_checkpoints, self.extra_params = bool(log_checkpoints), dict(params or {})
        self._requested_run_id = run_id
        self.run_id: str | None = run_id  # the run logged to (the last fit's, once it has begun)
        self._loaded_run_id: str | None = None  # from a checkpoint: continued when the fit resumes
        self.client = None

    @property
    def name(self) -> str:
        """`learn.mlflow`."""
        return 'mlflow'

    # ---- checkpoints: a resumed fit finds its run --------------------------------------------------------
    def state_dict(self) -> dict:
        """The id of the run being logged to, so that a fit resumed from this checkpoint continues it."""
        return {'run_id': self.run_id}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned: a resumed fit continues that run."""
        self._loaded_run_id = state.get('run_id')

    # ---- the logger protocol -----------------------------------------------------------------------------
    def open(self) -> None:
        loaded, self._loaded_run_id = self._loaded_run_id, None
        run_id = self._requested_run_id or (loaded if self.run.position.resuming else None)
        self.client = self._client_class(self.tracking_uri)
        self._logged_params: dict[str, str] = {}
        self._last_steps: dict[str, int] = {}  # per metric, the last step the run holds
        if run_id is None:
            self.run_id = self.client.create_run(self._experiment_id(), run_name=self.run_name).info.run_id
            return
        try:
            run = self.client.get_run(run_id)
        except Exception as e:
            raise ValueError(f"MLflowCallback: cannot continue run {run_id!r} of {self.client.tracking_uri}: "
                             f"{' '.join(str(e).split())[:300]}; give its store as tracking_uri, or run_id=None "
                             f"for a new run") from e
        self.client.update_run(run_id, status='RUNNING')
        self.run_id, self._logged_params = run_id, dict(run.data.params)
        for key in run.data.metrics:
            self._last_steps[key] = max(m.step for m in self.client.get_metric_history(run_id, key))

    def _experiment_id(self) -> str:
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None: return self.client.create_experiment(self.experiment)
        if experiment.lifecycle_stage != 'active':
            raise ValueError(f"MLflowCallback: experiment {self.experiment!r} is deleted in "
                             f"{self.client.tracking_uri}; restore it or choose another name")
        return experiment.experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        new = mlflow_params({**params, **self.extra_params})
        changed = sorted(k for k, v in new.items() if k in self._logged_params and self._logged_params[k] != v)
        if changed:
            warnings.warn(f"MLflowCallback: run {self.run_id} keeps the values it has of {', '.join(changed)} "
                          f"(MLflow does not change a parameter); this fit's differ", stacklevel=2)
        todo = [self._entities.Param(k, v) for k, v in new.items() if k not in self._logged_params]
        for i in range(0, len(todo), _MAX_PARAMS_PER_CALL):
            self.client.log_batch(self.run_id, params=todo[i:i + _MAX_PARAMS_PER_CALL])
        self._logged_params.update(new)

    def log_epoch(self, row: dict[str, Any], step: int) -> None:
        self._log_metrics({k: [v] for k, v in row.items() if k != 'epoch' and v is not None}, step)

    def log_steps(self, values: dict[str, list[float]], first_step: int) -> None:
        self._log_metrics({('train_loss_step' if k == 'loss_step' else k): v for k, v in values.items()}, first_step)

    def _log_metrics(self, series: dict[str, list[float]], first_step: int) -> None:
        now, metrics, skipped = int(time.time() * 1000), [], []
        for name, values in series.items():
            key, last = _key(name), None
            for step, value in enumerate(values, start=first_step):
                if step <= self._last_steps.get(key, -1):
                    skipped.append(f'{key}@{step}')
                    continue
                metrics.append(self._entities.Metric(key, float(value), now, step))
                last = step
            if last is not None: self._last_steps[key] = last
        if skipped:
            warnings.warn(f"MLflowCallback: run {self.run_id} has values at these steps already, kept instead of "
                          f"this fit's (steps never go back): {', '.join(skipped[:10])}"
                          f"{' ...' if len(skipped) > 10 else ''}", stacklevel=2)
        for i in range(0, len(metrics), _MAX_METRICS_PER_CALL):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + _MAX_METRICS_PER_CALL])

    def log_status(self, status: str, error: BaseException | None) -> None:
        if self.log_checkpoints:
            for path in self._checkpoint_files(): self.log_artifact(path)
        if error is not None:
            text = f'{type(error).__name__}: {error}'.strip()
            self.client.set_tag(self.run_id, 'error', _shortened(' '.join(text.split()), _MAX_TAG_VALUE))
        self.client.set_terminated(self.run_id, MLFLOW_STATUS[status])

    def _checkpoint_files(self) -> list[Path]:
        files = []
        checkpoint = self.run.find_cb(CheckpointCallback)
        if checkpoint is not None and checkpoint.written is not None: files.append(Path(checkpoint.written))
        best = self.run.find_cb(SaveModelCallback)
        if best is not None and not best.every_epoch:
            files.append(Path(self.run.path) / self.run.model_dir / f'{best.fname}.pth')
        return [f for f in files if f.is_file()]

    def log_artifact(self, path: str | Path, folder: str | None = None) -> None:
        """Keep the file `path` with the run (under `folder` of its artifacts); also once the fit is over."""
        if self.run_id is None: raise ValueError("MLflowCallback.log_artifact: no run yet (fit first)")
        if not Path(path).is_file(): raise FileNotFoundError(f"MLflowCallback.log_artifact: no file {path}")
        client = self.client or self._client_class(self.tracking_uri)
        client.log_artifact(self.run_id, str(path), folder)

    def close(self) -> None:
        pass  # the client holds no open run: set_terminated ended it
