"""TrainConfig: optimizer, schedules, precision, checkpoints (owned by dsv3.train)."""

from typing import Literal

from pydantic import BaseModel, ConfigDict


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seq_len: int = 512
    batch_size: int = 8
    steps: int = 100
    lr: float = 3e-4
    precision: Literal["fp32", "bf16", "fp8"] = "bf16"
    seed: int = 0
