"""RunConfig: the one typed config object of a run.

A run is described by `RunConfig` (pydantic): `model` (ModelConfig, or a preset name
plus overrides), `data`, `train`, `parallel`, `eval`, `posttrain`, `tracking`. It is
loaded from YAML under `configs/` plus `--set a.b=c` overrides, validated with errors
that name the dotted key, passed as the Prefect flow parameter, mirrored into
`params.yaml` for DVC (`write_params`) and logged whole to MLflow (`flatten`).
Each field is defined once, in the component's own config class.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dsv3.data.config import DataConfig
from dsv3.evals.config import EvalConfig
from dsv3.model.config import PRESETS, ConfigError, ModelConfig
from dsv3.parallel.config import ParallelConfig
from dsv3.posttrain.config import PostTrainConfig
from dsv3.train.config import TrainConfig


class TrackingConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tracking_uri: str | None = None  # None: $MLFLOW_TRACKING_URI or sqlite:///mlruns.db
    artifact_location: str | None = None  # None: ./mlartifacts
    experiment: str = "dsv3"
    registered_model: str = "dsv3"


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

    # ---- loading -------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None) -> "RunConfig":
        d: dict = {}
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise ConfigError(f"config file not found: {p}")
            try:
                d = yaml.safe_load(p.read_text()) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{p}: invalid YAML ({e})") from None
            if not isinstance(d, dict):
                raise ConfigError(f"{p}: top level must be a mapping")
        for ov in overrides or []:
            apply_override(d, ov)
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        try:
            return cls(**d)
        except ValidationError as e:
            raise ConfigError(format_errors(e, cls)) from None

    def flatten(self) -> dict[str, Any]:
        """Dotted-key view for MLflow params."""
        out: dict[str, Any] = {}

        def walk(prefix: str, v: Any) -> None:
            if isinstance(v, dict):
                for k, x in v.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), x)
            else:
                out[prefix] = v

        walk("", self.model_dump(mode="json"))
        return out

    def write_params(self, path: str | Path = "params.yaml") -> None:
        """Mirror the config into params.yaml for DVC."""
        Path(path).write_text(yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False))


def apply_override(d: dict, override: str) -> None:
    """Apply `a.b.c=value` (value parsed as YAML) to a nested dict."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.path=value")
    key, raw = override.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    node = d
    parts = key.strip().split(".")
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {key!r}: {p!r} is not a section")
        node = nxt
    node[parts[-1]] = value


def format_errors(e: ValidationError, root: type[BaseModel]) -> str:
    parts = []
    for err in e.errors():
        loc = [str(x) for x in err["loc"]]
        key = ".".join(loc) or "config"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
            hint = _suggest(root, loc)
            if hint:
                msg += f" (did you mean {hint!r}?)"
        parts.append(f"{key}: {msg}")
    return "invalid config: " + "; ".join(parts)


def _suggest(root: type[BaseModel], loc: list[str]) -> str | None:
    model: Any = root
    for p in loc[:-1]:
        f = getattr(model, "model_fields", {}).get(p)
        if f is None:
            return None
        ann = f.annotation
        args = getattr(ann, "__args__", None) or (ann,)
        model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if model is None:
            return None
    close = difflib.get_close_matches(loc[-1], list(getattr(model, "model_fields", {})), n=1)
    return ".".join(loc[:-1] + close) if close else None
