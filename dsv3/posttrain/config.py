"""PostTrainConfig: SFT, reward model, GRPO, distillation (owned by dsv3.posttrain).

One section per stage of DeepSeek-V3 §5 (SFT §5.1, RL §5.2, distillation §5.4.1).
Every section is pydantic with `extra="forbid"` so a typo is an error naming the key.
Defaults are CPU-sized (they run the `tiny`/`small` presets in minutes).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataGenConfig(_Section):
    """Programmatic SFT data (§5.1): verifiable reasoning problems + instruction pairs."""
    out_dir: str = "data/posttrain"  # DVC-trackable output folder
    n_arithmetic: int = Field(2000, ge=0)
    n_algebra: int = Field(500, ge=0)
    n_code: int = Field(100, ge=0)
    max_operand: int = Field(20, ge=1)
    instructions_path: str | None = None  # extra local instruction/response JSONL
    val_fraction: float = Field(0.05, ge=0, lt=1)
    seed: int = 0
    # rejection sampling from a teacher (None: use the programmatic reference responses)
    teacher: str | None = None
    samples_per_prompt: int = Field(4, ge=1)
    max_new_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.7, ge=0)


class SFTConfig(_Section):
    epochs: int = Field(2, ge=1)
    max_steps: int | None = Field(None, ge=1)  # cap across epochs (None: run all epochs)
    batch_size: int = Field(16, ge=1)
    seq_len: int = Field(128, ge=8)
    lr: float = Field(2e-3, gt=0)  # CPU default (tiny/small presets)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_steps: int = Field(10, ge=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    eval_every: int = Field(50, ge=1)
    save_every: int | None = Field(None, ge=1)
    seed: int = 0


class RewardConfig(_Section):
    """Rule-based rewards (weights of the sum) and the Bradley-Terry reward model (§5.2.1)."""
    math_weight: float = 1.0
    format_weight: float = 0.1
    code_weight: float = 1.0
    model_weight: float = 0.0  # >0 adds the trained reward model to the GRPO reward
    code_timeout_s: float = Field(5.0, gt=0)
    # reward model
    rm_pairs: int = Field(400, ge=2)
    rm_epochs: int = Field(2, ge=1)
    rm_batch_size: int = Field(16, ge=1)
    rm_lr: float = Field(5e-4, gt=0)
    rm_val_fraction: float = Field(0.2, gt=0, lt=1)
    seed: int = 0


class GRPOConfig(_Section):
    """GRPO (DeepSeekMath; DeepSeek-V3 §5.2.2)."""
    steps: int = Field(60, ge=1)
    prompts_per_step: int = Field(16, ge=1)
    group_size: int = Field(8, ge=2)  # G
    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)
    lr: float = Field(5e-4, gt=0)  # CPU default (tiny model); use ~1e-6..1e-5 for real models
    clip_eps: float = Field(0.2, gt=0)  # ε
    kl_coef: float = Field(0.02, ge=0)  # β
    inner_epochs: int = Field(2, ge=1)  # μ: optimisation passes per rollout batch
    loss_norm: Literal["token", "sequence"] = "token"
    adv_eps: float = Field(1e-4, gt=0)
    grad_clip: float = Field(1.0, gt=0)
    max_operand: int = Field(4, ge=1)  # built-in arithmetic task: a+b with a,b <= this
    rollout_workers: int = Field(0, ge=0)  # >0: rollouts on Ray actors (dsv3.cluster)
    seed: int = 0


class DistillConfig(_Section):
    """Distillation from a stronger teacher (§5.4.1): sequence- and/or token-level."""
    enabled: bool = False
    teacher: str | None = None  # path / runs:/ / models:/ URI of a HF-format checkpoint
    mode: Literal["sequence", "token", "both"] = "token"
    temperature: float = Field(2.0, gt=0)  # τ
    alpha_ce: float = Field(0.0, ge=0)  # weight of the hard-label CE next to τ²·KL
    steps: int = Field(50, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(2e-4, gt=0)
    seed: int = 0


class PostTrainConfig(_Section):
    init: str | None = None  # pretrained checkpoint URI (None: latest registered / fresh model)
    out_dir: str = "checkpoints/posttrain"
    data: DataGenConfig = Field(default_factory=DataGenConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    reward: RewardConfig = Field(default_factory=RewardConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
