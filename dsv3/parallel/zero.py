"""ZeRO stage 1: optimizer state sharded over the data-parallel ranks (`parallel.zero1`).

Every data-parallel rank holds the whole model and, after the gradient all-reduce, the whole averaged
gradient; plain data parallelism then runs the same AdamW update on every rank, each keeping the whole
optimizer state (2 fp32 moments per parameter: twice the weights). `Zero1` keeps it once over the group:
- Partition: whole parameters (not a flat range), each owned by one rank, balanced by size (largest
  first to the least-loaded rank; deterministic, so every rank computes the same map). Ownership by
  whole tensors keeps the inner optimizer an ordinary one (torch AdamW, or dsv3.fp8.AdamWBF16) over
  ordinary parameters; the cost is balance (a large embedding weighs on one rank).
- `step()`: the inner optimizer, built by `make(groups)` over this rank's parameters with the same
  group hyper-parameters, updates them (AdamW is per element, so each updated value is bitwise what
  the unsharded optimizer computes); then one all-gather per dtype (each rank's updated parameters
  flattened, padded to the longest shard) brings every rank every parameter.
- Checkpoints keep the unsharded format: `full_state_dict()` (a collective) gathers every rank's
  per-parameter states to global rank 0 and renumbers them as the unsharded optimizer numbers its
  parameters (over its groups in order), so `optimizer.pt` is what a plain run saves;
  `load_state_dict(whole)` keeps this rank's entries of a whole state_dict (every rank reads the
  checkpoint), so resume works across layouts (zero1 on or off, any number of ranks).
- `state_dict()` raises: this rank alone holds a part, which must not be saved as if whole.
`param_groups` are the inner optimizer's, read through a property (torch's load_state_dict replaces the
list; the loop's `set_lr` must reach the new one); `zero_grad` clears every parameter's gradient.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist

from dsv3.parallel import collectives


def partition(sizes: list[int], world: int) -> list[int]:
    """Owner rank of each tensor: largest first to the least-loaded rank (ties: lower index, lower rank)."""
    load, owner = [0] * world, [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


class Zero1:
    """This rank's shard of an optimizer over `param_groups` (see the module docstring)."""

    def __init__(self, param_groups: list[dict], make: Callable[[list[dict]], torch.optim.Optimizer], group=None):
        self.group = group
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        self.params = [p for g in param_groups for p in g["params"]]  # the unsharded optimizer's order
        self.owner = partition([p.numel() for p in self.params], self.world)
        self.mine = [i for i, r in enumerate(self.owner) if r == self.rank]  # global indices, in the inner order
        mine, start, local_groups = set(self.mine), 0, []
        self.group_sizes = []
        for g in param_groups:
            n = len(g["params"])
            local_groups.append({**g, "params": [self.params[i] for i in range(start, start + n) if i in mine]})
            self.group_sizes.append(n)
            start += n
        self.inner = make(local_groups)
        self.shard_numel = [sum(p.numel() for p, r in zip(self.params, self.owner) if r == k)
                            for k in range(self.world)]

    @property
    def param_groups(self) -> list[dict]:
        return self.inner.param_groups  # a property: torch's load_state_dict replaces the list

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.inner.step(closure)
        self._all_gather()
        return loss

    @torch.no_grad()
    def _all_gather(self) -> None:
        for dtype in dict.fromkeys(p.dtype for p in self.params):
            owned = [[p for p, r in zip(self.params, self.owner) if r == k and p.dtype == dtype]
                     for k in range(self.world)]
            sizes = [sum(p.numel() for p in ps) for ps in owned]
            device = self.params[0].device
            buf = torch.zeros(max(sizes), dtype=dtype, device=device)
            if owned[self.rank]:
                buf[:sizes[self.rank]] = torch.cat([p.detach().reshape(-1) for p in owned[self.rank]])
            got = [torch.empty_like(buf) for _ in range(self.world)]
            dist.all_gather(got, buf, group=self.group)
            for k in range(self.world):
                if k == self.rank or not owned[k]:
                    continue
                offset = 0
                for p in owned[k]:
                    p.copy_(got[k][offset:offset + p.numel()].view_as(p))
                    offset += p.numel()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_().zero_()

    def state_dict(self):
        raise RuntimeError("Zero1.state_dict: this rank holds 1/world of the optimizer state; use "
                           "full_state_dict() (a collective) for the whole one")

    def full_state_dict(self) -> dict | None:
        """The unsharded optimizer's state_dict on global rank 0 (None elsewhere); a collective over `group`."""
        local = self.inner.state_dict()
        mine = {self.mine[j]: st for j, st in local["state"].items()}  # inner index j -> global index
        got = collectives.gather_union({"state": mine}, self.group)
        if got is None:
            return None
        groups, start = [], 0
        for pg, n in zip(local["param_groups"], self.group_sizes):
            groups.append({**pg, "params": list(range(start, start + n))})
            start += n
        return {"state": dict(sorted(got["state"].items())), "param_groups": groups}

    def load_state_dict(self, whole: dict) -> None:
        """Keep this rank's part of a whole (unsharded) state_dict."""
        if len(whole["param_groups"]) != len(self.group_sizes) or \
                [len(g["params"]) for g in whole["param_groups"]] != self.group_sizes:
            raise ValueError(f"Zero1.load_state_dict: the state_dict's groups hold "
                             f"{[len(g['params']) for g in whole['param_groups']]} parameters, this "
                             f"optimizer's {self.group_sizes}")
        state = {j: whole["state"][i] for j, i in enumerate(self.mine) if i in whole["state"]}
        groups, start, local_start = [], 0, 0
        mine = set(self.mine)
        for pg, n in zip(whole["param_groups"], self.group_sizes):
            k = sum(1 for i in range(start, start + n) if i in mine)
            groups.append({**pg, "params": list(range(local_start, local_start + k))})
            start, local_start = start + n, local_start + k
        self.inner.load_state_dict({"state": state, "param_groups": groups})
