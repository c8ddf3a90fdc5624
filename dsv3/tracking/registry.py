"""Stage hand-off through the MLflow model registry: dsv3-base → dsv3-long → dsv3-chat.

    with tracking.start_run(cfg, "pretrain"):
        ...
        sm = register_stage_model(out_dir, "dsv3-base", config=cfg.train)    # → version, @candidate
    parent = require_stage_model("dsv3-base", hint="run `make pretrain`")   # models:/dsv3-base/3
    hf = resolve_model_uri(parent)                                           # a local HF directory

Design choices
- A stage model is an MLflow 3 logged model with the dsv3 pyfunc flavour (pyfunc_model.py)
  whose artifacts keep the HF directory, registered as a new version of `<base>-<stage>`.
  The logged model's source run is the stage run, so the runs table's Model column and
  the run page list it; the version's source is `models:/<model_id>`.
- Lineage tags on every version (and on its logged model): `git_commit`, `config_digest`,
  `dvc_data_digest`, `prefect_flow_run_id`, `mlflow_run_id`, `parent_model` (the concrete
  `models:/NAME/VERSION` the stage started from). A value that is unknown is left out, never
  written as "None". Unset digests/ids are taken from the environment and the run tree
  (the stage run, then its parents), as `start_run` and `log_dataset_input` tag them.
- Aliases: the newest version of each name is `candidate`; `promote` sets `champion`.
  Readers name an alias (`models:/dsv3-long@champion`); lineage always records the version
  the alias pointed to (`concrete_model_uri`).
- Eval linkage: `log_eval_metrics` logs to the eval run with the scored model's `model_id`,
  so the metrics show on the run and on the logged model / model version pages, tags the run
  `model_name` / `model_version` / `model_uri` and records the model as a run input.
- Experiment kind: `mark_model_training` tags the experiment
  `mlflow.experimentKind = custom_model_development` (the key and value the MLflow 3 UI's
  experiment-type selector writes). MLflow >= 3.5 UIs also keep a per-browser
  GenAI / Machine-learning switch (`?workflowType=` in the URL, else localStorage, default
  GenAI); `experiment_url` gives the link that opens the training view there.
- Missing models are `ModelNotFound` (a LookupError) whose message names the registered
  model, the aliases tried, the store, and what to run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import mlflow
from mlflow.entities import LoggedModelInput
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dsv3.tracking.runs import EXPERIMENT_KIND_TAG, MODEL_TRAINING, git_commit, tracking_uri

CANDIDATE, CHAMPION = "candidate", "champion"
STAGES = ("base", "long", "chat")  # pipeline order: pretraining, context extension, post-training
LINEAGE_TAGS = ("git_commit", "config_digest", "dvc_data_digest", "prefect_flow_run_id", "mlflow_run_id",
                "parent_model")


class ModelNotFound(LookupError):
    """No registered model version answers a request (the message says what to run)."""


@dataclass
class StageModel:
    """One registered stage model version."""
    name: str
    version: str
    model_id: str | None
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)

    @property
    def uri(self) -> str:  # the concrete registry URI lineage records
        return f"models:/{self.name}/{self.version}"


def _client() -> MlflowClient:

    return MlflowClient(tracking_uri())


def _store() -> str:

    return tracking_uri()


def stage_model_name(stage: str, base: str = "dsv3") -> str:
    """`long` → `dsv3-long` (the registered model of a pipeline stage)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: expected one of {', '.join(STAGES)}")
    return f"{base}-{stage}"


def config_digest(section: Any) -> str:
    """sha256 of a config section (pydantic model, dataclass or dict) as canonical JSON."""
    if hasattr(section, "model_dump"):
        data = section.model_dump(mode="json")
    elif hasattr(section, "__dataclass_fields__"):
        from dataclasses import asdict

        data = asdict(section)
    else:
        data = section
    blob = json.dumps(data, sort_keys=True, separators=(",", ":"), default=str, ensure_ascii=False)
    return hashlib.sha256(blob.encode()).hexdigest()


def clean_tags(tags: dict[str, Any] | None) -> dict[str, str]:
    """Tags as strings, without the ones whose value is unknown (None, "", "None")."""
    return {str(k): str(v) for k, v in (tags or {}).items() if v is not None and str(v) not in ("", "None")}


# ---- URIs ---------------------------------------------------------------------------------
def _model_id_of(mv) -> str | None:
    if getattr(mv, "model_id", None):
        return mv.model_id
    src = mv.source or ""
    if src.startswith("models:/m-") and "/" not in src[len("models:/"):]:
        return src[len("models:/"):]
    return None


