"""PostTrainConfig: SFT, reward model, GRPO, distillation (owned by dsv3.posttrain)."""

from pydantic import BaseModel, ConfigDict


class PostTrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sft_steps: int = 100
    grpo_steps: int = 50
