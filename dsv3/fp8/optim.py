"""AdamW with BF16 moments and FP32 master weights (DeepSeek-V3 §3.3.3).

§3.3.3 "Low-precision optimizer states": the first and second moments of AdamW are kept
in BF16 instead of FP32 without observable degradation, while the master weights (and
the gradients used for the update) stay FP32.

Design choices
- State ``exp_avg`` / ``exp_avg_sq`` are ``torch.bfloat16`` tensors (half the memory of
  FP32 moments). Each step they are read, updated in FP32 with the FP32 gradient, used in
  FP32 for this step's update, then rounded (nearest-even) back to BF16 for storage -
  what a fused optimizer kernel would do with FP32 registers and BF16 memory.
- The parameter is updated in its own dtype (FP32 master weights in the paper's recipe).
- Decoupled weight decay as in ``torch.optim.AdamW``: ``p *= 1 - lr * weight_decay``.
  Param groups (e.g. no decay on norms and biases) work as usual.
"""

from __future__ import annotations

import math

import torch

__all__ = ["AdamWBF16"]


class AdamWBF16(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.1, state_dtype: torch.dtype = torch.bfloat16):
        if lr < 0 or eps < 0 or weight_decay < 0:
            raise ValueError("lr, eps and weight_decay must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      state_dtype=state_dtype))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("AdamWBF16 does not support sparse gradients")
                st = self.state[p]
                if not st:
                    st["step"] = 0
                    st["exp_avg"] = torch.zeros_like(p, dtype=group["state_dtype"])
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=group["state_dtype"])
                st["step"] += 1
                t = st["step"]
                g = p.grad.float()
                m = st["exp_avg"].float().mul_(b1).add_(g, alpha=1 - b1)
                v = st["exp_avg_sq"].float().mul_(b2).addcmul_(g, g, value=1 - b2)
                st["exp_avg"].copy_(m)
                st["exp_avg_sq"].copy_(v)
                bc1 = 1 - b1 ** t
                bc2 = 1 - b2 ** t
                denom = (v.sqrt_() / math.sqrt(bc2)).add_(eps)
                upd = m.div_(denom).mul_(lr / bc1)
                if wd:
                    p.mul_(1 - lr * wd)
                p.sub_(upd.to(p.dtype))
        return loss
