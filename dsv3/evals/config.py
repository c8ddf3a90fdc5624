"""EvalConfig: which benchmarks, limits, offline data (owned by dsv3.evals)."""

from pydantic import BaseModel, ConfigDict


class EvalConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tasks: list[str] = ["mmlu", "drop", "humaneval"]
    limit: int | None = None
    data_dir: str | None = None
