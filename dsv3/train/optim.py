"""AdamW with the paper's settings (§4.2): β1 0.9, β2 0.95, weight decay 0.1.

Design choices
- Two parameter groups: weight decay on matrices (Linear / Embedding weights, the gate),
  none on norms, biases and any 1-D parameter (standard practice; the paper states 0.1
  without listing exclusions).
- FP32 master weights: the optimizer always works on the fp32 parameters; bf16/fp8 only
  change the GEMMs (§3.3.1). `foreach` is kept (deterministic on CPU).
- The LR is set per step by the loop from `Schedules.lr` (no torch LR scheduler object:
  the step index fully determines it, so resume is exact).
- `parallel.zero1` (plain data parallelism): the state sharded over the ranks (dsv3.parallel.zero.Zero1,
  ZeRO stage 1); each rank steps its parameters and all-gathers the rest; checkpoints unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.parallel import collectives
from dsv3.parallel.zero import Zero1


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        lname = name.lower()
        if p.ndim < 2 or "norm" in lname or lname.endswith("bias"):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
            {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]


def group_names(model: nn.Module, opt: torch.optim.Optimizer | None = None) -> list[list[str]]:
    """Parameter names per group, in the optimizer's order (`opt`'s, else `param_groups`'): how sharded
    layouts map optimizer indices to names and back."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    groups = opt.param_groups if opt is not None else param_groups(model, 0.0)
    return [[name_of[id(p)] for p in group["params"]] for group in groups]


def make_optimizer(model: nn.Module, tcfg, zero1: bool = False) -> torch.optim.AdamW | Zero1:
    """AdamW over `model`'s groups; zero1 (with more than one rank): its state sharded over the world."""
    def adamw(groups: list[dict]) -> torch.optim.AdamW:
        return torch.optim.AdamW(groups, lr=tcfg.lr, betas=tuple(tcfg.betas), eps=tcfg.eps,
                                 weight_decay=tcfg.weight_decay)

    groups = param_groups(model, tcfg.weight_decay)
    return Zero1(groups, adamw) if zero1 and collectives.world()[1] > 1 else adamw(groups)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
