"""LifecycleConfig: gates, caching and the held-out verifiable task of `flows/lifecycle.py` (owned by dsv3.lifecycle).

- `gates`: one `GateConfig` per registered stage model (`base` after pretraining, `long` after context
  extension, `chat` after post-training): the metric the lifecycle's evaluation logs, whether lower
  or higher is better, and the margin a candidate must beat the current champion by. Defaults:
  held-out bits-per-byte (`eval/bpb`, the validation split of the data shards) for base and long,
  held-out exact-answer accuracy on the verifiable task (`eval/arith/acc`) for chat.
- `cache`: reuse a stage whose identity (config section, code, inputs) matches a finished one in
  the MLflow store (dsv3/lifecycle/plan.py); `use_ray`: pretraining on Ray Train workers.
- `heldout`: the verifiable task scored for every stage model the same way (verifiable.py): a+b
  problems drawn with their own seed, greedy answers, exact numeric match.
- `serve_smoke`: the last stage starts `dsv3 serve` on the chat champion and sends it a smoke request
  (flows/serve.py, §3.4 deployment); cached by (champion version, serving code) like the other stages.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GateConfig(_Section):
    metric: str
    direction: Literal["min", "max"]
    margin: float = Field(0.0, ge=0)  # the candidate must beat the champion by more than this


DEFAULT_GATES = {"base": {"metric": "eval/bpb", "direction": "min"},
                 "long": {"metric": "eval/bpb", "direction": "min"},
                 "chat": {"metric": "eval/arith/acc", "direction": "max"}}


class GatesConfig(_Section):
    """A stage's gate given in part (`--set lifecycle.gates.chat.margin=0.05`) keeps its other defaults."""
    base: GateConfig = Field(default_factory=lambda: GateConfig(**DEFAULT_GATES["base"]))
    long: GateConfig = Field(default_factory=lambda: GateConfig(**DEFAULT_GATES["long"]))
    chat: GateConfig = Field(default_factory=lambda: GateConfig(**DEFAULT_GATES["chat"]))

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, d: Any) -> Any:
        if isinstance(d, dict):
            return {k: {**DEFAULT_GATES.get(k, {}), **v} if isinstance(v, dict) else v for k, v in d.items()}
        return d


class HeldoutConfig(_Section):
    """The held-out verifiable task: `n` a+b problems (operands 0..max_operand), greedy decoding."""
    n: int = Field(64, ge=1)
    seed: int = 9001  # not a seed the SFT data or GRPO draw their problems with
    max_operand: int = Field(9, ge=1)
    max_new_tokens: int = Field(16, ge=1)


class LifecycleConfig(_Section):
    gates: GatesConfig = Field(default_factory=GatesConfig)
    cache: bool = True
    use_ray: bool = True
    heldout: HeldoutConfig = Field(default_factory=HeldoutConfig)
    report_dir: str = "runs/lifecycle"  # report.md + report.png of each lifecycle run, under <run id>/
    serve_smoke: bool = True  # last stage: serve the chat champion, one smoke request, the version in MLflow
