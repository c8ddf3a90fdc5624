"""Rotary position embedding with YaRN context extension (paper §2.1.1 eq. 3/5, §4.3).

Design choices
- DeepSeek's released weights rotate *interleaved* pairs (x0,x1),(x2,x3),... of the
  `qk_rope_head_dim` slice, not the two halves; we rotate interleaved pairs directly
  with real arithmetic (cos/sin of shape [.., S, 1, d/2]), which is bf16-friendly.
- YaRN (§4.3; Peng et al. 2023) follows Hugging Face `rope_scaling` semantics exactly:
  per-frequency blend of interpolated (1/factor) and extrapolated frequencies with a
  linear ramp between the correction dims of `beta_fast` / `beta_slow` computed at
  `original_max_position_embeddings`; cos/sin multiplied by `attention_factor`
  (= mscale(factor, mscale) / mscale(factor, mscale_all_dim), 1.0 for V3); and the
  softmax scale multiplied by mscale(factor, mscale_all_dim)² (see `softmax_scale`).
- Scaling is applied whenever `rope_scaling.type == "yarn"`, as in HF.
"""

from __future__ import annotations

import math

import torch

from dsv3.model.config import ModelConfig


def _get_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_params(cfg: ModelConfig) -> dict:
    rs = dict(cfg.rope_scaling or {})
    factor = rs.get("factor")
    orig = rs.get("original_max_position_embeddings") or cfg.max_position_embeddings
    if factor is None:
        factor = cfg.max_position_embeddings / orig
    return dict(factor=float(factor), orig=int(orig), beta_fast=rs.get("beta_fast") or 32,
                beta_slow=rs.get("beta_slow") or 1, mscale=rs.get("mscale"),
                mscale_all_dim=rs.get("mscale_all_dim"), attention_factor=rs.get("attention_factor"),
                truncate=rs.get("truncate", True))


def inv_freq_and_attention_factor(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [d/2] and the cos/sin multiplier."""
    d, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    if not cfg.yarn:
        return 1.0 / pos_freqs, 1.0
    p = yarn_params(cfg)
    factor = p["factor"]

    def corr_dim(rot: float) -> float:
        return d * math.log(p["orig"] / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr_dim(p["beta_fast"]), corr_dim(p["beta_slow"])
    if p["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, d - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrap = 1 - ramp  # 1 = keep the original frequency (high-frequency dims)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap
    af = p["attention_factor"]
    if af is None:
        if p["mscale"] and p["mscale_all_dim"]:
            af = _get_mscale(factor, p["mscale"]) / _get_mscale(factor, p["mscale_all_dim"])
        else:
            af = _get_mscale(factor)
    return inv_freq, float(af)


def softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(qk_nope + qk_rope), times YaRN mscale² when scaling is on (§4.3)."""
    scale = cfg.qk_head_dim ** -0.5
    if cfg.yarn:
        p = yarn_params(cfg)
        if p["mscale_all_dim"]:
            m = _get_mscale(p["factor"], p["mscale_all_dim"])
            scale *= m * m
    return scale


class RotaryEmbedding(torch.nn.Module):
    """Produces (cos, sin) [B|1, S, 1, d/2] for given positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq, self.attention_factor = inv_freq_and_attention_factor(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [S] or [B, S] (int)
        ang = positions.to(torch.float32)[..., None] * self.inv_freq  # [.., S, d/2]
        if ang.dim() == 2:
            ang = ang[None]
        cos = (ang.cos() * self.attention_factor)[:, :, None, :]
        sin = (ang.sin() * self.attention_factor)[:, :, None, :]
        return cos, sin


def apply_rope(x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate interleaved pairs of x [B, S, H, d] by (cos, sin) [B|1, S, 1, d/2]."""
    cos, sin = rope
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)
