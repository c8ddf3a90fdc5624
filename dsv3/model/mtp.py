"""Multi-Token Prediction modules (paper §2.2, eq. 21-25).

Design choices
- D sequential modules; module k combines the previous depth's hidden state h^{k-1}_i
  with the embedding of token t_{i+k}: h'_i = M_k [RMSNorm(·); RMSNorm(·)], runs one
  transformer block on it, and predicts t_{i+k+1} through the *shared* output head.
- Concatenation order: the paper writes [RMSNorm(h); RMSNorm(Emb)], but the released V3
  weights (`eh_proj` of layer 61, as read by vLLM/SGLang) expect [enorm(Emb); hnorm(h)].
  We follow the weights so that official checkpoints load unchanged.
- The embedding and output head are the main model's tensors, passed in at call time
  (no copy, no second parameter). `shared_head.norm` is the module's own final norm.
- The modules are independent of the main model: drop them for plain inference.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.model.block import Block
from dsv3.model.config import ModelConfig
from dsv3.model.layers import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        D = cfg.hidden_size
        self.enorm = RMSNorm(D, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(D, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * D, D, bias=False)
        self.block = Block(cfg, layer_idx)
        self.norm = RMSNorm(D, cfg.rms_norm_eps)  # HF: shared_head.norm

    def forward(self, h_prev: torch.Tensor, emb_next: torch.Tensor, rope, mask=None) -> torch.Tensor:
        """h_prev, emb_next: [B,S',D] aligned so that emb_next[i] = Emb(t_{i+k}). Returns h^k."""
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.block(h, rope, mask)
