"""ServeConfig: every knob of `dsv3 serve` (one pydantic model, errors name the field).

Design choices
- Capacity is stated in tokens of latent cache (`cache_tokens`), not in requests: the pool
  holds (kv_lora_rank + qk_rope_head_dim) numbers per token and layer (§2.1.1), so a V3-size
  pool of 1M tokens is ~70 GB in bf16 while the same budget in plain MHA KV would hold ~15x less.
- Admission is bounded twice: `max_batch` running sequences (one decode step serves them all)
  and `max_queue` waiting requests; a request beyond both is refused with 429 at once rather
  than left to time out (what vLLM / SGLang users expect from an overloaded server).
- `speculative` is the number of MTP draft tokens per decode step (§2.2, §5.4.3); 0 turns
  speculation off. Drafts beyond the model's MTP depth reuse its last module.
- `pd` picks prefill/decode disaggregation (§3.4: prefill and decode are separate deployment
  units) or the colocated default; `pd_worker` says where the prefill worker runs.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class ServeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    model: str = "models:/dsv3-chat@champion"  # HF dir, runs:/..., models:/name/version, models:/name@alias
    served_model_name: str | None = None  # the `model` clients send; None: the registered name / dir name
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)  # 0: any free port
    dtype: Literal["float32", "bfloat16"] = "float32"
    device: str = "cpu"
    threads: int | None = Field(None, gt=0)  # torch intra-op threads of the engine
    # scheduling
    max_batch: int = Field(16, gt=0)  # running sequences per decode step
    max_queue: int = Field(64, ge=0)  # waiting requests; one more is answered 429
    max_model_len: int | None = Field(None, gt=0)  # prompt + completion tokens; None: max_position_embeddings
    max_prompt_tokens: int | None = Field(None, gt=0)  # None: max_model_len - 1
    default_max_tokens: int = Field(16, gt=0)  # OpenAI's default for /v1/completions
    prefill_budget: int = Field(2048, gt=0)  # prompt tokens prefilled per iteration (colocated; >= 1 prompt)
    # latent cache
    block_size: int = Field(16, gt=0)
    cache_tokens: int = Field(32768, gt=0)  # pool capacity in tokens (all sequences together)
    # speed
    speculative: int = Field(0, ge=0)  # MTP draft tokens per step (0 = off)
    compile: bool = False  # decode through the static-shape step under torch.compile (CUDA graphs on a GPU)
    static_moe: bool = False  # the static-shape step without compiling (slower eagerly: the expert
    #                           gather copies weights; eager decode otherwise runs the model's modules)
    # prefill / decode disaggregation
    pd: Literal["colocated", "disaggregated"] = "colocated"
    pd_worker: Literal["process", "ray", "thread"] = "process"
    prefill_workers: int = Field(1, gt=0)
    prefill_threads: int | None = Field(None, gt=0)

    @model_validator(mode="after")
    def _check(self) -> "ServeConfig":
        if self.max_prompt_tokens and self.max_model_len and self.max_prompt_tokens >= self.max_model_len:
            raise ValueError("max_prompt_tokens must be < max_model_len (one token must fit after the prompt)")
        return self
