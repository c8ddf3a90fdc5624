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
- Stage models are MLflow 3 logged models with a pyfunc flavour (pyfunc_model.py) that keep
  the HF directory as an artifact, registered with lineage tags and aliases (registry.py);
  `resolve_model_uri` turns a path, `runs:/` or `models:/` URI back into a local HF directory.
- Experiments are tagged as model training (`mlflow.experimentKind`), the MLflow 3 UI's
  training view rather than its GenAI / traces view.
- Submodules: registry.py (stage hand-off, aliases, eval linkage), pyfunc_model.py (the
  flavour), _pyfunc_entry.py (its models-from-code entry), lookup.py (what the lifecycle's cache
  asks the store; writes by run id), outbox.py (delivery to a tracking server that may go away; see
  runs.py). Only this package imports mlflow.
"""

from dsv3.tracking.runs import (  # noqa: F401
    DEFAULT_ARTIFACTS, DEFAULT_URI, MAX_PARAM_LEN, active_run_id, git_commit, log_artifact, log_dataset_input,
    log_figure, log_metrics, log_params, metric_history, run_info, set_tags, setup, start_run,
    tracking_uri)
from dsv3.tracking.registry import (  # noqa: F401
    CANDIDATE, CHAMPION, EXPERIMENT_KIND_TAG, LINEAGE_TAGS, MODEL_TRAINING, STAGES, ModelNotFound, StageModel,
    concrete_model_uri, config_digest, experiment_url, furthest_stage_model, hf_dir, lineage_tags, load_pyfunc,
    log_eval_metrics, mark_model_training, model_version, promote, register_model, register_stage_model, resolve_model_uri, require_stage_model,
    resolve_stage_model, stage_model_name)
from dsv3.tracking.lookup import (  # noqa: F401
    child_runs, experiment_id, find_model_version, find_run, log_artifact_to, log_metrics_to, model_files_exist, set_alias,
    set_run_tags, set_status, set_version_tags, ui_url)
