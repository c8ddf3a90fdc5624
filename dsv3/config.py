"""RunConfig: the one typed config object of a run.

A run is described by `RunConfig` (pydantic): `model` (ModelConfig, or a preset name
plus overrides), `data`, `train`, `parallel`, `eval`, `posttrain`, `tracking`. It is
loaded from YAML under `configs/` plus `--set a.b=c` overrides by the one loader of
`dsv3.config_base` (errors name the dotted key, with "did you mean"), passed as the Prefect
flow parameter, mirrored into `params.yaml` for DVC (`write_params`) and logged whole to
MLflow (`flatten`). Each field is defined once, in the component's own config class; this
module and those `*/config.py` modules sit at the bottom of the layering with
`dsv3.config_base` and `dsv3.errors` (they import nothing else from dsv3).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dsv3 import config_base
from dsv3.config_base import apply_override, format_errors  # noqa: F401  (their old home)
from dsv3.data.config import DataConfig
from dsv3.errors import ConfigError  # noqa: F401  (re-exported)
from dsv3.evals.config import EvalConfig
from dsv3.lifecycle.config import LifecycleConfig
from dsv3.model.config import PRESETS, ModelConfig
from dsv3.parallel.config import ParallelConfig
from dsv3.posttrain.config import PostTrainConfig
from dsv3.train.config import TrainConfig


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db
    artifact_location: str | None = None  # None: ./mlartifacts
    experiment: str = "dsv3"
    registered_model: str = "dsv3"


# lifecycle stage -> the config paths its result depends on (RunConfig.section)
STAGE_SECTIONS = {
    "data": ("data",),
    "pretrain": ("model", "train", "parallel"),  # train without `extend` (BOOKKEEPING)
    "extend": ("model", "train", "parallel"),
    "posttrain": ("posttrain", "train.precision"),
    "eval": ("eval", "lifecycle.heldout"),
    "serve": (),  # the serve smoke: its identity is the champion version and the serving code
}
_TRAIN_BOOKKEEPING = ("out_dir", "shards", "tokenizer", "threads", "log_every", "plots", "log_checkpoints",
                      "register_model", "keep_last", "max_failures", "init_from")
BOOKKEEPING = {  # dotted keys inside a section that do not change what a stage produces
    "data": ("workers", "ray_address", "batch_size"),
    "train": _TRAIN_BOOKKEEPING,
    "posttrain": ("init", "out_dir", "data.out_dir"),
    "parallel": ("use_gpu",),
}


def _drop(data: dict, dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if rest:
        if isinstance(data.get(head), dict):
            _drop(data[head], rest)
    else:
        data.pop(head, None)


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = "run"
    preset: str = "small"  # model preset; `model` fields override it
    model: ModelConfig | None = None
    data: DataConfig = Field(default_factory=DataConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    posttrain: PostTrainConfig = Field(default_factory=PostTrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    lifecycle: LifecycleConfig = Field(default_factory=LifecycleConfig)

    @model_validator(mode="before")
    @classmethod
    def _resolve_model(cls, d: Any) -> Any:
        if isinstance(d, dict):
            preset = d.get("preset", "small")
            if preset not in PRESETS:
                raise ValueError(f"preset: unknown model preset {preset!r}; choose one of {sorted(PRESETS)}")
            m = d.get("model")
            if m is None or isinstance(m, dict):
                d = {**d, "model": {**PRESETS[preset], **(m or {})}}
        return d

    # ---- loading (dsv3.config_base: the one loader, error format and flattener) ------------
    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "RunConfig":
        """YAML file (optional) + `--set a.b=c` overrides -> RunConfig; ConfigError naming the key."""
        return config_base.load_config(cls, path, overrides or ())

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        return config_base.validate_config(cls, d)

    def section(self, stage: str) -> dict[str, Any]:
        """The part of the config a lifecycle stage's result depends on (`STAGE_SECTIONS`), as JSON
        data: what its `config_digest` lineage tag and its cache key hash. Bookkeeping fields
        (paths, threads, logging, the start pointer; `BOOKKEEPING`) are left out, so a Ray worker's
        absolute paths or another output folder do not make a different model."""
        if stage not in STAGE_SECTIONS:
            raise ValueError(f"unknown lifecycle stage {stage!r}: expected one of {', '.join(STAGE_SECTIONS)}")
        out = {}
        for path in STAGE_SECTIONS[stage]:
            node: Any = self
            for part in path.split("."):
                node = getattr(node, part)
            data = node.model_dump(mode="json") if isinstance(node, BaseModel) else node
            for key in BOOKKEEPING.get(path, ()) + (("extend",) if (stage, path) == ("pretrain", "train") else ()):
                _drop(data, key)
            out[path] = data
        return out

    def flatten(self) -> dict[str, Any]:
        """Dotted-key view for MLflow params (`dsv3.config_base.flatten`)."""
        return config_base.flatten(self)

    def write_params(self, path: str | Path = "params.yaml", sections: list[str] | None = None) -> None:
        """Mirror the config (the named sections; default all) into params.yaml for DVC, leaving
        the file's other sections and comments as they are (`dsv3.config_base.write_params`)."""
        names = sections if sections is not None else list(type(self).model_fields)
        config_base.write_params(path, {n: getattr(self, n) for n in names})
