"""Split a `DeepSeekV3` into pipeline stage modules (report §3.2.1: PP with DualPipe / DualPipeV / 1F1B).

    stage 0     : embed_tokens -> blocks[0:a]
    stage i     : blocks[a_i:a_{i+1}]
    stage n - 1 : blocks[...:L]; its `loss(h, input_ids, labels)` = final norm -> lm_head -> CE, plus the
                  MTP modules (they need the embedding of later tokens: the stage keeps a reference to
                  `embed_tokens`, and takes the micro-batch's input_ids as a label)
Design:
- Every stage maps one float tensor [mb, S, D] to one; the rope for positions 0..S-1 is recomputed per
  stage (packed pretraining batches, no attention mask). Stage modules share the model's parameters
  (no copy): `split_model` on each rank, then keep the stages that rank runs.
- The MoE sequence-balance loss is produced inside the stages; `_AddAux` passes h through and feeds
  d(loss)/d(aux) = 1 to the aux loss in backward, so its gradient is exact although the pipeline's
  reported loss (CE + λ·MTP) does not include it. With aux_loss_alpha = 0 the pipeline loss equals
  `model(input_ids, labels).loss`.
- Embedding sharing: DualPipe places stage 0 and stage PP-1 on rank 0, so the embedding used by MTP
  is the same tensor there; with other placements the two copies' grads must be summed by the trainer
  (`shared_embedding_params`).
- `pipeline_for(model, kind, group)` is the one call a trainer needs: it builds the schedule object
  for this rank with its stage modules and P2P shapes set.
- Training integration (dsv3/train/pipeline_step.py): `Stage.aux_grad_scale` is the d(loss)/d(aux) fed
  to the balance losses (1/num_chunks when the criterion averages over chunks), and `Stage.stats`, when
  a dict, accumulates the detached loss parts computed on that stage (`main`, `mtp` per depth,
  `balance`) so the trainer can report the model's loss components.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from dsv3.model.loss import shifted_cross_entropy
from dsv3.parallel.pipeline import DualPipe, DualPipeV, OneFOneB


class _AddAux(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, aux, scale=1.0):
        ctx.aux_shape, ctx.scale = aux.shape, scale
        return h

    @staticmethod
    def backward(ctx, g):
        return g, g.new_full(ctx.aux_shape, ctx.scale), None


class Stage(nn.Module):
    def __init__(self, model, lo: int, hi: int, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        self.rotary = model.rotary
        self.layers = nn.ModuleList(model.layers[lo:hi])
        self.embed_tokens = model.embed_tokens if (first or (last and len(model.mtp))) else None
        if last:
            self.norm, self.lm_head, self.mtp = model.norm, model.lm_head, model.mtp
            self.mtp_loss_weight = model.mtp_loss_weight
        self.aux_grad_scale = 1.0
        self.stats: dict | None = None

    def _rope(self, S: int, device):
        return self.rotary(torch.arange(S, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(x) if self.first else x
        rope = self._rope(h.shape[1], h.device)
        for layer in self.layers:
            h = self._add_aux(layer(h, rope), layer)
        return h

    def _add_aux(self, h, block):
        bal = getattr(block.mlp, "balance_loss", None)
        if bal is not None and self.stats is not None:
            self.stats["balance"] = self.stats.get("balance", 0.0) + bal.detach()
        return _AddAux.apply(h, bal, self.aux_grad_scale) if bal is not None and torch.is_grad_enabled() else h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(h))

    def loss(self, h: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """CE(main) + λ·mean_k CE(MTP depth k): the model's loss without the balance term."""
        loss = main = shifted_cross_entropy(self.logits(h), labels, 1)
        S = h.shape[1]
        if len(self.mtp):
            emb, rope, h_k, mtp = self.embed_tokens(input_ids), self._rope(S, h.device), h, []
            for k, mod in enumerate(self.mtp, start=1):
                if S - k < 1:
                    break
                h_k = mod(h_k[:, : S - k], emb[:, k:], (rope[0][:, : S - k], rope[1][:, : S - k]))
                h_k = self._add_aux(h_k, mod.block)
                mtp.append(shifted_cross_entropy(self.lm_head(mod.norm(h_k)), labels, k + 1))
            if mtp:
                loss = loss + self.mtp_loss_weight * torch.stack(mtp).mean()
            if self.stats is not None:
                for k, m in enumerate(mtp):
                    self.stats.setdefault("mtp", {})[k] = self.stats.get("mtp", {}).get(k, 0.0) + m.detach()
        if self.stats is not None:
            self.stats["main"] = self.stats.get("main", 0.0) + main.detach()
        return loss


