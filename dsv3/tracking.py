"""MLflow tracking: the one module of dsv3 that imports mlflow.

Design choices
- Default store is local and zero-setup: `sqlite:///mlruns.db` (repo root / cwd) with
  artifacts under `./mlartifacts`; `MLFLOW_TRACKING_URI` (or `TrackingConfig.tracking_uri`)
  switches to a server. The experiment is created with an explicit artifact location so
  the SQLite store never writes into `./mlruns`.
- `start_run` is a context manager that logs the whole resolved config as params
  (`RunConfig.flatten()`), tags every run with its stage, git commit, and optional
  parent / Prefect ids, and can nest under a parent run (one parent per flow run, one
  child per stage).
- Every logging helper is a no-op when no run is active, so library code (e.g. a
  non-zero Ray rank) can call it unconditionally.
- The registry holds model versions whose source is the run's `model/` artifact folder
  (HF format directory); `resolve_model_uri` turns a path, `runs:/` or `models:/` URI
  back into a local HF directory.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.tracking import MlflowClient

DEFAULT_URI = "sqlite:///mlruns.db"
DEFAULT_ARTIFACTS = "mlartifacts"
MAX_PARAM_LEN = 6000


def tracking_uri(uri: str | None = None) -> str:
    """The tracking URI in force: explicit > $MLFLOW_TRACKING_URI > sqlite:///mlruns.db."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI


def _artifact_location(uri: str, artifact_location: str | None) -> str | None:
    if artifact_location:
        return artifact_location if "://" in artifact_location else Path(artifact_location).resolve().as_uri()
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        return (db.resolve().parent / DEFAULT_ARTIFACTS).as_uri()
    return None  # a server decides


def setup(uri: str | None = None, experiment: str = "dsv3", artifact_location: str | None = None) -> str:
    """Point mlflow at the store and make sure the experiment exists; returns its id."""
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
    if cfg_or_params is None:
        return {}
    if hasattr(cfg_or_params, "flatten"):
        return cfg_or_params.flatten()
    if hasattr(cfg_or_params, "model_dump"):
        return _flat(cfg_or_params.model_dump(mode="json"))
    return _flat(dict(cfg_or_params))


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flat(v, key))
        else:
            out[key] = v
    return out


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


def register_model(model_dir: str | Path, name: str, artifact_path: str = "model") -> str:
    """Log an HF-format directory under the active run and register it; returns the version."""
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("register_model needs an active run")
    mlflow.log_artifacts(str(model_dir), artifact_path=artifact_path)
    client = MlflowClient()
    try:
        client.create_registered_model(name)
    except mlflow.exceptions.MlflowException:
        pass  # exists already
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    mv = client.create_model_version(name, source=source, run_id=run.info.run_id)
    return str(mv.version)


def resolve_model_uri(uri: str | Path, dst: str | Path | None = None) -> str:
    """A local directory for a path, `runs:/<id>/<path>` or `models:/<name>/<version|latest>`."""
    s = str(uri)
    if "://" not in s and ":/" not in s:
        p = Path(s)
        if not p.exists():
            raise FileNotFoundError(f"model path {p} does not exist")
        return str(p)
    if s.startswith("models:/"):
        client = MlflowClient(tracking_uri())
        rest = s[len("models:/"):].strip("/")
        if "@" in rest:
            name, alias = rest.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, _, version = rest.partition("/")
            if version in ("", "latest"):
                versions = client.search_model_versions(f"name='{name}'")
                if not versions:
                    raise FileNotFoundError(f"no versions of registered model {name!r}")
                mv = max(versions, key=lambda v: int(v.version))
            else:
                mv = client.get_model_version(name, version)
        s = mv.source
    kw = {"dst_path": str(dst)} if dst else {}
    if s.startswith("file://"):
        local = Path(s[len("file://"):])
        if local.exists() and not dst:
            return str(local)
    return mlflow.artifacts.download_artifacts(artifact_uri=s, tracking_uri=tracking_uri(), **kw)


def model_version_info(uri: str) -> dict | None:
    """{name, version, run_id, source} of a `models:/name/version|latest` or `models:/name@alias`
    URI (None for other URIs): what a server logs about the model it serves."""
    s = str(uri)
    if not s.startswith("models:/"):
        return None
    client = MlflowClient(tracking_uri())
    rest = s[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    else:
        name, _, version = rest.partition("/")
        if version in ("", "latest"):
            versions = client.search_model_versions(f"name='{name}'")
            if not versions:
                raise FileNotFoundError(f"no versions of registered model {name!r}")
            mv = max(versions, key=lambda v: int(v.version))
        else:
            mv = client.get_model_version(name, version)
    return {"name": mv.name, "version": str(mv.version), "run_id": mv.run_id, "source": mv.source}


def run_info(run_id: str) -> Any:
    """The MlflowClient view of a run (metrics, params, tags): for tests and reports."""
    return MlflowClient(tracking_uri()).get_run(run_id)


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in MlflowClient(tracking_uri()).get_metric_history(run_id, key)]
