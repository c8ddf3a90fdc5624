"""One transformer block (paper §2, Fig. 2): pre-norm MLA attention, then a dense MLP or DeepSeekMoE.

    x ─► input_layernorm ─► MLA ─(+x)─► post_attention_layernorm ─► MLP | DeepSeekMoE ─(+)─► out

Design choices
- Pre-norm residual: x += attn(norm(x)); x += ffn(norm(x)).
- The first `first_k_dense_replace` layers use a dense SwiGLU MLP, the rest DeepSeekMoE (§4.2).
- Its own module (not inside transformer.py) because both the main stack (transformer.py) and
  the MTP modules (mtp.py, §2.2: each depth runs one block) build it: neither imports the other.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.model.config import ModelConfig
from dsv3.model.layers import MLP, RMSNorm
from dsv3.model.mla import MLA
from dsv3.model.moe import DeepSeekMoE


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = DeepSeekMoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, rope, mask=None, cache=None) -> torch.Tensor:
        """x: [B, S, D] -> [B, S, D]; cache: this layer's latent cache (generation) or None."""
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))