def layer_split(n_layers: int, n_stages: int) -> list[int]:
    """Stage boundaries with the layers spread as evenly as possible (earlier stages get the extra)."""
    if not 1 <= n_stages <= n_layers:
        raise ValueError(f"cannot split {n_layers} layers into {n_stages} pipeline stages")
    q, r = divmod(n_layers, n_stages)
    bounds = [0]
    for i in range(n_stages):
        bounds.append(bounds[-1] + q + (1 if i < r else 0))
    return bounds


def split_model(model, n_stages: int, bounds: list[int] | None = None) -> list[Stage]:
    """`n_stages` Stage modules sharing `model`'s parameters; bounds: layer indices [0, ..., L]."""
    L = len(model.layers)
    bounds = bounds or layer_split(L, n_stages)
    if len(bounds) != n_stages + 1 or bounds[0] != 0 or bounds[-1] != L or sorted(bounds) != bounds:
        raise ValueError(f"bounds must rise from 0 to {L} with {n_stages + 1} entries, got {bounds}")
    return [Stage(model, bounds[i], bounds[i + 1], i == 0, i == n_stages - 1) for i in range(n_stages)]


def stages_for_rank(kind: str, stages: list, pp: int, rank: int) -> tuple:
    """The stage modules a rank holds: 1f1b (r,), dualpipe (r, PP-1-r), dualpipev (r, 2PP-1-r)."""
    want = {"1f1b": pp, "dualpipe": pp, "dualpipev": 2 * pp}[kind]
    if len(stages) != want:
        raise ValueError(f"{kind} with PP={pp} needs {want} stages, got {len(stages)}")
    if kind == "1f1b":
        return (stages[rank],)
    return (stages[rank], stages[want - 1 - rank])


def shared_embedding_params(stages_held: tuple) -> list:
    """Embedding weights used by more than one stage on this rank's side of the pipe (to all-reduce)."""
    return [s.embed_tokens.weight for s in stages_held if s.embed_tokens is not None]


def pipeline_for(model, kind: str, micro_batch: int, seq_len: int, group=None, bounds=None):
    """Build this rank's schedule (`DualPipe` / `DualPipeV` / `OneFOneB`) over `group` for `model`.
    Returns (pipe, criterion): call `pipe.step(*inputs, num_chunks=n, criterion=criterion,
    labels=(input_ids, labels))` on the ranks that feed / finish the pipe (see DualPipe.step)."""
    group = group or dist.group.WORLD
    pp, rank = dist.get_world_size(group), dist.get_rank(group)
    n_stages = 2 * pp if kind == "dualpipev" else pp
    stages = split_model(model, n_stages, bounds)
    mods = stages_for_rank(kind, stages, pp, rank)
    cls = {"1f1b": OneFOneB, "dualpipe": DualPipe, "dualpipev": DualPipeV}[kind]
    pipe = cls(mods, process_group=group)
    pipe.set_p2p_tensor_shapes([(micro_batch, seq_len, model.config.hidden_size)])
    pipe.set_p2p_tensor_dtype(model.dtype)
    last = [m for m in mods if m.last]
    return pipe, (last[0].loss if last else None)
