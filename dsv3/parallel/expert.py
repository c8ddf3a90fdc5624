"""Expert parallelism for `DeepSeekMoE`: sharded routed experts, all-to-all dispatch/combine (report §3.2.2).

Design:
- `ExpertParallelMoE(moe, group, ranks_per_node, max_nodes)` wraps an in-repo `DeepSeekMoE`. The EP
  group's ranks each own a contiguous slice of E/EP routed experts; the gate and the shared experts
  are replicated (each rank routes its own tokens, as attention is data-parallel in §3.2.2).
- Node-limited routing (§2.1.2 / §3.2.2): ranks are grouped into nodes of `ranks_per_node`; a token's
  experts lie on at most `max_nodes` (M) nodes. It is the gate's own group-limited rule with the groups
  set to the nodes (groups = nodes, topk_group = M): node score = sum of the top-2 biased affinities on the
  node (V3), keep the best M nodes, then top-K experts among them. So an EP layer with M gives exactly
  the single-process MoE whose config has n_group = #nodes, topk_group = M.
- Dispatch: the (token, expert) pairs are sorted by expert (hence by owning rank), the per-rank and
  per-expert counts exchanged, the token rows sent with `all_to_all_single` and per-rank split sizes;
  each local expert runs once on its contiguous rows; combine is the reverse all-to-all, then the
  gating weights and an index_add back to token positions (the same order of operations as
  `DeepSeekMoE.dispatch`). One row per (token, expert) pair: the paper's "send once per node, then
  forward over NVLink" de-duplication is not done here.
- `shard_experts(model, group, ...)` swaps every DeepSeekMoE of a DeepSeekV3 for its EP layer in place
  (the other ranks' experts are dropped). Pretraining uses it with `parallel.ep > 1`:
  dsv3/train/expert_step.py (EP groups of dp ranks, of each stage position's dp ranks when pp > 1;
  gradient sync, whole-model checkpoints).
- Autograd: `all_to_all` is a custom Function whose backward is the all-to-all with the splits swapped.
  Every rank must run the same backward all-to-alls, so a rank whose experts receive no row returns the
  (empty, differentiable) received rows, never a detached tensor (that cut the graph and deadlocked or
  crashed gloo when routing starved a rank's experts).
- Dual micro-batch overlap: `forward_overlapped(x)` splits the tokens in two and issues the
  dispatch/combine of one half with `async_op=True` while the other half computes (§3.2.2's overlap of
  two micro-batches). gloo runs all_to_all_single asynchronously on its worker thread, so this works on
  CPU too; it is a forward (inference / no-grad) path. Training uses the synchronous path: an
  autograd version needs the backward all-to-alls issued in the same order on every rank, which the
  autograd engine's ready-queue order does not promise (not done).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from dsv3.model.moe import DeepSeekMoE


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, out_splits, in_splits, group):
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty((sum(out_splits),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, g):
        out_splits, in_splits = ctx.splits
        grad = g.new_empty((sum(in_splits),) + tuple(g.shape[1:]))
        dist.all_to_all_single(grad, g.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list, in_splits: list, group=None) -> torch.Tensor:
    """Differentiable all_to_all_single over dim 0 with per-rank split sizes."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


