"""Finding what a lifecycle already made, and writing to runs that are not the active one.

The lifecycle's cache (dsv3/lifecycle/plan.py) asks the store, never the file system: a stage is
done when a *finished* run or a registered model version carries its key tag, so a wiped or
different store is never a false hit. These are the MLflow calls it needs, by run id / version
(no active run required): search by tags, tag a version or a run, log to a run, list a run's
children, and the UI link of the store.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dsv3.tracking.registry import StageModel, _stage_model, clean_tags
from dsv3.tracking.runs import tracking_uri


def _client() -> MlflowClient:
    return MlflowClient(tracking_uri())


def _quote(v: str) -> str:
    return "'" + str(v).replace("'", "\\'") + "'"


def experiment_id(name: str) -> str | None:
    exp = _client().get_experiment_by_name(name)
    return exp.experiment_id if exp else None


def find_run(tags: dict[str, str], experiment: str = "dsv3", status: str = "FINISHED") -> Any | None:
    """The newest run of `experiment` with every tag in `tags` and `status` (None: any), else None."""
    eid = experiment_id(experiment)
    if eid is None:
        return None
    flt = " and ".join([f"tags.`{k}` = {_quote(v)}" for k, v in tags.items()]
                       + ([f"attributes.status = {_quote(status)}"] if status else []))
    runs = _client().search_runs([eid], flt, order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def find_model_version(name: str, tags: dict[str, str]) -> StageModel | None:
    """The newest version of registered model `name` whose tags include `tags` and whose source
    run finished (a version of a crashed run is never reused), else None."""
    client = _client()
    try:
        versions = client.search_model_versions(f"name={_quote(name)}")
    except MlflowException:
        return None
    for mv in sorted(versions, key=lambda v: int(v.version), reverse=True):
        if all((mv.tags or {}).get(k) == v for k, v in tags.items()):
            try:
                if mv.run_id and client.get_run(mv.run_id).info.status != "FINISHED":
                    continue
            except MlflowException:
                continue
            return _stage_model(client.get_model_version(name, mv.version))  # with its aliases
    return None


def model_files_exist(uri: str) -> bool:
    """Whether a registered version's HF directory is still in the artifact store (a local store: the
    directory; a remote one: a non-empty listing), without downloading it."""
    import mlflow

    from dsv3.tracking.registry import _hf_source, model_version

    try:
        sm = model_version(uri)
        source = _hf_source(sm.model_id) if sm.model_id else _client().get_model_version(sm.name, sm.version).source
    except Exception:  # noqa: BLE001 - unreadable: not there
        return False
    if source.startswith("file://") or "://" not in source:
        return Path(source.removeprefix("file://")).is_dir()
    try:
        return bool(mlflow.artifacts.list_artifacts(artifact_uri=source, tracking_uri=tracking_uri()))
    except MlflowException:
        return False


def set_version_tags(name: str, version: str, tags: dict[str, Any]) -> None:
    client = _client()
    for k, v in clean_tags(tags).items():
        client.set_model_version_tag(name, str(version), k, v)


def set_alias(name: str, alias: str, version: str) -> None:
    _client().set_registered_model_alias(name, alias, str(version))


def set_run_tags(run_id: str, tags: dict[str, Any]) -> None:
    client = _client()
    for k, v in clean_tags(tags).items():
        client.set_tag(run_id, k, v)


def set_status(run_id: str, status: str) -> None:
    """Mark a run RUNNING again, or end it (FINISHED / FAILED / KILLED)."""
    client = _client()
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status)


def log_metrics_to(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    ms = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
    if ms:
        _client().log_batch(run_id, metrics=ms)


def log_artifact_to(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    p = Path(path)
    if p.is_dir():
        _client().log_artifacts(run_id, str(p), artifact_path)
    else:
        _client().log_artifact(run_id, str(p), artifact_path)


def child_runs(run_id: str) -> list[Any]:
    """The runs nested directly under `run_id`, oldest first."""
    client = _client()
    eid = client.get_run(run_id).info.experiment_id
    return client.search_runs([eid], f"tags.mlflow.parentRunId = {_quote(run_id)}",
                              order_by=["attributes.start_time ASC"])


def ui_url() -> str:
    """Where the MLflow UI of this store is: the tracking server itself, else $DSV3_MLFLOW_UI, else
    the `make mlflow-ui` address."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return uri.rstrip("/")
    return os.environ.get("DSV3_MLFLOW_UI", "http://127.0.0.1:5000").rstrip("/")
