"""Multi-head Latent Attention (paper §2.1.1, eq. 1-11).

Design choices
- Queries: low-rank compression `q_a_proj -> q_a_layernorm -> q_b_proj` (q_lora_rank > 0)
  or a plain `q_proj` (q_lora_rank = 0, V2-Lite). Keys/values: one joint down-projection
  `kv_a_proj_with_mqa` to the latent c_KV (kv_lora_rank) plus the decoupled RoPE key
  k_R (qk_rope_head_dim), which is shared by all heads (eq. 3).
- Training path: up-project c_KV with `kv_b_proj` to per-head k_nope and v, attend with
  PyTorch SDPA (flash kernel on CPU/GPU where shapes allow).
- Inference path ("absorption", §2.1.1 last paragraph): W_UK is folded into the query and
  W_UV into the output, so the cache holds only the *normalised* latent c_KV and the
  rotated k_R per token and layer: (kv_lora_rank + qk_rope_head_dim) numbers, e.g. 576 for
  V3 instead of 2·128·(128+64) for plain MHA. Decode steps (one query per sequence)
  attend in the latent space: that is multi-query attention (all heads share the keys
  [c_KV; k_R] and the values c_KV), run as one fused SDPA call with the heads as the query
  axis, so the cache is read once per step (one buffer [B, T, kv_lora + rope] per layer).
  A multi-token prefill up-projects the cached latents once and uses SDPA, which is
  cheaper there. All paths agree to fp32 rounding.
- Softmax scale 1/sqrt(qk_nope + qk_rope), times YaRN mscale² when scaling is on (§4.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.model.config import ModelConfig
from dsv3.model.layers import RMSNorm
from dsv3.model.rope import apply_rope, softmax_scale


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, D = cfg.num_attention_heads, cfg.hidden_size
        self.n_heads, self.q_lora_rank, self.kv_lora_rank = H, cfg.q_lora_rank, cfg.kv_lora_rank
        self.nope, self.rope_dim, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        bias = cfg.attention_bias
        if self.q_lora_rank:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * cfg.qk_head_dim, bias=False)
        else:
            self.q_proj = nn.Linear(D, H * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, cfg.rms_norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=bias)
        self.scale = softmax_scale(cfg)
        self.recompute = False  # recompute the norms / up-projections in backward (train flag)

    def _project(self, x: torch.Tensor, rope) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        B, S, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q = q.view(B, S, self.n_heads, self.nope + self.rope_dim)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, rope)
        kv = self.kv_a_proj_with_mqa(x)
        c_kv, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # [B,S,r]
        k_pe = apply_rope(k_pe.unsqueeze(2), rope)  # [B,S,1,rope]
        return q_nope, q_pe, c_kv, k_pe

    def forward(self, x: torch.Tensor, rope, mask: torch.Tensor | None = None, cache=None) -> torch.Tensor:
        """x [B,S,D]; rope=(cos,sin) for the S positions; mask: bool [B,1,S,T] (True = attend)
        or None (plain causal). With `cache` (a `LayerCache`), run the absorbed path."""
        if cache is not None:
            return self._forward_absorbed(x, rope, mask, cache)
        B, S, _ = x.shape
        if self.recompute and self.training and torch.is_grad_enabled():
            q_nope, q_pe, c_kv, k_pe = torch.utils.checkpoint.checkpoint(
                self._project, x, rope, use_reentrant=False)
        else:
            q_nope, q_pe, c_kv, k_pe = self._project(x, rope)
        kv = self.kv_b_proj(c_kv).view(B, S, self.n_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B,H,S,dqk]
        k = torch.cat([k_nope, k_pe.expand(-1, -1, self.n_heads, -1)], dim=-1).transpose(1, 2)
        o = _sdpa(q, k, v.transpose(1, 2), mask, self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.n_heads * self.v_dim))

    def _attend_expanded(self, q_nope, q_pe, latent, pe, mask) -> torch.Tensor:
        """Attention of S queries over T cached latents, up-projected with kv_b_proj."""
        B, S, H, _ = q_nope.shape
        T = latent.shape[1]
        kv = self.kv_b_proj(latent).view(B, T, H, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, pe[:, :, None].expand(-1, -1, H, -1)], dim=-1).transpose(1, 2)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
        o = _sdpa(q, k, v.transpose(1, 2), mask, self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, H * self.v_dim))

    def _forward_absorbed(self, x, rope, mask, cache) -> torch.Tensor:
        B, S, _ = x.shape
        H, r = self.n_heads, self.kv_lora_rank
        q_nope, q_pe, c_kv, k_pe = self._project(x, rope)
        start = cache.start
        end = start + S
        cache.latent[:B, start:end] = c_kv.to(cache.latent.dtype)
        cache.pe[:B, start:end] = k_pe.squeeze(2).to(cache.pe.dtype)
        if S > 1:  # prefill: expanding the latent once is cheaper than absorbing per query
            latent, pe = cache.latent[:B, :end], cache.pe[:B, :end]  # [B,T,r], [B,T,rope]
            return self._attend_expanded(q_nope, q_pe, latent.to(x.dtype), pe.to(x.dtype), mask)
        # decode, one query per row: W_UK folded into q, W_UV applied after attention (§2.1.1)
        kv = cache.kv[:B, :end].to(x.dtype)  # [B,T,r+rope]: c_KV and k_R side by side
        w = self.kv_b_proj.weight.view(H, self.nope + self.v_dim, r)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]  # [H,nope,r], [H,v,r]
        q_abs = torch.bmm(q_nope.view(B, H, self.nope).transpose(0, 1), w_uk.to(x.dtype))  # [H,B,r]
        q = torch.cat([q_abs.transpose(0, 1), q_pe.view(B, H, self.rope_dim)], dim=-1)  # [B,H,r+rope]
        # Absorbed MLA is multi-query attention over the latent: the H heads act as H queries of one
        # head whose keys are [c_KV; k_R] and values c_KV, so a fused SDPA reads the cache once.
        kv = kv[:, None]  # [B,1,T,r+rope]
        o = F.scaled_dot_product_attention(q[:, None], kv, kv, attn_mask=mask, scale=self.scale)
        o = o[:, 0, :, :r]  # [B,H,r] (the k_R columns of the "values" are computed and dropped)
        o = torch.bmm(o.transpose(0, 1), w_uv.transpose(1, 2).to(x.dtype))  # [H,B,v]
        return self.o_proj(o.transpose(0, 1).reshape(B, 1, H * self.v_dim))


def _sdpa(q, k, v, mask, scale) -> torch.Tensor:
    """SDPA with v zero-padded to the q/k head dim (then cut): PyTorch's fused kernel is
    ~1.5x faster fwd+bwd with equal head dims than with MLA's narrower v (measured on CPU,
    fp32 and bf16, 2 threads); the padded columns contribute exact zeros."""
    dv, dqk = v.shape[-1], q.shape[-1]
    pad = dv < dqk
    if pad:
        v = F.pad(v, (0, dqk - dv))
    if mask is None:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return o[..., :dv] if pad else o
