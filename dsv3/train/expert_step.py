"""Expert parallelism in pretraining (report §3.2.2): the `TrainStep` (step.py) when `cfg.parallel.ep > 1`.

The ranks are the `parallel.dp` data-parallel workers of the training group (Ray Train via
`dsv3.train.launcher.run_training`; gloo on CPU, NCCL on GPU); this module only uses torch.distributed. With
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
groups and maps (`whole_name`, `expert_names`, `whole_groups`, `pad_batches`): non-expert
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
Unsupported (ConfigError naming the key, from `check_expert_config` via layout.check_layout, before any
work; dsv3.train.launcher.run_training checks too, before starting Ray): ep not dividing parallel.dp or
model.n_routed_experts, ranks != parallel.dp × parallel.pp, a model without MoE layers. Not done: the
paper's per-node de-duplicated dispatch and the overlapped (dual micro-batch) training path (see
dsv3/parallel/expert.py).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dsv3.model.config import ConfigError
from dsv3.parallel import collectives
from dsv3.parallel.expert import ExpertParallelMoE, shard_experts
from dsv3.train.checkpoint import StateDict, merge_optimizer_state, slice_optimizer_state
from dsv3.train.optim import group_names
from dsv3.train.step import PlainStep, evaluate


def check_expert_config(cfg) -> None:
    """Errors for an expert-parallel layout that cannot work, naming the config key (ranks: layout.py)."""
    par, mcfg = cfg.parallel, cfg.model
    if par.ep <= 1:
        return
    if par.dp % par.ep:
        raise ConfigError(f"parallel.ep: ep={par.ep} does not divide parallel.dp={par.dp} (EP groups are made of "
                          "data-parallel ranks)")
    if mcfg.n_routed_experts % par.ep:
        raise ConfigError(f"parallel.ep: ep={par.ep} does not divide model.n_routed_experts={mcfg.n_routed_experts}")
    if mcfg.first_k_dense_replace >= mcfg.num_hidden_layers and not mcfg.num_nextn_predict_layers:
        raise ConfigError(f"parallel.ep: ep={par.ep} but the model has no MoE layer (model.first_k_dense_replace)")


def _cpu(state: dict) -> dict:
    return {k: (v.cpu() if torch.is_tensor(v) else v) for k, v in state.items()}


class ExpertStep(PlainStep):
    """This rank's expert-parallel state; see the module docstring. Shards `model` in place."""

    def __init__(self, model, cfg):
        super().__init__(model, cfg)
        check_expert_config(cfg)
        self.ep_size = M = cfg.parallel.ep
        dp, pp = cfg.parallel.dp, cfg.parallel.pp
        # per stage position i (pp = 1: one position, the world), its data-parallel ranks d·pp + i, d < dp;
        # EP groups: M consecutive of them; replica groups: the same expert slice in the other EP groups
        for i in range(pp):
            for group in range(dp // M):
                ranks = [(group * M + k) * pp + i for k in range(M)]
                pg = dist.new_group(ranks)
                if self.rank in ranks:
                    self.ep_group = pg
            for j in range(M):
                ranks = [(j + r * M) * pp + i for r in range(dp // M)]
                pg = dist.new_group(ranks)
                if self.rank in ranks:
                    self.replica_group, self.n_replicas = pg, len(ranks)
        self.whole_groups = group_names(model)  # the whole model's optimizer order, as a plain run's AdamW sees it
        shard_experts(model, self.ep_group, cfg.parallel.ep_ranks_per_node, cfg.parallel.max_nodes)
        self._whole: dict[str, str] = {}  # local parameter name -> name in the whole model
        self.expert_names: set[str] = set()  # local names of this rank's routed-expert parameters
        for mname, mod in model.named_modules():
            if isinstance(mod, ExpertParallelMoE):
                lo = mod.local_range[0]
                for i, expert in enumerate(mod.experts):
                    for pname, _ in expert.named_parameters():
                        local = f"{mname}.experts.{i}.{pname}"
                        self._whole[local] = f"{mname}.experts.{lo + i}.{pname}"
                        self.expert_names.add(local)
        named = list(model.named_parameters())
        self.expert_params = [p for n, p in named if n in self.expert_names and p.requires_grad]
        self.dense_params = [p for n, p in named if n not in self.expert_names and p.requires_grad]
        self.params = self.dense_params + self.expert_params
        n_expert = torch.tensor([sum(p.numel() for p in self.expert_params)], dtype=torch.float64, device=self.device)
        dist.all_reduce(n_expert, group=self.ep_group)
        self.n_params = sum(p.numel() for p in self.dense_params) + int(n_expert)  # the whole model's count
        self.part = self

    def whole_name(self, local: str) -> str:
        return self._whole.get(local, local)

    # ---------- gradients ----------
    def sync_grads(self, sums: torch.Tensor) -> torch.Tensor:
        """Dense grads: sum over the world / world; expert grads: sum over the replica group / world.
        pp = 1 only (with pp > 1, PipelineStep.sync_grads syncs per stage position)."""
        collectives.mean_grads_(self.dense_params, self.world)
        collectives.mean_grads_(self.expert_params, self.world, self.replica_group, reduce=self.n_replicas > 1)
        return collectives.all_reduce_mean(sums, self.world, device=self.device)

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> float:
        """The whole model's gradient norm (each expert slice once) and clipping, as clip_grad_norm_.
        pp = 1 only (with pp > 1: PipelineStep.clip_grad_norm)."""
        expert_sq = collectives.grad_sq_norm(self.expert_params, self.device)
        dist.all_reduce(expert_sq, group=self.ep_group)
        dense_sq = collectives.grad_sq_norm(self.dense_params, self.device)
        return collectives.clip_grads_(self.params, max_norm, dense_sq + expert_sq)

    # ---------- evaluation ----------
    def pad_batches(self, batches: list, seq_len: int) -> list:
        """[(x, counted)]: this rank's batches, then uncounted copies up to the largest count of any rank."""
        n = torch.tensor([len(batches)], device=self.device)
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
        filler = batches[0][:1] if batches else torch.zeros(1, seq_len, dtype=torch.long)
        return [(x, True) for x in batches] + [(filler, False)] * (int(n) - len(batches))

    def evaluate(self, stream, batches: int, batch: int) -> tuple[float, float | None]:
        return evaluate(self.model, stream, batches, batch, self.precision, self.rank, self.world, self.pad_batches)

    # ---------- whole-model checkpoints ----------
    def full_state(self, opt, ema=None):
        """(whole model, object with the whole optimizer state_dict(), object with the whole EMA state_dict())
        on rank 0, (None, None, None) elsewhere; a collective: call on every rank. pp = 1 only (with pp > 1
        PipelineStep.full_state gathers stages and slices, with `whole_name` and `whole_groups`)."""
        if self.rank >= self.ep_size:  # EP group 0 holds every slice; the other groups' ranks hold copies
            return None, None, None
        local_names = [n for names in group_names(self.model) for n in names]
        opt_sd = opt.state_dict()
        mine = {"w": {n: v.detach().cpu() for n, v in self.model.state_dict().items()},
                "o": {local_names[i]: _cpu(st) for i, st in opt_sd["state"].items()},
                "e": ema.state_dict() if ema is not None else {}}

        def whole(d: dict, experts: bool) -> dict:
            return {self.whole_name(n): v for n, v in d.items() if (n in self.expert_names) == experts}

        got = collectives.gather_union({k: whole(d, True) for k, d in mine.items()}, self.ep_group)
        if self.rank != 0:
            return None, None, None
        state = {k: {**whole(d, False), **got[k]} for k, d in mine.items()}
        model = collectives.assemble_whole_model(self.model, state["w"])
        opt_state = merge_optimizer_state(opt_sd["param_groups"], self.whole_groups, state["o"])
        return model, StateDict(opt_state), (StateDict(state["e"]) if ema is not None else None)

    # ---------- loading a whole checkpoint (checkpoint.load(..., part=self): resume, rollback) ----------
    def load_weights(self, model, whole: dict) -> None:
        """This rank's slice of the whole model's state_dict (strict: every local name must be there)."""
        model.load_state_dict({n: whole[self.whole_name(n)] for n in model.state_dict()})

    def local_optimizer_state(self, opt, full: dict) -> dict:
        return slice_optimizer_state(full, self.whole_groups, group_names(self.model), self.whole_name)

    def local_ema_state(self, ema, whole: dict) -> dict:
        return {n: whole[self.whole_name(n)] for n in ema.names}
