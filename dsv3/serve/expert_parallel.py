"""Expert-parallel serving with redundant experts and dual micro-batch overlap (paper §3.4).

Design choices
- Ranks (one process each; gloo on CPU, NCCL at scale) serve their own sequences: attention, the dense
  layers, the gates and the shared experts are replicated and run data-parallel (§3.4's DP attention);
  the routed experts are sharded. Each rank is given its block of *physical* experts by an EPLB plan
  (dsv3/serve/eplb.py): `phy2log[layer]` has P = E + redundant slots, rank r owns slots
  [r*P/EP, (r+1)*P/EP); a heavy logical expert may own several slots (redundant experts, §3.4).
  `place_experts(model, phy2log, log2phy, logcnt)` swaps every DeepSeekMoE of a DeepSeekV3 (in
  `model.moe_layers()` order, the rows of the plan) for a `RedundantExpertMoE` in place; replicas of one
  expert on one rank share its module.
- Dispatch among replicas: the (token, expert) pairs a rank routes to logical expert e are dealt to e's
  replicas round-robin (the i-th such pair to replica (i + rank) mod logcnt[e]), so each replica gets
  1/logcnt[e] of the expert's tokens from every rank: the split the EPLB plan assumes.
- Per MoE layer: route (logical ids) -> physical ids -> sort the pairs by slot -> exchange the
  per-slot counts (all_to_all) -> dispatch the token rows (all_to_all_single, per-rank splits) ->
  each local slot runs once on its contiguous rows -> combine (the reverse all_to_all) -> gating weights
  and index_add back to token positions, plus the shared experts. The order of operations is
  DeepSeekMoE.dispatch's, so outputs equal single-process inference up to float summation order.
- Micro-batch overlap (§3.4, "two micro-batches with similar computational workloads, overlapping the
  attention and MoE of one micro-batch with the dispatch and combine of another"): `MicroBatchOverlap`
  runs two micro-batches as coroutines (greenlets in the calling thread: a switch costs < 1 us and needs
  no OS wake-up, where a hand-over between two threads cost ~35 us here and can wait for a time slice
  on a loaded CPU), so exactly one of them computes at any time. Every collective of the MoE layer is issued with
  `async_op=True` (gloo/NCCL progress it on their own threads/streams); at that point the issuing
  micro-batch hands over to the other one (which computes its attention, gate, experts or shared experts
  meanwhile) and waits on its request only when its turn comes back. The strict alternation makes every
  rank issue its collectives in the same order, which gloo/NCCL need. Any model entry point works
  unchanged (forward, forward_step with one cache per micro-batch); without a `MicroBatchOverlap` running,
  the same code waits on each request at once (the non-overlapped path).
- The shared experts of a micro-batch run while its own dispatch is in flight (useful without overlap too).
- Every rank must run the same number of forwards with the same overlap setting; a rank with nothing to
  serve still has to run (idle batches as in SGLang's DP attention: not provided here).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import greenlet
import torch
import torch.distributed as dist
from torch import nn

from dsv3.model.moe import DeepSeekMoE
from dsv3.serve.eplb import rebalance_experts

_local = threading.local()


@dataclass
class EPConfig:
    """Expert-parallel serving: `ep` ranks, `num_redundant` extra physical experts per layer (rounded up so
    that every rank holds the same number), EPLB's `num_groups` (None: the model's n_group) and `num_nodes`
    (ranks are split evenly over nodes; groups % nodes == 0 selects EPLB's hierarchical policy)."""
    ep: int = 1
    num_redundant: int = 0
    num_groups: int | None = None
    num_nodes: int = 1

    def __post_init__(self):
        if self.ep < 1 or self.num_nodes < 1 or self.ep % self.num_nodes:
            raise ValueError(f"ep={self.ep} must be >= 1 and a multiple of num_nodes={self.num_nodes}")
        if self.num_redundant < 0:
            raise ValueError(f"num_redundant must be >= 0, got {self.num_redundant}")

    def plan(self, load: torch.Tensor, model_groups: int = 1):
        """EPLB plan (phy2log, log2phy, logcnt) for a [layers, experts] load matrix."""
        E = load.shape[1]
        P = E + self.num_redundant
        P += (-P) % self.ep
        return rebalance_experts(load, P, self.num_groups or model_groups, self.num_nodes, self.ep)


class MicroBatchOverlap:
    """Run callables as coroutines (greenlets, in the caller's thread): one computes at a time; a
    collective's issuer hands over (`switch`) and waits for its request once its turn comes back."""

    def run(self, fns: Sequence[Callable[[], object]]) -> list:
        self.lets = [greenlet.greenlet(fn) for fn in fns]
        results = [None] * len(fns)
        prev, _local.sched = getattr(_local, "sched", None), self
        try:
            while not all(g.dead for g in self.lets):
                for i, g in enumerate(self.lets):  # round robin; an exception propagates out of switch()
                    if not g.dead:
                        out = g.switch()
                        if g.dead:
                            results[i] = out
        finally:
            _local.sched = prev
        return results

    def owns_current(self) -> bool:
        return greenlet.getcurrent() in self.lets

    def switch(self) -> None:
        """Give the other micro-batch(es) their turn; return when it is ours again."""
        self.lets[0].parent.switch()


WAIT_SECONDS = [0.0]  # time blocked in work.wait() (what overlap could still hide); benchmarks reset it


def _wait(work) -> None:
    sched = getattr(_local, "sched", None)
    if sched is not None and sched.owns_current():
        sched.switch()  # the other micro-batch computes while this request is in flight
    t0 = time.perf_counter()
    work.wait()
    WAIT_SECONDS[0] += time.perf_counter() - t0


def run_micro_batches(fns: Sequence[Callable[[], object]], overlap: bool = True) -> list:
    """Run one callable per micro-batch, overlapped (§3.4) or one after the other."""
    return MicroBatchOverlap().run(fns) if overlap else [f() for f in fns]


class RedundantExpertMoE(DeepSeekMoE):
    """A DeepSeekMoE serving its routed experts from this rank's physical slots (see module docstring).
    It keeps the wrapped layer's gate and shared experts, so `model.moe_layers()` still lists it (same
    rows) and an `ExpertLoadRecorder` attached to the model counts its routing."""

    def __init__(self, moe: DeepSeekMoE, phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor,
                 group=None):
        nn.Module.__init__(self)  # the wrapped layer is built already: take its parts, not a new config
        self.group = group or dist.group.WORLD
        self.ep, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.n_experts, self.topk = moe.n_experts, moe.topk
        self.gate, self.shared_experts = moe.gate, moe.shared_experts
        self.alpha, self.balance_loss = moe.alpha, None
        self.set_plan(moe.experts, phy2log, log2phy, logcnt)

    def set_plan(self, experts: Sequence[nn.Module], phy2log: torch.Tensor, log2phy: torch.Tensor,
                 logcnt: torch.Tensor) -> None:
        """(Re)place this rank's slots from the layer's logical `experts` (§3.4 adjusts the redundant
        experts periodically from online statistics). Every rank applies the same plan at the same step."""
        P = phy2log.numel()
        if P % self.ep:
            raise ValueError(f"{P} physical experts do not split over {self.ep} expert-parallel ranks")
        if log2phy.shape[0] != self.n_experts or logcnt.numel() != self.n_experts:
            raise ValueError(f"plan is for {log2phy.shape[0]} experts, the layer has {self.n_experts}")
        if (logcnt < 1).any() or not torch.equal(torch.bincount(phy2log, minlength=self.n_experts), logcnt):
            raise ValueError("inconsistent plan: every expert needs >= 1 slot and logcnt must count phy2log")
        self.num_phy, self.slots = P, P // self.ep
        self.slot_experts = phy2log[self.rank * self.slots:(self.rank + 1) * self.slots].tolist()
        self.experts = nn.ModuleList(experts[e] for e in self.slot_experts)  # replicas on a rank share a module
        self.register_buffer("log2phy", log2phy.clone(), persistent=False)
        self.register_buffer("logcnt", logcnt.clone(), persistent=False)
        self.rows_received = 0  # (token, expert) rows this rank's slots computed: its measured load

    def physical(self, indices: torch.Tensor) -> torch.Tensor:
        """Logical expert ids [T,k] -> physical slots [T,k]: the i-th pair sent to expert e goes to
        replica (i + rank) mod logcnt[e]."""
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        se = flat[order]
        cnt = torch.bincount(flat, minlength=self.n_experts)
        occ = torch.arange(flat.numel(), device=flat.device) - (cnt.cumsum(0) - cnt)[se]
        rep = (occ + self.rank) % self.logcnt[se]
        phys = torch.empty_like(flat)
        phys[order] = self.log2phy[se, rep]
        return phys.view_as(indices)

    def _run_slots(self, rows: torch.Tensor, recv_counts: torch.Tensor) -> torch.Tensor:
        """rows arrive grouped by source rank, then by slot: regroup by slot, run each slot once, restore."""
        ids = torch.repeat_interleave(torch.arange(self.slots).repeat(self.ep), recv_counts.flatten())
        perm = ids.argsort(stable=True)
        xs, outs, start = rows[perm], [], 0
        for s, c in enumerate(recv_counts.sum(0).tolist()):
            if c:
                outs.append(self.experts[s](xs[start:start + c]))
                start += c
        if not outs:
            return rows
        ys = torch.empty_like(rows)
        ys[perm] = torch.cat(outs)
        return ys

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        flat = x.reshape(-1, D)
        weights, indices = self.gate.route(self.gate.scores(flat))   # [T,k] logical
        phys = self.physical(indices).flatten()
        order = phys.argsort(stable=True)                              # pairs sorted by slot, hence by rank
        tok = order // self.topk
        counts = torch.bincount(phys, minlength=self.num_phy)
        recv_counts = torch.empty_like(counts)
        _wait(dist.all_to_all_single(recv_counts, counts, group=self.group, async_op=True))
        send = counts.view(self.ep, self.slots).sum(1).tolist()
        recv_counts = recv_counts.view(self.ep, self.slots)             # [source rank, local slot]
        recv = recv_counts.sum(1).tolist()
        rows = flat.new_empty(sum(recv), D)
        work = dist.all_to_all_single(rows, flat[tok].contiguous(), recv, send, group=self.group, async_op=True)
        shared = self.shared_experts(x) if self.shared_experts is not None else None
        _wait(work)                                                     # dispatch done
        self.rows_received += rows.shape[0]
        ys = self._run_slots(rows, recv_counts)
        back = flat.new_empty(tok.numel(), D)
        _wait(dist.all_to_all_single(back, ys.contiguous(), send, recv, group=self.group, async_op=True))
        w = weights.flatten()[order].unsqueeze(-1).to(x.dtype)
        y = torch.zeros_like(flat).index_add_(0, tok, back * w).view(B, S, D)  # combine done
        return y + shared if shared is not None else y


def place_experts(model: nn.Module, phy2log: torch.Tensor, log2phy: torch.Tensor, logcnt: torch.Tensor,
                  group=None) -> nn.Module:
    """Swap every DeepSeekMoE of `model` (row i of the plan = `model.moe_layers()[i]`) for its
    RedundantExpertMoE on this rank, in place. Every rank calls it with the same full model and plan."""
    layers = [m for m in model.modules() if isinstance(m, DeepSeekMoE)]
    if any(isinstance(m, RedundantExpertMoE) for m in layers):
        raise ValueError("experts are placed already: place them on a fresh copy of the full model")
    if phy2log.shape[0] != len(layers):
        raise ValueError(f"plan has {phy2log.shape[0]} layers, the model has {len(layers)} MoE layers")
    new = {id(m): RedundantExpertMoE(m, phy2log[i], log2phy[i], logcnt[i], group) for i, m in enumerate(layers)}
    for mod in list(model.modules()):
        for name, child in list(mod.named_children()):
            if id(child) in new:
                setattr(mod, name, new[id(child)])
    return model


def ep_layers(model: nn.Module) -> list[RedundantExpertMoE]:
    return [m for m in model.modules() if isinstance(m, RedundantExpertMoE)]


def update_placement(model: nn.Module, full: nn.Module, phy2log: torch.Tensor, log2phy: torch.Tensor,
                     logcnt: torch.Tensor) -> None:
    """Apply a new plan to an EP model; the weights of newly held experts come from `full` (the whole
    model in host memory here; at scale they would be copied from the ranks holding them)."""
    src = [m for m in full.modules() if isinstance(m, DeepSeekMoE) and not isinstance(m, RedundantExpertMoE)]
    layers = ep_layers(model)
    if len(src) != len(layers) or phy2log.shape[0] != len(layers):
        raise ValueError(f"plan has {phy2log.shape[0]} layers, the model {len(layers)}, the source {len(src)}")
    for i, (layer, moe) in enumerate(zip(layers, src)):
        layer.set_plan(moe.experts, phy2log[i], log2phy[i], logcnt[i])


def rank_loads(model: nn.Module, group=None) -> torch.Tensor:
    """Rows each rank's slots computed so far, per MoE layer, gathered: [layers, ranks] (a collective)."""
    mine = torch.tensor([float(m.rows_received) for m in ep_layers(model)], dtype=torch.float64)
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return torch.stack(out, dim=1)


@torch.no_grad()
def ep_logits(model: nn.Module, input_ids: torch.Tensor, overlap: bool = False,
              attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """This rank's logits [B,S,V]; with `overlap` the batch is split into two micro-batches (B >= 2)."""
    if not overlap:
        return model(input_ids, attention_mask=attention_mask).logits
    B = input_ids.shape[0]
    if B < 2:
        raise ValueError(f"micro-batch overlap needs a batch of >= 2 sequences per rank, got {B}")
    h = (B + 1) // 2
    masks = (None, None) if attention_mask is None else (attention_mask[:h], attention_mask[h:])
    parts = run_micro_batches([lambda: model(input_ids[:h], attention_mask=masks[0]).logits,
                               lambda: model(input_ids[h:], attention_mask=masks[1]).logits])
    return torch.cat(parts)
