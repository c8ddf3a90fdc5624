"""TrainConfig: optimizer, schedules, precision, checkpoints, extension (owned by dsv3.train).

Schedules are set as fractions of the total training tokens, as in §4.2 (14.8T tokens):
warmup -> constant 2.2e-4 until 10T (0.676) -> cosine to 2.2e-5 until 14.3T (0.966) ->
2.2e-5 until 14.633T (0.989) -> 7.3e-6 for the rest (ratio 0.033); batch size ramps
3072 -> 15360 over the first 469B tokens (0.032); MTP λ 0.3 until 10T then 0.1; bias
update speed γ 0.001 until 14.3T then 0. The early values of λ, γ and the balance loss α
live in ModelConfig (`mtp_loss_weight`, `bias_update_speed`, `aux_loss_alpha`): each
field is defined once. The number of Ray data-parallel workers is `parallel.dp`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ExtendStage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    factor: float = Field(4.0, ge=1.0)  # YaRN scale s of this stage relative to the base context
    seq_len: int = Field(1024, gt=0)
    steps: int = Field(20, gt=0)
    batch_size: int = Field(2, gt=0)
    shards: str | None = None  # this stage's packed shards; None: train.shards (the pretraining data)


class ExtendConfig(BaseModel):
    """Context extension (§4.3): YaRN stages continuing from a checkpoint."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    original_max_position_embeddings: int | None = None  # None: the pretraining seq_len
    stages: list[ExtendStage] = Field(default_factory=lambda: [
        ExtendStage(factor=4, seq_len=1024, steps=20), ExtendStage(factor=16, seq_len=4096, steps=10)])
    lr: float = Field(7.3e-6 * 10, gt=0)  # §4.3: the final pretraining LR; scaled for tiny runs
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 1.0
    passkey_lengths: list[int] = Field(default_factory=lambda: [256, 1024, 4096])
    passkey_depths: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0])
    passkey_trials: int = Field(2, gt=0)


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # data & batch
    shards: str | None = None  # None: <data.out_dir>/shards
    tokenizer: str | None = None  # None: <data.out_dir>/tokenizer
    seq_len: int = Field(256, gt=0)
    batch_size: int = Field(8, gt=0)  # global sequences per optimizer step (after the ramp)
    micro_batch_size: int | None = Field(None, gt=0)  # per rank per micro-step; None: no accumulation
    batch_ramp_start: int | None = Field(None, gt=0)  # §4.2 ramp: start batch (None: no ramp)
    batch_ramp_frac: float = Field(0.032, ge=0, le=1)
    steps: int = Field(100, gt=0)
    # optimizer (§4.2)
    lr: float = Field(2.2e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    # LR schedule, fractions of total tokens (§4.2)
    warmup_frac: float = Field(0.05, ge=0, le=1)
    constant_until: float = Field(0.676, ge=0, le=1)
    decay_until: float = Field(0.966, ge=0, le=1)
    decay_lr_ratio: float = Field(0.1, gt=0, le=1)  # 2.2e-5 / 2.2e-4
    tail_switch: float = Field(0.989, ge=0, le=1)
    tail_lr_ratio: float = Field(0.033, gt=0, le=1)  # 7.3e-6 / 2.2e-4
    # MTP λ and routing-bias γ late values (early values: ModelConfig)
    mtp_switch_frac: float = Field(0.676, ge=0, le=1)
    mtp_loss_weight_late: float = Field(0.1, ge=0)
    bias_switch_frac: float = Field(0.966, ge=0, le=1)
    bias_update_speed_late: float = Field(0.0, ge=0)
    # numerics & memory (§3.3)
    precision: Literal["fp32", "bf16", "fp8"] = "fp32"
    recompute: Literal["none", "norm_up", "block"] = "none"
    ema: bool = True
    ema_decay: float = Field(0.99, gt=0, lt=1)
    seed: int = 0
    threads: int | None = Field(None, gt=0)  # torch intra-op threads per worker
    # evaluation / logging
    eval_every: int = Field(50, gt=0)
    eval_batches: int = Field(4, gt=0)
    log_every: int = Field(1, gt=0)
    plots: bool = True
    # checkpoints
    out_dir: str = "runs/pretrain"
    ckpt_every: int = Field(50, gt=0)
    keep_last: int = Field(2, gt=0)
    log_checkpoints: bool = True  # log the final checkpoint to MLflow as an artifact
    register_model: bool = True  # a registered model version at the end
    init_from: str | None = None  # a checkpoint / HF dir / MLflow URI to start from (weights only)
    # shared storage (no shared filesystem, storage.py): s3://bucket[/prefix] or file:///dir; the run lives
    # at <storage_uri>/<out_dir>. None: $DSV3_CHECKPOINT_URI, else local files only (the laptop default)
    storage_uri: str | None = None
    # failures
    spike_factor: float = Field(3.0, gt=1)  # loss > factor x running mean (after 20 steps) = spike
    max_bad_steps: int = Field(3, gt=0)  # consecutive skipped steps before a rollback
    max_failures: int = Field(2, ge=0)  # Ray worker-group restarts
    debug_nan_steps: list[int] = Field(default_factory=list)  # inject NaN loss (tests)
    debug_kill_rank_at_step: int | None = None  # kill the last rank once at this step (tests)
    extend: ExtendConfig = Field(default_factory=ExtendConfig)

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if not self.warmup_frac <= self.constant_until <= self.decay_until <= self.tail_switch:
            raise ValueError("need warmup_frac <= constant_until <= decay_until <= tail_switch")
        if self.batch_ramp_start is not None and self.batch_ramp_start > self.batch_size:
            raise ValueError("batch_ramp_start must not exceed batch_size")
        return self
