"""Activation recomputation flags (DeepSeek-V3 §3.2.3, "Recomputation of RMSNorm and MLA
Up-Projection").

- `norm_up`: the paper's choice. RMSNorm outputs and the MLA projections (down/up-
  projections and their norms, `MLA._project`) are not stored: they are recomputed in
  backward (torch.utils.checkpoint, non-reentrant). Cheap to recompute, large to store.
- `block`: whole-block checkpointing (every transformer block, MTP blocks included):
  the classic, stronger memory saving at ~one extra forward of compute.
- `none`: store everything.
Recomputing an MoE block re-runs the router, so the per-expert load counters see each
token twice in backward-recompute mode; the bias update uses sign(mean - load), which a
uniform factor does not change, and `moe/load_max_over_mean` is a ratio, so both are
unaffected.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _wrap(mod: nn.Module) -> None:
    orig = mod.forward

    def forward(*args, **kwargs):
        if mod.training and torch.is_grad_enabled():
            return checkpoint(orig, *args, use_reentrant=False, **kwargs)
        return orig(*args, **kwargs)

    mod.forward = forward


def apply_recompute(model: nn.Module, mode: str) -> int:
    """Turn recomputation on in place; returns how many modules were wrapped/flagged."""
    if mode == "none":
        return 0
    from dsv3.model.layers import RMSNorm
    from dsv3.model.mla import MLA
    from dsv3.model.block import Block

    n = 0
    for name, m in model.named_modules():
        if mode == "block" and isinstance(m, Block):
            _wrap(m)
            n += 1
        elif mode == "norm_up":
            if isinstance(m, MLA):
                m.recompute = True
                n += 1
            elif isinstance(m, RMSNorm) and name.endswith(("input_layernorm", "post_attention_layernorm")):
                _wrap(m)
                n += 1
    if mode not in ("block", "norm_up"):
        raise ValueError(f"train.recompute: unknown mode {mode!r}")
    return n
