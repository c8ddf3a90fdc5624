"""Expert parallelism in pretraining (report §3.2.2), for `train(cfg)` when `cfg.parallel.ep > 1` (issue 7).

The ranks are the `parallel.dp` data-parallel workers of the training group (Ray Train via
`dsv3.launch.run_training`; gloo on CPU, NCCL on GPU); this module only uses torch.distributed. With
pipeline parallelism (`parallel.pp` = P > 1, world = dp × P) see "With pipelines" below.

Design (§3.2.2: attention and the dense parts data-parallel, routed experts sharded over the EP group):
- Groups: consecutive blocks of `ep` = M ranks form the EP groups ({0..M-1}, {M..2M-1}, ...); rank j of
  every EP group holds the same expert slice, so the "replica" groups are {j, j+M, j+2M, ...}. All groups
  are created with `dist.new_group` in the same order on every rank.
- Every rank builds the whole `DeepSeekV3` from the same seed (so weights equal the plain run's), then
  `shard_experts` swaps each DeepSeekMoE (blocks and MTP) for an `ExpertParallelMoE` holding E/M routed
  experts; the other experts are dropped (nothing references them: their parameters no longer exist on
  this rank; the transient peak at build time is one whole model). The optimizer and the CPU EMA are
  built afterwards, over the local parameters only. Routing is node-limited when `parallel.max_nodes`
  is set (`parallel.ep_ranks_per_node` ranks per node), else the model's own group-limited routing.
- Gradients: the all-to-all backward already sums, on the expert's owner, the contributions of all
  tokens of the EP group. Non-expert parameters: all-reduce over the world / world (as the plain loop);
  expert slices: all-reduce over the replica group / world. Both equal the plain DDP gradient
  (mean over ranks of each rank's loss gradient).
- Clipping: global norm² = dense norm² (identical on all ranks, counted once) + the sum over one EP
  group of the expert-slice norms² (each slice once), then clip_grad_norm_'s rule. Summed in float64:
  torch's clip_grad_norm_ (the plain loop) takes fp32 `_foreach_norm`s, which on the `small` preset's
  3M-element lm_head is off by ~4e-4 relative, so there EP and DP grad norms differ by ~1e-4 (tiny: 1e-7).
- Loads for the bias update (§2.1.2): an EP layer counts, for this rank's tokens, all E experts (routing
  is replicated), so the loop's world all-reduce of `model.expert_load()` is already the global count
  on every rank and the replicated gate bias gets the same update everywhere. Nothing to do here.
- Checkpoints stay one whole model: `full_state(opt, ema)` (a collective) gathers the expert slices, their
  AdamW state and their EMA to rank 0 of EP group 0 (global rank 0), which assembles a whole
  `DeepSeekV3`, the optimizer state_dict a plain run would save (same parameter order) and the EMA dict;
  `checkpoint.save` writes them unchanged. `checkpoint.load(ckpt, model, opt, ema, part=self)` loads a
  whole checkpoint into the sharded model: each rank reads it and keeps its slice (resume and rollback).
  Evaluation, HF export, EMA evaluation and `init_from` (applied before sharding) work unchanged.
- Evaluation: an EP forward is a collective, so every rank runs the same number of validation
  forwards (`pad_batches`); the padding batches are not counted.
- Works with recomputation, the CPU EMA, NaN/spike skips + rollback, and fp8 (§3.3; the Linear swap
  happens before sharding; its wgrad tile scales depend on how an expert's tokens are batched, so fp8
  EP matches fp8 DP to ~1e-5, fp32 EP matches fp32 DP to float rounding: tests/train/test_expert_parallel.py).
With pipelines (§3.2.2: EP spans the data-parallel ranks of a pipeline stage): pipeline d is ranks
d·P .. d·P+P-1 (dsv3/train/pipeline_step.py); at each stage position i the EP groups are M consecutive
members of that position's data-parallel group ({(g·M + k)·P + i : k < M}), the replica groups the same
slice in its other EP groups. `ExpertStep` is built first (whole model, then the expert slices), then
`PipelineStep(model, cfg, ep=...)` frees the other stages; the pipeline does the rest with this object's
groups and maps (`g`, `expert_names`, `whole_optimizer` / `local_optimizer`, `pad_batches`): non-expert
held grads averaged over the stage's dp group, expert slices over the replica group (both / dp), the
clip norm summed over the pipeline (each parameter on its owner) and the expert part over the EP group,
checkpoints gathered from pipelines 0..M-1 (which hold every stage and every slice) into one whole
model + plain AdamW state + EMA, loads keeping each rank's stage parameters and slices. Collective order:
every schedule's op list (F/B/W and DualPipe's F&B pairs, both directions) is a function of (schedule,
P, stage position, num_chunks) and runs on one thread, and all pipelines run the same one on equally
shaped micro-batches, so the members of an EP group run the same MoE layers' all-to-alls in the same
order (W ops only do Linear weight grads, no collective); validation runs the stages in the same order
on every pipeline, padded to the same number of batches. So 1F1B, DualPipe and DualPipeV all work
(tests/train/test_pipeline.py: the EP group's members advance op by op together, like one rank of a
single pipeline, whose schedule does not deadlock). Not tried on NCCL, where the all-to-all and the
pipeline's P2P run on two communicators.
Unsupported (ConfigError naming the key, from `check_config`, before any work; dsv3.launch.run_training
checks too, before starting Ray): ep not dividing parallel.dp or model.n_routed_experts, ranks !=
parallel.dp × parallel.pp, a model without MoE layers. Not done: the paper's per-node de-duplicated
dispatch and the overlapped (dual micro-batch) training path (see dsv3/parallel/expert.py).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from dsv3.model.config import ConfigError
from dsv3.train.checkpoint import StateDict


def check_config(cfg, world: int) -> None:
    """Errors for an expert-parallel run that cannot work, naming the config key."""
    p, m = cfg.parallel, cfg.model
    if p.ep <= 1:
        return
    if p.dp % p.ep:
        raise ConfigError(f"parallel.ep: ep={p.ep} does not divide parallel.dp={p.dp} (EP groups are made of "
                          "data-parallel ranks)")
    if m.n_routed_experts % p.ep:
        raise ConfigError(f"parallel.ep: ep={p.ep} does not divide model.n_routed_experts={m.n_routed_experts}")
    if m.first_k_dense_replace >= m.num_hidden_layers and not m.num_nextn_predict_layers:
        raise ConfigError(f"parallel.ep: ep={p.ep} but the model has no MoE layer (model.first_k_dense_replace)")
    if world != p.dp * p.pp:
        raise ConfigError(f"parallel.dp: expert parallelism needs dp × pp = {p.dp} × {p.pp} ranks, got {world} "
                          "(launch with dsv3.launch.run_training / dsv3 pretrain, which start dp × pp workers)")


class ExpertStep:
    """This rank's expert-parallel state; see the module docstring. Shards `model` in place."""

    def __init__(self, model, cfg):
        from dsv3.parallel.expert import ExpertParallelMoE, shard_experts

        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        check_config(cfg, self.world)
        M = self.M = cfg.parallel.ep
        D, P = self.dp, self.pp = cfg.parallel.dp, cfg.parallel.pp
        self.config = model.config
        # per stage position i (pp = 1: one position, the world), its data-parallel ranks d·P + i, d < D;
        # EP groups: M consecutive of them; replica groups: the same expert slice in the other EP groups
        for i in range(P):
            for g in range(D // M):
                ranks = [(g * M + k) * P + i for k in range(M)]
                pg = dist.new_group(ranks)
                if self.rank in ranks:
                    self.ep_group = pg
            for j in range(M):
                ranks = [(j + t * M) * P + i for t in range(D // M)]
                pg = dist.new_group(ranks)
                if self.rank in ranks:
                    self.rep_group, self.n_rep = pg, len(ranks)
        # the whole model's optimizer order (names), as a plain run's AdamW sees it
        self.full_groups = _groups(model)
        shard_experts(model, self.ep_group, cfg.parallel.ep_ranks_per_node, cfg.parallel.max_nodes)
        self.glob: dict[str, str] = {}  # local parameter / buffer name -> name in the whole model
        self.expert_names: set[str] = set()  # local names of this rank's routed-expert parameters
        for mname, mod in model.named_modules():
            if isinstance(mod, ExpertParallelMoE):
                lo = mod.local_range[0]
                for i, e in enumerate(mod.experts):
                    for pn, _ in e.named_parameters():
                        local = f"{mname}.experts.{i}.{pn}"
                        self.glob[local] = f"{mname}.experts.{lo + i}.{pn}"
                        self.expert_names.add(local)
        named = list(model.named_parameters())
        self.expert_params = [p for n, p in named if n in self.expert_names and p.requires_grad]
        self.dense_params = [p for n, p in named if n not in self.expert_names and p.requires_grad]
        self.device = self.dense_params[0].device  # collectives on the model's device (NCCL needs CUDA tensors)
        n_exp = torch.tensor([sum(p.numel() for p in self.expert_params)], dtype=torch.float64, device=self.device)
        dist.all_reduce(n_exp, group=self.ep_group)
        self.n_params = sum(p.numel() for p in self.dense_params) + int(n_exp)  # the whole model's count
        self.model = model

    def g(self, local: str) -> str:
        return self.glob.get(local, local)

    # ---------- gradients ----------
    @torch.no_grad()
    def allreduce_grads(self) -> None:
        """Dense grads: sum over the world / world; expert grads: sum over the replica group / world.
        pp = 1 only (with pp > 1, PipelineStep.forward_backward syncs per stage position)."""
        from dsv3.train.loop import allreduce_grads

        allreduce_grads(self.dense_params, self.world)
        if not self.expert_params:
            return
        grads = []
        for p in self.expert_params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch._utils._flatten_dense_tensors(grads)
        if self.n_rep > 1:
            dist.all_reduce(flat, group=self.rep_group)
        flat /= self.world
        for g, s in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(s)

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> float:
        """The whole model's gradient norm (each expert slice once) and clipping, as clip_grad_norm_.
        pp = 1 only (with pp > 1: PipelineStep.clip_grad_norm)."""
        def sq(ps):
            return sum((p.grad.double().pow(2).sum() for p in ps if p.grad is not None),
                       torch.zeros((), dtype=torch.float64, device=self.device))

        e = sq(self.expert_params)
        dist.all_reduce(e, group=self.ep_group)
        norm = float((sq(self.dense_params) + e).sqrt())
        coef = min(1.0, max_norm / (norm + 1e-6)) if math.isfinite(norm) else float("nan")
        for p in self.dense_params + self.expert_params:
            if p.grad is not None:
                p.grad.mul_(coef)
        return norm

    # ---------- evaluation ----------
    def pad_batches(self, batches: list, seq_len: int) -> list:
        """[(x, counted)]: this rank's batches, then uncounted copies up to the largest count of any rank."""
        n = torch.tensor([len(batches)], device=self.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        filler = batches[0][:1] if batches else torch.zeros(1, seq_len, dtype=torch.long)
        return [(x, True) for x in batches] + [(filler, False)] * (int(n) - len(batches))

    # ---------- whole-model checkpoints ----------
    def _gather(self, mine: dict):
        """Rank 0: {key: union over the EP group 0 ranks of mine[key]} (collective on group 0; None elsewhere)."""
        if self.rank >= self.M:
            return None
        out = [None] * self.M if self.rank == 0 else None
        dist.gather_object(mine, out, dst=0, group=self.ep_group)
        if self.rank != 0:
            return None
        full: dict = {k: {} for k in mine}
        for d in out:
            for k, v in d.items():
                full[k].update(v)
        return full

    def full_state(self, opt, ema=None):
        """(whole model, object with the whole optimizer state_dict(), object with the whole EMA state_dict())
        on rank 0, (None, None, None) elsewhere; a collective: call on every rank. pp = 1 only (with pp > 1
        PipelineStep.full_state gathers stages and slices, with `g` and `whole_optimizer`)."""
        if self.rank >= self.M:  # EP group 0 holds every slice; the other groups' ranks hold copies
            return None, None, None
        model = self.model
        cpu = {n: v.detach().cpu() for n, v in model.state_dict().items()}
        experts = {self.g(n): v for n, v in cpu.items() if n in self.expert_names}
        local_names = [n for g in _groups(model) for n in g]
        sd = opt.state_dict()
        ostate = {self.g(local_names[i]): {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in st.items()}
                  for i, st in sd["state"].items() if local_names[i] in self.expert_names}
        ema_sd = ema.state_dict() if ema is not None else {}
        ema_exp = {self.g(n): v for n, v in ema_sd.items() if n in self.expert_names}
        got = self._gather({"w": experts, "o": ostate, "e": ema_exp})
        if self.rank != 0:
            return None, None, None
        w = {self.g(n): v for n, v in cpu.items() if n not in self.expert_names}
        ost = {self.g(local_names[i]): st for i, st in sd["state"].items() if local_names[i] not in self.expert_names}
        w.update(got["w"])
        ost.update(got["o"])
        with torch.device("meta"):
            whole = type(model)(self.config)
        whole.to_empty(device="cpu")
        whole.load_state_dict(w)
        full_opt = self.whole_optimizer(sd["param_groups"], ost)
        full_ema = None
        if ema is not None:
            e = {self.g(n): v for n, v in ema_sd.items() if n not in self.expert_names}
            e.update(got["e"])
            full_ema = StateDict(e)
        return whole, StateDict(full_opt), full_ema

    def whole_optimizer(self, param_groups: list, state: dict) -> dict:
        """The optimizer state_dict a plain run saves: `param_groups` (this rank's hyperparameters, same groups)
        with the whole model's parameter indices, `state` ({whole-model name: AdamW state}) at those indices."""
        index = {n: i for i, n in enumerate(n for g in self.full_groups for n in g)}
        groups, start = [], 0
        for pg, names in zip(param_groups, self.full_groups):
            groups.append({**pg, "params": list(range(start, start + len(names)))})
            start += len(names)
        return {"state": {index[n]: st for n, st in sorted(state.items(), key=lambda kv: index[kv[0]])},
                "param_groups": groups}

    def local_optimizer(self, full: dict, local_groups: list, keep=None) -> dict:
        """This rank's optimizer state_dict from a whole checkpoint's (`whole_optimizer`'s layout):
        `local_groups` = local parameter names per group in the optimizer's order; `keep(local name)`
        (default: all) selects the parameters whose state is taken (a pipeline rank's held ones)."""
        index = {n: i for i, n in enumerate(n for g in self.full_groups for n in g)}
        local, groups, start = {}, [], 0
        for pg, names in zip(full["param_groups"], local_groups):
            for k, n in enumerate(names):
                if index[self.g(n)] in full["state"] and (keep is None or keep(n)):
                    local[start + k] = full["state"][index[self.g(n)]]
            groups.append({**pg, "params": list(range(start, start + len(names)))})
            start += len(names)
        return {"state": local, "param_groups": groups}

    # ---------- loading a whole checkpoint (checkpoint.load(..., part=self): resume, rollback) ----------
    def load_weights(self, model, whole: dict) -> None:
        """This rank's slice of the whole model's state_dict (strict: every local name must be there)."""
        model.load_state_dict({n: whole[self.g(n)] for n in model.state_dict()})

    def local_optimizer_state(self, opt, full: dict) -> dict:
        return self.local_optimizer(full, _groups(self.model))

    def local_ema_state(self, ema, whole: dict) -> dict:
        return {n: whole[self.g(n)] for n in ema.names}


def _groups(model) -> list[list[str]]:
    """Local parameter names in the optimizer's order (dsv3.train.optim.param_groups)."""
    from dsv3.train.optim import param_groups

    name_of = {id(p): n for n, p in model.named_parameters()}
    return [[name_of[id(p)] for p in g["params"]] for g in param_groups(model, 0.0)]