class ExpertParallelMoE(DeepSeekMoE):
    """A DeepSeekMoE whose routed experts are this rank's E/EP slice (`experts[i]` is global expert
    `local_range[0] + i`); gate, shared experts, load counters and `update_bias` are the wrapped layer's,
    so `model.moe_layers()` / `expert_load()` / `update_bias()` keep working (load: this rank's tokens)."""

    def __init__(self, moe: DeepSeekMoE, group=None, ranks_per_node: int = 1, max_nodes: int | None = None):
        nn.Module.__init__(self)  # the wrapped layer is already built: take its parts, not a new config
        self.group = group or dist.group.WORLD
        self.ep, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        E = moe.n_experts
        if E % self.ep:
            raise ValueError(f"n_routed_experts={E} is not divisible by the expert-parallel size {self.ep}")
        if self.ep % ranks_per_node:
            raise ValueError(f"EP size {self.ep} is not divisible by ranks_per_node={ranks_per_node}")
        self.n_nodes = self.ep // ranks_per_node
        if max_nodes is not None and not 1 <= max_nodes <= self.n_nodes:
            raise ValueError(f"max_nodes must be in [1, {self.n_nodes}] (nodes = EP / ranks_per_node), got {max_nodes}")
        self.max_nodes = max_nodes
        self.per_rank, self.topk, self.n_experts = E // self.ep, moe.topk, E
        lo = self.rank * self.per_rank
        self.local_range = (lo, lo + self.per_rank)
        self.gate, self.shared_experts = moe.gate, moe.shared_experts
        self.experts = nn.ModuleList(moe.experts[lo:lo + self.per_rank])
        self.alpha = moe.alpha
        self.balance_loss = None

    # ---------- routing ----------
    def route(self, flat: torch.Tensor):
        scores = self.gate.scores(flat)
        if self.max_nodes is None:
            return scores, *self.gate.route(scores)
        g = self.gate
        saved = g.n_group, g.topk_group
        g.n_group, g.topk_group = self.n_nodes, self.max_nodes  # groups = nodes (node-limited routing)
        try:
            w, idx = g.route(scores)
        finally:
            g.n_group, g.topk_group = saved
        return scores, w, idx

    def nodes_of(self, indices: torch.Tensor) -> torch.Tensor:
        """Node id of each selected expert."""
        return indices // (self.per_rank * (self.ep // self.n_nodes))

    # ---------- dispatch / experts / combine ----------
    def _plan(self, indices: torch.Tensor):
        k = indices.shape[1]
        flat_e = indices.flatten()
        order = flat_e.argsort(stable=True)
        counts_e = torch.bincount(flat_e, minlength=self.n_experts)
        recv_e = torch.empty_like(counts_e)
        dist.all_to_all_single(recv_e, counts_e, group=self.group)  # [src, local expert] counts
        send = counts_e.view(self.ep, -1).sum(1).tolist()
        recv_e = recv_e.view(self.ep, self.per_rank)
        recv = recv_e.sum(1).tolist()
        # rows arrive grouped by source rank, then by local expert: a stable sort groups them by expert
        local_ids = torch.repeat_interleave(torch.arange(self.per_rank).repeat(self.ep), recv_e.flatten())
        return order, order // k, send, recv, local_ids

    def _experts(self, rows: torch.Tensor, local_ids: torch.Tensor) -> torch.Tensor:
        perm = local_ids.argsort(stable=True)
        counts = torch.bincount(local_ids, minlength=self.per_rank).tolist()
        xs, outs, start = rows[perm], [], 0
        for e, c in enumerate(counts):
            if c:
                outs.append(self.experts[e](xs[start:start + c]))
                start += c
        if not outs:  # no rows for this rank's experts: stay in the graph (rows is empty and differentiable),
            return rows  # so the backward all-to-alls run here too; a detached zeros tensor would skip them
        return torch.cat(outs)[perm.argsort()]

    def _combine(self, x, ys, order, tok, weights):
        ws = weights.flatten()[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, tok, (ys * ws.to(x.dtype)).to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, D = x.shape
        flat = x.reshape(-1, D)
        scores, weights, indices = self.route(flat)
        self.account(scores, indices, B, S)
        order, tok, send, recv, local_ids = self._plan(indices)
        rows = all_to_all(flat[tok], recv, send, self.group)          # dispatch
        back = all_to_all(self._experts(rows, local_ids), send, recv, self.group)  # combine
        y = self._combine(flat, back, order, tok, weights).view(B, S, D)
        return y + self.shared_experts(x) if self.shared_experts is not None else y

    @torch.no_grad()
    def forward_overlapped(self, x: torch.Tensor) -> torch.Tensor:
        """Two micro-batches (halves of the batch): one's all-to-all runs while the other computes."""
        B, S, D = x.shape
        halves = [h.reshape(-1, D) for h in x.chunk(2, 0)] if B > 1 else [x.reshape(-1, D)]
        st = []
        for h in halves:
            scores, w, idx = self.route(h)
            st.append([h, w, *self._plan(idx)])

        def a2a(t, out_s, in_s):
            out = t.new_empty((sum(out_s), D))
            return out, dist.all_to_all_single(out, t.contiguous(), out_s, in_s, group=self.group, async_op=True)

        disp = [a2a(h[tok], recv, send) for h, _, _, tok, send, recv, _ in st]   # both dispatches in flight
        shared = [self.shared_experts(h) if self.shared_experts is not None else None for h in halves]
        comb = []
        for (rows, work), (h, w, order, tok, send, recv, ids) in zip(disp, st):
            work.wait()  # the other half's dispatch/combine keeps running meanwhile
            comb.append(a2a(self._experts(rows, ids), send, recv))
        outs = []
        for (back, work), (h, w, order, tok, *_), sh in zip(comb, st, shared):
            work.wait()
            y = self._combine(h, back, order, tok, w)
            outs.append(y + sh if sh is not None else y)
        return torch.cat(outs).view(B, S, D)


def shard_experts(model: nn.Module, group=None, ranks_per_node: int = 1, max_nodes: int | None = None) -> nn.Module:
    """Replace every DeepSeekMoE in `model` (blocks and MTP) by its ExpertParallelMoE over `group`, in place.
    Every rank of the group calls it on an identically initialised model; each keeps its expert slice."""
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, DeepSeekMoE) and not isinstance(child, ExpertParallelMoE):
                setattr(mod, child_name, ExpertParallelMoE(child, group, ranks_per_node, max_nodes))
    return model
