"""Runs, params, metrics, artifacts and model URIs: the MLflow calls every stage makes (see the package docstring).

Tracking server outages (tests/faults/test_tracking_outage.py)
- Against a server (http(s):// URI), `log_metrics`, `log_params` and `set_tags` never block a training
  step: they put the record (with its step and wall-clock time) into an in-process outbox that one
  daemon thread delivers in order (`MlflowClient.log_batch`). When the server is unreachable
  (connection refused/reset, timeout, 429/502/503/504) the thread keeps the records and retries with
  backoff (0.5 s doubling to 10 s); one warning per outage, one line when it is delivered again. A local
  store (SQLite, the default) is written synchronously as before: there is nothing to go away.
  `run_info` / `metric_history` deliver what is queued before they read; `flush()` does it on demand.
- Bounded: at most $DSV3_TRACKING_BUFFER records (default 100000) stay in memory; beyond that the
  oldest half is spilled to `$DSV3_CACHE_DIR/mlflow-outbox/*.jsonl` (default ~/.cache/dsv3/...).
- End of run: the outbox is flushed for up to $DSV3_TRACKING_FLUSH_S seconds (default 60), then the
  run is set FINISHED/FAILED (queued too when the server is still away). What is still undelivered is
  spilled to that folder with a warning naming the file; the next `start_run` against the same server
  sends it (`replay_spilled`). `log_artifact` / `log_figure` that fail on an unreachable server are
  queued the same way (by file path); `log_dataset_input` warns and goes on.
- `start_run` does not degrade: when the server cannot be reached it raises `TrackingError` naming the
  URI within a few seconds, before a step is run (so nothing is lost; start the server and rerun, or
  `--resume`). MLflow's own HTTP retries would stall for minutes (7 retries, backoff factor 2, 120 s
  timeout), so `setup` lowers its defaults for server URIs unless they are set in the environment:
  MLFLOW_HTTP_REQUEST_MAX_RETRIES=2, MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR=1, MLFLOW_HTTP_REQUEST_TIMEOUT=30.
- MLflow's system-metrics thread stops at the first failed request of an outage (MLflow's behaviour);
  the training metrics are what the outbox guarantees.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

import mlflow
from mlflow.tracking import MlflowClient

from dsv3.config_base import flatten
from dsv3.errors import TrackingError
from dsv3.tracking.outbox import OUTBOX, reason, replay_spilled, spill, spill_dir, transient

log = logging.getLogger("dsv3.tracking")

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


HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                 "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def _remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def setup(uri: str | None = None, experiment: str = "dsv3", artifact_location: str | None = None) -> str:
    """Point mlflow at the store and make sure the experiment exists (tagged as a model-training
    experiment, see registry.mark_model_training); returns its id. A server that cannot be reached
    raises TrackingError (module docstring)."""
    global _EXPLICIT_URI
    _EXPLICIT_URI = uri
    u = tracking_uri(uri)
    if _remote(u):
        for k, v in HTTP_DEFAULTS.items():
            os.environ.setdefault(k, v)
    mlflow.set_tracking_uri(u)
    try:
        return _ensure_experiment(u, experiment, artifact_location)
    except Exception as e:
        if _remote(u) and transient(e):
            raise TrackingError(f"MLflow tracking server {u} cannot be reached ({reason(e)}); start it "
                                f"(infra/mlflow.md) or point MLFLOW_TRACKING_URI at a reachable store; "
                                f"nothing was run") from None
        raise


def _ensure_experiment(u: str, experiment: str, artifact_location: str | None) -> str:
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
    u = tracking_uri(uri)
    try:
        if run_id is not None:
            try:
                MlflowClient(u).get_run(run_id)
            except mlflow.exceptions.MlflowException as e:
                if transient(e):
                    raise
                run_id = None  # another store: start a new run
        nested = parent_run_id is not None or mlflow.active_run() is not None
        kw = {"run_id": run_id} if run_id else {"run_name": run_name or stage, "parent_run_id": parent_run_id}
        run = mlflow.start_run(nested=nested, tags=all_tags, log_system_metrics=system_metrics, **kw)
    except Exception as e:
        if _remote(u) and transient(e):
            raise TrackingError(f"MLflow tracking server {u} cannot be reached ({reason(e)}) when starting "
                                f"the {stage} run; nothing was run") from None
        raise
    if _remote(u):
        replay_spilled(u)
    status = "FAILED"
    try:
        params = _params_of(cfg_or_params)
        if params:
            log_params(params)
        yield run
        status = "FINISHED"
    finally:
        _end_run(run.info.run_id, status, u)


def active_run_id() -> str | None:
    r = mlflow.active_run()
    return r.info.run_id if r else None


def log_params(params: dict[str, Any]) -> None:
    if mlflow.active_run() is None:
        return
    items = [(k, "None" if v is None else str(v)[:MAX_PARAM_LEN]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        if _queue("params", dict(items[i:i + 100])):
            continue
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
    if not _queue("metrics", clean, step=step):
        mlflow.log_metrics(clean, step=step)


def set_tags(tags: dict[str, Any]) -> None:
    if mlflow.active_run() is not None:
        clean = {k: str(v) for k, v in tags.items()}
        if not _queue("tags", clean):
            mlflow.set_tags(clean)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    """Log a file or a directory (its contents go under `artifact_path`)."""
    if mlflow.active_run() is None:
        return
    p = Path(path)
    try:
        if p.is_dir():
            mlflow.log_artifacts(str(p), artifact_path=artifact_path)
        else:
            mlflow.log_artifact(str(p), artifact_path=artifact_path)
    except Exception as e:
        if not (_remote(mlflow.get_tracking_uri()) and transient(e)):
            raise
        _queue("artifact", {"path": str(p.resolve()), "artifact_path": artifact_path})


def log_figure(fig: Any, path: str) -> None:
    if mlflow.active_run() is None:
        return
    try:
        mlflow.log_figure(fig, path)
    except Exception as e:
        if not (_remote(mlflow.get_tracking_uri()) and transient(e)):
            raise
        keep = spill_dir() / "files" / uuid.uuid4().hex / Path(path).name
        keep.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(keep)
        _queue("artifact", {"path": str(keep), "artifact_path": str(Path(path).parent) if "/" in path else None})


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
    try:
        mlflow.log_input(MetaDataset(source=src, name=name, digest=str(digest)[:36]), context=context)
        mlflow.set_tag("dvc_data_digest", digest)  # synchronous: registry.lineage_tags reads it back
    except Exception as e:
        if not (_remote(mlflow.get_tracking_uri()) and transient(e)):
            raise
        log.warning("MLflow server unreachable: dataset input %s not recorded (%s)", name, reason(e))
        set_tags({"dvc_data_digest": digest})


def run_info(run_id: str) -> Any:
    """The MlflowClient view of a run (metrics, params, tags): for tests and reports (after delivering
    what this process has queued)."""
    flush(5)
    return MlflowClient(tracking_uri()).get_run(run_id)


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    flush(5)
    return [(m.step, m.value) for m in MlflowClient(tracking_uri()).get_metric_history(run_id, key)]



# ---- server mode: the outbox (outbox.py) ------------------------------------------------------------
def _queue(kind: str, data: dict, step: int | None = None) -> bool:
    """Queue a record for the active run when tracking to a server; False: log it directly."""
    uri = mlflow.get_tracking_uri()
    if not _remote(uri):
        return False
    OUTBOX.put({"kind": kind, "uri": uri, "run_id": mlflow.active_run().info.run_id, "step": step,
                "ts": int(time.time() * 1000), "data": data})
    return True


def _end_run(run_id: str, status: str, uri: str) -> None:
    """End the run: deliver the outbox (bounded wait), then mark it FINISHED/FAILED; on a server that is
    still away the status is queued, and what cannot be delivered in time is spilled (never raises for that)."""
    active = mlflow.active_run()
    if active is None or active.info.run_id != run_id:
        return  # ended by the code inside
    if not _remote(uri):
        mlflow.end_run(status)
        return
    delivered = flush()
    try:
        mlflow.end_run(status)  # leaves the run locally first, then tells the server
    except Exception as e:
        if not transient(e):
            raise
        monitor = getattr(mlflow.tracking.fluent, "run_id_to_system_metrics_monitor", {}).pop(run_id, None)
        if monitor is not None:
            monitor.finish()
        OUTBOX.put({"kind": "terminate", "uri": uri, "run_id": run_id, "step": None,
                    "ts": int(time.time() * 1000), "data": {"status": status}})
        delivered = False
    if not delivered and not flush(min(5.0, float(os.environ.get("DSV3_TRACKING_FLUSH_S", "60")))):
        spill(OUTBOX.take_all(), "the server was still unreachable at the end of the run")


def flush(timeout_s: float | None = None) -> bool:
    """Deliver what this process has queued for a tracking server (at most `timeout_s`, default
    $DSV3_TRACKING_FLUSH_S or 60 s); False if some is still waiting."""
    if timeout_s is None:
        timeout_s = float(os.environ.get("DSV3_TRACKING_FLUSH_S", "60"))
    return OUTBOX.flush(timeout_s)
