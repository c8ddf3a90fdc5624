"""ParallelConfig: pipeline and expert parallelism (owned by dsv3.parallel)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict


class ParallelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    dp: int = 1
    pp: int = 1
    schedule: Literal["dualpipe", "dualpipev", "1f1b"] = "dualpipe"
    ep: int = 1
