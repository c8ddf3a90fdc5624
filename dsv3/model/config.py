"""ModelConfig: every architecture field of DeepSeek-V3, with Hugging Face names.

Design choices
- Field names are exactly those of Hugging Face's `DeepseekV3Config` / the official
  `config.json` (hidden_size, q_lora_rank, n_group, ...). Mapping to and from HF is
  then the identity on shared fields: each field is defined once, here.
- A few fields are ours (training-time knobs of the architecture): `aux_loss_alpha`
  (sequence-wise balance loss weight α, §2.1.2 eq. 17-20), `bias_update_speed` (γ of
  auxiliary-loss-free balancing, §2.1.2), `mtp_loss_weight` (λ, §2.2 eq. 25).
- Validation is pydantic with `extra="forbid"`: an unknown field or a bad value is an
  error naming the field.
- Parameter counts and FLOPs come from shapes alone, so the `v3` preset reports its
  671B total / 37B activated without allocating anything (§4.2).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from dsv3.config_base import validate_config
from dsv3.errors import ConfigError  # its old home: `from dsv3.model.config import ConfigError` still works


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    vocab_size: int = Field(129280, gt=0)
    hidden_size: int = Field(7168, gt=0)
    intermediate_size: int = Field(18432, gt=0)  # dense FFN (first_k_dense_replace layers)
    moe_intermediate_size: int = Field(2048, gt=0)  # per routed / shared expert
    num_hidden_layers: int = Field(61, gt=0)
    first_k_dense_replace: int = Field(3, ge=0)
    num_attention_heads: int = Field(128, gt=0)
    num_key_value_heads: int | None = None  # MLA: always equal to the head count
    # MLA (§2.1.1)
    q_lora_rank: int = Field(1536, ge=0)  # 0 = plain query projection (V2-Lite)
    kv_lora_rank: int = Field(512, gt=0)
    qk_nope_head_dim: int = Field(128, gt=0)
    qk_rope_head_dim: int = Field(64, gt=0)
    v_head_dim: int = Field(128, gt=0)
    # DeepSeekMoE (§2.1.2)
    n_routed_experts: int = Field(256, ge=0)
    n_shared_experts: int = Field(1, ge=0)
    num_experts_per_tok: int = Field(8, gt=0)
    n_group: int = Field(8, gt=0)
    topk_group: int = Field(4, gt=0)
    routed_scaling_factor: float = Field(2.5, gt=0)
    scoring_func: Literal["sigmoid", "softmax"] = "sigmoid"
    topk_method: Literal["noaux_tc", "greedy", "group_limited_greedy"] = "noaux_tc"
    norm_topk_prob: bool = True
    # MTP (§2.2)
    num_nextn_predict_layers: int = Field(1, ge=0)
    # positions
    max_position_embeddings: int = Field(163840, gt=0)
    rope_theta: float = Field(10000.0, gt=0)
    rope_scaling: dict[str, Any] | None = None
    rope_interleave: bool = True
    # misc
    rms_norm_eps: float = Field(1e-6, gt=0)
    initializer_range: float = Field(0.006, gt=0)  # §4.2: std 0.006
    tie_word_embeddings: bool = False
    hidden_act: Literal["silu"] = "silu"
    attention_bias: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    pad_token_id: int | None = None
    # ours: training-time knobs of the architecture
    aux_loss_alpha: float = Field(1e-4, ge=0)  # α, sequence-wise balance loss
    bias_update_speed: float = Field(1e-3, ge=0)  # γ, aux-loss-free bias update
    mtp_loss_weight: float = Field(0.3, ge=0)  # λ

    @field_validator("rope_scaling", mode="before")
    @classmethod
    def _canonical_rope_scaling(cls, v: Any) -> Any:
        """One spelling: {"type": "yarn", ...}; `rope_type` (HF >= 4.45) is folded into `type`."""
        if isinstance(v, dict):
            v = dict(v)
            kind = v.pop("rope_type", None)
            v.setdefault("type", kind)
            if v["type"] in (None, "default"):
                return None
        return v

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.num_key_value_heads is not None and self.num_key_value_heads != self.num_attention_heads:
            raise ValueError("num_key_value_heads must equal num_attention_heads for MLA")
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError("first_k_dense_replace exceeds num_hidden_layers")
        if self.has_moe:
            if self.num_experts_per_tok > self.n_routed_experts:
                raise ValueError(
                    f"num_experts_per_tok={self.num_experts_per_tok} > n_routed_experts={self.n_routed_experts}")
            if self.n_routed_experts % self.n_group:
                raise ValueError(
                    f"n_routed_experts={self.n_routed_experts} is not divisible by n_group={self.n_group}")
            if self.topk_group > self.n_group:
                raise ValueError(f"topk_group={self.topk_group} > n_group={self.n_group}")
            per_group = self.n_routed_experts // self.n_group
            if self.n_group > 1 and self.topk_group * per_group < self.num_experts_per_tok:
                raise ValueError("topk_group groups hold fewer experts than num_experts_per_tok")
            if self.n_group > 1 and self.topk_method == "noaux_tc" and per_group < 2:
                raise ValueError("noaux_tc group scores sum the top-2 affinities: need >= 2 experts per group")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind not in ("yarn", "default", None):
                raise ValueError(f"rope_scaling type {kind!r} unsupported (only 'yarn')")
            known = {"type", "rope_type", "factor", "original_max_position_embeddings", "beta_fast",
                     "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate", "rope_theta"}
            bad = set(self.rope_scaling) - known
            if bad:
                raise ValueError(f"unknown rope_scaling keys {sorted(bad)}")
            if kind == "yarn" and float(self.rope_scaling.get("factor", 1.0)) < 1.0:
                raise ValueError("rope_scaling.factor must be >= 1")
        return self

    # ---- derived shapes -------------------------------------------------------
    @property
    def has_moe(self) -> bool:
        return self.n_routed_experts > 0 and self.num_hidden_layers > self.first_k_dense_replace

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn(self) -> bool:
        rs = self.rope_scaling or {}
        return rs.get("type", rs.get("rope_type")) == "yarn"

    def is_moe_layer(self, i: int) -> bool:
        """Layer i (MTP blocks are numbered after the main layers) is MoE."""
        return self.n_routed_experts > 0 and i >= self.first_k_dense_replace

    # ---- construction -----------------------------------------------------------
    @classmethod
    def make(cls, **kw: Any) -> "ModelConfig":
        """Build with errors as ConfigError naming the field."""
        return validate_config(cls, kw, what="ModelConfig")

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.make(**{**PRESETS[name], **overrides})

    def replace(self, **kw: Any) -> "ModelConfig":
        return self.make(**{**self.model_dump(), **kw})

    # ---- Hugging Face ------------------------------------------------------------
    @classmethod
    def from_hf(cls, src: str | Path | dict) -> "ModelConfig":
        """From a HF `config.json` (dir, file or dict). Generic HF keys are ignored;
        architecture keys we do not know are an error naming the key."""
        if isinstance(src, dict):
            d = dict(src)
        else:
            p = Path(src)
            if p.is_dir():
                p = p / "config.json"
            if not p.is_file():
                raise ConfigError(f"no config.json at {p}")
            try:
                d = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}: not valid JSON ({e})") from None
        mt = d.get("model_type")
        if mt is not None and mt not in ("deepseek_v3", "deepseek_v2"):
            raise ConfigError(f"model_type {mt!r} is not a DeepSeek-V2/V3 config")
        # transformers>=5 folds rope_theta and scaling into `rope_parameters`
        rp = d.pop("rope_parameters", None)
        if rp:
            rp = dict(rp)
            if "rope_theta" in rp:
                d.setdefault("rope_theta", rp.pop("rope_theta"))
            if rp.get("rope_type", rp.get("type")) == "yarn":
                d.setdefault("rope_scaling", rp)
        d.pop("num_key_value_heads", None)  # MLA: always the head count (HF defaults it to 128)
        if "num_mtp_layers" in d:
            d.setdefault("num_nextn_predict_layers", d.pop("num_mtp_layers"))
        if d.get("q_lora_rank") is None and "q_lora_rank" in d:
            d["q_lora_rank"] = 0
        required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
        missing = [k for k in required if k not in d]
        if missing:
            raise ConfigError(f"HF config is missing required field(s) {missing}")
        fields = set(cls.model_fields)
        kw = {}
        for k, v in d.items():
            if k in fields:
                kw[k] = v
            elif k in _HF_IGNORED or k.startswith("_"):
                continue
            else:
                raise ConfigError(f"unknown field {k!r} in HF config")
        if kw.get("rope_scaling") is not None:
            rs = {k: v for k, v in kw["rope_scaling"].items() if k != "rope_theta"}
            kw["rope_scaling"] = rs if rs.get("type", rs.get("rope_type")) == "yarn" else None
        if "eos_token_id" in kw and isinstance(kw["eos_token_id"], list):
            kw["eos_token_id"] = kw["eos_token_id"][0]
        if "topk_method" not in d and kw.get("scoring_func") == "softmax":
            kw["topk_method"] = "greedy" if kw.get("n_group", 1) == 1 else "group_limited_greedy"
        return cls.make(**kw)

    def to_hf(self) -> dict:
        """A `config.json` dict that `transformers.DeepseekV3Config` accepts."""
        d = self.model_dump(exclude={"aux_loss_alpha", "bias_update_speed", "mtp_loss_weight"})
        d["num_key_value_heads"] = self.num_attention_heads
        d["q_lora_rank"] = self.q_lora_rank or None
        d["model_type"] = "deepseek_v3"
        d["architectures"] = ["DeepseekV3ForCausalLM"]
        d["torch_dtype"] = "float32"
        d["moe_layer_freq"] = 1
        d["ep_size"] = 1
        if self.rope_scaling:
            rs = dict(self.rope_scaling)
            rs["rope_type"] = rs["type"]
            d["rope_scaling"] = rs
        return d

    # ---- counting (from shapes alone) -------------------------------------------------
    def _attn_params(self) -> int:
        h, H = self.hidden_size, self.num_attention_heads
        q = (h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * self.qk_head_dim
             if self.q_lora_rank else h * H * self.qk_head_dim)
        kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
        kv += self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)
        o = H * self.v_head_dim * h
        return q + kv + o

    def _layer_params(self, i: int) -> tuple[int, int]:
        """(total, activated) parameters of block i, norms included."""
        h = self.hidden_size
        attn = self._attn_params() + 2 * h
        if not self.is_moe_layer(i):
            ffn = 3 * h * self.intermediate_size
            return attn + ffn, attn + ffn
        e = 3 * h * self.moe_intermediate_size
        gate = self.n_routed_experts * h
        total = attn + gate + e * (self.n_routed_experts + self.n_shared_experts)
        act = attn + gate + e * (self.num_experts_per_tok + self.n_shared_experts)
        return total, act

    def num_params(self, activated: bool = False, include_mtp: bool = False,
                   include_embedding: bool = True) -> int:
        """Parameter count from shapes. `activated`: per-token activated parameters
        (routed experts counted num_experts_per_tok times). The paper's 671B/37B exclude
        the MTP module (§1, §2.2); `include_mtp` adds it (its embedding and head are shared)."""
        h = self.hidden_size
        n = (2 - self.tie_word_embeddings) * self.vocab_size * h if include_embedding else 0
        n += h  # final norm
        for i in range(self.num_hidden_layers):
            n += self._layer_params(i)[int(activated)]
        if include_mtp:
            for k in range(self.num_nextn_predict_layers):
                n += self._layer_params(self.num_hidden_layers + k)[int(activated)]
                n += 2 * h * h + 3 * h  # eh_proj, enorm, hnorm, shared_head.norm
        return n

    def flops_per_token(self, seq_len: int, training: bool = True, include_mtp: bool = False) -> float:
        """Model FLOPs per token: 2·(activated matmul params) per forward plus attention
        scores/values (causal: half the seq_len on average); ×3 for training."""
        matmul = self.num_params(activated=True, include_mtp=include_mtp, include_embedding=False)
        matmul += self.vocab_size * self.hidden_size  # output head (input embedding is a lookup)
        layers = self.num_hidden_layers + (self.num_nextn_predict_layers if include_mtp else 0)
        attn = 2 * layers * self.num_attention_heads * (self.qk_head_dim + self.v_head_dim) * seq_len / 2
        fwd = 2 * matmul + attn
        return 3 * fwd if training else fwd


# Generic HF keys that carry no architecture information for us.
_HF_IGNORED = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "auto_map",
    "use_cache", "quantization_config", "ep_size", "moe_layer_freq", "pretraining_tp",
    "attention_dropout", "seq_aux", "output_router_logits", "router_aux_loss_coef", "return_dict",
    "output_hidden_states", "output_attentions", "torchscript", "use_bfloat16", "tf_legacy_loss",
    "pruned_heads", "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder",
    "cross_attention_hidden_size", "add_cross_attention", "tie_encoder_decoder", "id2label",
    "label2id", "problem_type", "tokenizer_class", "prefix", "sep_token_id",
    "decoder_start_token_id", "task_specific_params", "finetuning_task", "head_dim",
    "mlp_bias", "rope_type", "layer_types", "name_or_path", "max_length", "qk_head_dim",
}



_V3 = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128, q_lora_rank=1536,
    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
    routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc", norm_topk_prob=True,
    num_nextn_predict_layers=1, max_position_embeddings=163840, rope_theta=10000.0,
    rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=4096,
                      beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0),
)

PRESETS: dict[str, dict[str, Any]] = {
    # unit tests: well under 1M parameters, every feature on
    "tiny": dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, q_lora_rank=32,
        kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1, max_position_embeddings=512,
        rope_scaling=None,
    ),
    # CPU pretraining demo: ~35M total parameters, 16 routed experts
    "small": dict(
        vocab_size=8192, hidden_size=384, intermediate_size=1024, moe_intermediate_size=192,
        num_hidden_layers=6, first_k_dense_replace=1, num_attention_heads=6, q_lora_rank=192,
        kv_lora_rank=128, qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=48,
        n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
        routed_scaling_factor=2.5, num_nextn_predict_layers=1, max_position_embeddings=2048,
        rope_scaling=None,
    ),
    # DeepSeek-V2-Lite (16B): softmax gating, no query compression
    "v2-lite": dict(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16, q_lora_rank=0,
        kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        routed_scaling_factor=1.0, scoring_func="softmax", topk_method="greedy", norm_topk_prob=False,
        num_nextn_predict_layers=0, max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=4096,
                          beta_fast=32, beta_slow=1, mscale=0.707, mscale_all_dim=0.707),
    ),
    "v3": _V3,
}
