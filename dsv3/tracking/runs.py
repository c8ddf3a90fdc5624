"""Runs, params, metrics, artifacts and model URIs: the MLflow calls every stage makes (see the package docstring)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.tracking import MlflowClient

from dsv3.config_base import flatten

EXPERIMENT_KIND_TAG, MODEL_TRAINING = "mlflow.experimentKind", "custom_model_development"  # the MLflow 3 UI's training view

DEFAULT_URI = "sqlite:///mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"
MAX_PARAM_LEN = 6000


_EXPLICIT_URI: str | None = None  # the URI a config named explicitly in the last `setup`


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI in force: explicit (argument, else the last `setup`'s) >
    $MLFLOW_TRACKING_URI > sqlite:///mlruns.db."""
    return uri or _EXPLICIT_URI or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _artifact_location(uri: str, artifact_location: str | None) -> str | None:
    if artifact_location:
        return artifact_location if "://" in artifact_location else Path(artifact_location).resolve().as_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.resolve().parent / DEFAULT_ARTIFACTS).as_uri()
    return None  # a server decides


def setup(uri: str | None = None, experiment: str = "dsv3", artifact_location: str | None = None) -> str:
    """Point mlflow at the store and make sure the experiment exists (tagged as a model-training
    experiment, see registry.mark_model_training); returns its id."""
    global _EXPLICIT_URI
    _EXPLICIT_URI = uri
    u = tracking_uri(uri)
    mlflow.set_tracking_uri(u)
    client = MlflowClient(u)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        try:
            eid = client.create_experiment(experiment, artifact_location=_artifact_location(u, artifact_location))
        except mlflow.exceptions.MlflowException:  # created concurrently
            eid = client.get_experiment_by_name(experiment).experiment_id
    else:
        eid = exp.experiment_id
    if exp is None or EXPERIMENT_KIND_TAG not in exp.tags:  # the MLflow 3 UI's training view
        client.set_experiment_tag(eid, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    mlflow.set_experiment(experiment_id=eid)
    return eid


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _params_of(cfg_or_params: Any) -> dict[str, Any]:
    return {} if cfg_or_params is None else flatten(cfg_or_params)


def _tracking_cfg(cfg: Any) -> tuple[str | None, str, str | None]:
    t = getattr(cfg, "tracking", None)
    if t is None:
        return None, "dsv3", None
    return t.tracking_uri, t.experiment, t.artifact_location


@contextlib.contextmanager
def start_run(cfg_or_params: Any = None, stage: str = "run", run_name: str | None = None,
              parent_run_id: str | None = None, tags: dict[str, Any] | None = None,
              system_metrics: bool = False, experiment: str | None = None,
              run_id: str | None = None) -> Iterator[Any]:
    """Start (and end) an MLflow run for one stage; yields the `mlflow.ActiveRun`.

    `cfg_or_params`: a RunConfig (tracking section honoured, `flatten()` logged) or a dict.
    Nested runs: pass `parent_run_id`; an already active run is also accepted as parent.
    `run_id`: continue that run (a resumed training stage) when it exists in the store.
    """
    uri, exp_name, art = _tracking_cfg(cfg_or_params)
    setup(uri, experiment or exp_name, art)
    all_tags = {"stage": stage}
    commit = git_commit()
    if commit:
        all_tags["git_commit"] = commit
        all_tags["mlflow.source.git.commit"] = commit
    if os.environ.get("PREFECT__FLOW_RUN_ID"):
        all_tags["prefect_flow_run_id"] = os.environ["PREFECT__FLOW_RUN_ID"]
    all_tags.update({k: str(v) for k, v in (tags or {}).items() if v is not None})
    if run_id is not None:
        try:
            MlflowClient(tracking_uri(uri)).get_run(run_id)
        except mlflow.exceptions.MlflowException:
            run_id = None  # another store: start a new run
    nested = parent_run_id is not None or mlflow.active_run() is not None
    kw = {"run_id": run_id} if run_id else {"run_name": run_name or stage, "parent_run_id": parent_run_id}
    with mlflow.start_run(nested=nested, tags=all_tags, log_system_metrics=system_metrics, **kw) as run:
        params = _params_of(cfg_or_params)
        if params:
            log_params(params)
        yield run


def active_run_id() -> str | None:
    r = mlflow.active_run()
    return r.info.run_id if r else None


def log_params(params: dict[str, Any]) -> None:
    if mlflow.active_run() is None:
        return
    items = [(k, "None" if v is None else str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        try:
            mlflow.log_params(dict(items[i:i + 100]))
        except mlflow.exceptions.MlflowException:  # a resumed run with a changed value: keep the first
            for k, v in items[i:i + 100]:
                with contextlib.suppress(mlflow.exceptions.MlflowException):
                    mlflow.log_param(k, v)


def log_metrics(metrics: dict[str, float], step: int | None = None) -> None:
    if mlflow.active_run() is None or not metrics:
        return
    clean = {k: float(v) for k, v in metrics.items() if v is not None}
    mlflow.log_metrics(clean, step=step)


def set_tags(tags: dict[str, Any]) -> None:
    if mlflow.active_run() is not None:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file or a directory (its contents go under `artifact_path`)."""
    if mlflow.active_run() is None:
        return
    p = Path(path)
    if p.is_dir():
        mlflow.log_artifacts(str(p), artifact_path=artifact_path)
    else:
        mlflow.log_artifact(str(p), artifact_path=artifact_path)


def log_figure(fig: Any, path: str) -> None:
    if mlflow.active_run() is not None:
        mlflow.log_figure(fig, path)


def log_dataset_input(digest: str, name: str, source: str, context: str = "training") -> None:
    """Record the dataset (e.g. DVC-tracked shards, `digest` = DVC md5) as a run input."""
    if mlflow.active_run() is None:
        return
    import warnings

    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "can be interpreted in multiple ways" for local paths
        src = resolve_dataset_source(str(Path(source).resolve()) if "://" not in source else source)
    mlflow.log_input(MetaDataset(source=src, name=name, digest=str(digest)[:36]), context=context)
    mlflow.set_tag("dvc_data_digest", digest)


def run_info(run_id: str) -> Any:
    """The MlflowClient view of a run (metrics, params, tags): for tests and reports."""
    return MlflowClient(tracking_uri()).get_run(run_id)


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(tracking_uri()).get_metric_history(run_id, key)]