def _stage_model(mv) -> StageModel:
    return StageModel(mv.name, str(mv.version), _model_id_of(mv), mv.run_id, dict(mv.tags or {}),
                      list(getattr(mv, "aliases", None) or []))


def _parse(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/NAME@ALIAS` → (NAME, None, ALIAS); `models:/NAME/V` → (NAME, V, None)."""
    if not str(uri).startswith("models:/"):
        raise ValueError(f"{uri!r} is not a registry URI (models:/NAME/VERSION or models:/NAME@ALIAS)")
    rest = str(uri)[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, None, alias
    name, _, version = rest.partition("/")
    return name, version or "latest", None


def model_version(uri: str) -> StageModel:
    """The registered version a `models:/NAME/VERSION|latest` or `models:/NAME@ALIAS` URI names."""
    name, version, alias = _parse(uri)
    client = _client()
    try:
        if alias:
            mv = client.get_model_version_by_alias(name, alias)
        elif version == "latest":
            vs = client.search_model_versions(f"name='{name}'")
            if not vs:
                raise ModelNotFound(f"registered model {name!r} has no versions in {_store()}")
            mv = client.get_model_version(name, str(max(int(v.version) for v in vs)))
        else:
            mv = client.get_model_version(name, version)
    except MlflowException as e:
        raise ModelNotFound(f"{uri} does not resolve in {_store()}: {e.message}") from None
    return _stage_model(mv)


def concrete_model_uri(uri: str) -> str:
    """`models:/dsv3-long@candidate` → `models:/dsv3-long/4` (what lineage tags record)."""
    return model_version(uri).uri


def resolve_stage_model(name: str, prefer: Iterable[str] = (CHAMPION, CANDIDATE)) -> str | None:
    """`models:/NAME/VERSION` of the first alias in `prefer` that is set, else None."""
    client = _client()
    for alias in prefer:
        try:
            mv = client.get_model_version_by_alias(name, alias)
        except MlflowException:
            continue
        return f"models:/{name}/{mv.version}"
    return None


def require_stage_model(name: str, prefer: Iterable[str] = (CHAMPION, CANDIDATE), hint: str | None = None) -> str:
    """Like `resolve_stage_model`, but a missing model is a `ModelNotFound` saying what to do."""
    prefer = tuple(prefer)
    uri = resolve_stage_model(name, prefer)
    if uri is None:
        hint = hint or "register one first (`make lifecycle`, or the stage that produces it)"
        raise ModelNotFound(f"no version of {name} has alias {' or '.join(prefer)} in {_store()}: {hint}")
    return uri


def furthest_stage_model(base: str = "dsv3") -> tuple[str, str]:
    """What `make eval` scores alone: (`models:/NAME/VERSION`, why it was chosen).

    `<base>-chat@champion`, else the furthest stage's (chat > long > base) `@candidate`,
    else that stage's newest version (a store written before aliases existed)."""
    names = [stage_model_name(s, base) for s in reversed(STAGES)]
    uri = resolve_stage_model(names[0], (CHAMPION,))
    if uri:
        return uri, f"{names[0]}@{CHAMPION}"
    for name in names:
        uri = resolve_stage_model(name, (CANDIDATE,))
        if uri:
            return uri, f"{name}@{CANDIDATE}: the furthest stage's newest candidate ({names[0]} has no {CHAMPION})"
        vs = _client().search_model_versions(f"name='{name}'")
        if vs:
            v = max(int(x.version) for x in vs)
            return f"models:/{name}/{v}", f"newest version of {name} (no aliases set)"
    raise ModelNotFound(f"no registered stage model ({', '.join(names)}) in {_store()}: run `make lifecycle` "
                        "(or `make pretrain`) first, or name a checkpoint explicitly")


def _hf_source(model_id: str) -> str:
    """Where a logged model keeps its HF directory (the `hf` artifact named in its MLmodel)."""
    import yaml

    from dsv3.tracking.pyfunc_model import HF_ARTIFACT

    root = _client().get_logged_model(model_id).artifact_location.rstrip("/")
    try:
        mlmodel = yaml.safe_load(mlflow.artifacts.load_text(f"{root}/MLmodel"))
        rel = mlmodel["flavors"]["python_function"]["artifacts"][HF_ARTIFACT]["path"]
    except (MlflowException, KeyError, TypeError) as e:
        raise ModelNotFound(f"logged model {model_id} has no dsv3 pyfunc `{HF_ARTIFACT}` artifact "
                            f"(not registered by register_stage_model?): {e}") from None
    return f"{root}/{rel}"


def hf_dir(uri: str, dst: str | Path | None = None) -> str:
    """A local HF directory for a registered version or a logged model (`models:/m-...`)."""
    name, version, alias = _parse(uri)
    if name.startswith("m-") and version == "latest" and alias is None:  # models:/<model_id>
        model_id, source = name, None
    else:
        sm = model_version(uri)
        model_id = sm.model_id
        source = None if model_id else _client().get_model_version(sm.name, sm.version).source
    if model_id:
        source = _hf_source(model_id)
    if dst is None and (source.startswith("file://") or "://" not in source):  # local store: no copy
        local = Path(source[len("file://"):] if source.startswith("file://") else source)
        if local.is_dir():
            return str(local)
    kw = {"dst_path": str(dst)} if dst else {}
    return mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=_store(), **kw)


# ---- registration -----------------------------------------------------------------------------
def _run_tag_upwards(client: MlflowClient, run_id: str | None, key: str, depth: int = 4) -> str | None:
    """A tag of the run, else of its parent runs (a stage run under its flow's run)."""
    while run_id and depth:
        tags = client.get_run(run_id).data.tags
        if tags.get(key) not in (None, "", "None"):
            return tags[key]
        run_id, depth = tags.get("mlflow.parentRunId"), depth - 1
    return None


def lineage_tags(run_id: str | None, parent_model: str | None = None, config: Any = None,
                 config_digest_: str | None = None, data_digest: str | None = None) -> dict[str, str]:
    """The lineage tags of a new version; unknown ones are left out."""

    client = _client()
    tags: dict[str, Any] = {
        "git_commit": git_commit() or _run_tag_upwards(client, run_id, "git_commit"),
        "config_digest": config_digest_ or (config_digest(config) if config is not None else None),
        "dvc_data_digest": data_digest or _run_tag_upwards(client, run_id, "dvc_data_digest"),
        "prefect_flow_run_id": os.environ.get("PREFECT__FLOW_RUN_ID")
        or _run_tag_upwards(client, run_id, "prefect_flow_run_id"),
        "mlflow_run_id": run_id,
    }
    if parent_model:
        p = str(parent_model)
        if p.startswith("models:/"):
            tags["parent_model"] = concrete_model_uri(p)
        else:  # a local directory or runs:/ URI (an explicit --init): recorded, but not as a registry link
            tags["parent_source"] = p
    return clean_tags(tags)


def register_stage_model(model_dir: str | Path, name: str, *, parent_model: str | None = None,
                         config: Any = None, config_digest: str | None = None, data_digest: str | None = None,
                         tags: dict[str, Any] | None = None, chat: bool | None = None, step: int = 0,
                         alias: str | None = CANDIDATE) -> StageModel:
    """Log `model_dir` (HF format + tokenizer) as a pyfunc logged model of the active run, register
    it as a new version of `name`, tag its lineage and move `alias` (`candidate`) to it.

    `parent_model`: the model this stage started from: best the concrete `models:/NAME/VERSION`
    the stage read (`require_stage_model` returns one); an alias is resolved now. `config`: the stage's config section (hashed into `config_digest`).
    `chat`: chat-template prompts by default (default: `name` ends in `-chat`). `step`: the
    run's final step, so the model page shows the metrics logged at it."""
    from dsv3.tracking.pyfunc_model import log_pyfunc

    run = mlflow.active_run()
    if run is None:
        raise RuntimeError(f"register_stage_model({name!r}) needs an active MLflow run (the stage's run): "
                           "call it inside dsv3.tracking.start_run(...)")
    run_id = run.info.run_id
    all_tags = {**lineage_tags(run_id, parent_model, config, config_digest, data_digest), **clean_tags(tags)}
    stage = name.rsplit("-", 1)[-1]
    if stage in STAGES:
        all_tags.setdefault("stage", stage)
    chat = name.endswith("-chat") if chat is None else chat
    info = log_pyfunc(model_dir, name, chat=chat, step=step, tags=all_tags)
    client = _client()
    try:
        client.create_registered_model(name, description=f"dsv3 {stage if stage in STAGES else 'stage'} model "
                                                         "(pyfunc: prompts in, generated text out)")
    except MlflowException:
        pass  # exists already
    mv = client.create_model_version(name, source=info.model_uri, run_id=run_id, tags=all_tags,
                                     model_id=info.model_id)
    client.set_logged_model_tags(info.model_id, {"mlflow.modelVersions": json.dumps(
        [{"name": name, "version": str(mv.version)}])})
    if alias:
        client.set_registered_model_alias(name, alias, mv.version)
    return StageModel(name, str(mv.version), info.model_id, run_id, all_tags, [alias] if alias else [])


def promote(name: str, version: str | int, alias: str = CHAMPION) -> str:
    """Point `alias` (default `champion`) at a version; returns `models:/NAME/VERSION`."""
    client = _client()
    try:
        client.get_model_version(name, str(version))
    except MlflowException as e:
        raise ModelNotFound(f"cannot promote {name} version {version}: {e.message}") from None
    client.set_registered_model_alias(name, alias, str(version))
    return f"models:/{name}/{version}"


# ---- evaluation linkage --------------------------------------------------------------------
def log_eval_metrics(metrics: dict[str, float], model_uri: str, step: int | None = None) -> dict[str, str]:
    """Log eval metrics to the active run *and* to the scored logged model (`model_id`).

    `model_uri`: `models:/NAME/VERSION` or `models:/NAME@ALIAS`. Tags the run `model_name`,
    `model_version`, `model_uri` (concrete) and `model_id`, links the model as a run input;
    returns those tags."""
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("log_eval_metrics needs an active MLflow run (the eval run)")
    sm = model_version(model_uri)
    tags = clean_tags({"model_name": sm.name, "model_version": sm.version, "model_uri": sm.uri,
                       "model_id": sm.model_id})
    mlflow.set_tags(tags)
    clean = {k: float(v) for k, v in metrics.items() if v is not None}
    if sm.model_id:
        _client().log_inputs(run.info.run_id, models=[LoggedModelInput(sm.model_id)])
    if clean:
        mlflow.log_metrics(clean, step=step, model_id=sm.model_id)
    return tags


# ---- experiment --------------------------------------------------------------------------------
def mark_model_training(experiment_id: str, force: bool = False) -> None:
    """Tag the experiment as model training (the MLflow 3 UI's experiment kind), unless a user chose."""
    client = _client()
    if force or EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


def experiment_url(base_url: str, experiment_id: str, tab: str = "runs") -> str:
    """The MLflow UI link that opens the experiment in its model-training view."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/{tab}?workflowType=machine_learning"


def load_pyfunc(uri: str, model_config: dict | None = None):
    """`mlflow.pyfunc.load_model` against dsv3's store (`models:/dsv3-chat@champion`, ...)."""
    mlflow.set_tracking_uri(_store())
    return mlflow.pyfunc.load_model(uri, model_config=model_config)


def register_model(model_dir: str | Path, name: str, artifact_path: str = "model") -> str:
    """Register an HF-format directory from the active run; returns the version.

    Kept for existing callers. A full stage model (config, safetensors, tokenizer) goes through
    `registry.register_stage_model` (pyfunc logged model, lineage tags, alias `candidate`);
    a directory without a tokenizer cannot be a text-in/text-out model, so it is logged under
    `artifact_path` and registered as a plain folder, with a warning saying so."""
    import warnings

    from dsv3.tracking.pyfunc_model import check_hf_dir

    try:
        check_hf_dir(model_dir)
    except FileNotFoundError as e:
        warnings.warn(f"{e}: registering {name} as a plain folder, not an MLflow model", stacklevel=2)
    else:
        return register_stage_model(model_dir, name).version
    run = mlflow.active_run()
    if run is None:
        raise RuntimeError("register_model needs an active run")
    mlflow.log_artifacts(str(model_dir), artifact_path=artifact_path)
    client = MlflowClient(tracking_uri())
    with contextlib.suppress(mlflow.exceptions.MlflowException):
        client.create_registered_model(name)  # exists already otherwise
    source = f"{run.info.artifact_uri.rstrip('/')}/{artifact_path}"
    return str(client.create_model_version(name, source=source, run_id=run.info.run_id).version)


def resolve_model_uri(uri: str | Path, dst: str | Path | None = None) -> str:
    """A local HF directory for a path, `runs:/<id>/<path>`, `models:/<name>/<version|latest>`,
    `models:/<name>@<alias>` or `models:/<model_id>` (a logged model's `artifacts/hf`)."""
    s = str(uri)
    if "://" not in s and ":/" not in s:
        p = Path(s)
        if not p.exists():
            raise FileNotFoundError(f"model path {p} does not exist")
        return str(p)
    if s.startswith("models:/"):
        return hf_dir(s, dst)
    kw = {"dst_path": str(dst)} if dst else {}
    if s.startswith("file://"):
        local = Path(s[len("file://"):])
        if local.exists() and not dst:
            return str(local)
    return mlflow.artifacts.download_artifacts(artifact_uri=s, tracking_uri=tracking_uri(), **kw)
