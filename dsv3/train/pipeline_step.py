"""Pipeline parallelism in pretraining (report §3.2.1): the `TrainStep` (step.py) when `cfg.parallel.pp > 1`.

The pipeline ranks are the workers of the training group (Ray Train via `dsv3.train.launcher.run_training`
with dp × pp workers; gloo on CPU, NCCL on GPU); this module only uses the torch.distributed group.

Design:
- Every rank builds the whole `DeepSeekV3` from the same seed (so the weights are the plain run's), picks
  the stages of its schedule (`pipeline_for`: DualPipe ranks r and PP-1-r, DualPipeV r and 2PP-1-r,
  1F1B r) and keeps only their parameters ("held", including what a stage references: the embedding that
  the last stage's MTP reads). Every other parameter is freed in place (`_free`: it becomes an empty
  tensor with the same dtype, device and ndim; the module tree, names and buffers stay), before the
  optimizer and the CPU EMA are built, so AdamW's groups and indices are the plain run's and the EMA copies
  only held weights. The transient peak is one whole model per rank at build time (as in expert_step.py).
- No weight broadcast: a parameter held by several ranks (DualPipe's two copies of each stage, the
  embedding of 1F1B / DualPipeV's first and last stage when they are on different ranks) starts equal
  (same seed), gets the same summed gradient and the same clip coefficient on every holder, so AdamW
  keeps the copies equal. The routing-bias buffers (gate `e_score_correction_bias`, a few floats per
  layer) stay whole on every rank: the loop's world all-reduce of `model.expert_load()` gives every rank
  the global counts (a layer counts only on the rank that ran it), so every rank applies the plain run's
  update to every layer, in particular to the layers it holds.
- A step: the global batch (all ranks read the same batch) is cut into `parallel.chunks` micro-batches.
  DualPipe: rank 0 feeds the first half and computes the loss of the second, rank PP-1 the other way
  round; DualPipeV: rank 0 feeds and computes the loss; 1F1B: rank 0 feeds, rank PP-1 the loss. The
  criterion is the last stage's CE(main) + λ·MTP divided by the number of chunks, and the balance loss
  gets d/d(aux) = 1/chunks, so the gradients are those of `model(x, labels=x).loss` on the whole batch
  (equal-length packed sequences: the mean of the chunk means is the batch mean).
- Gradients (`sync_grads`): `DualPipe.sync_grads()` sums the two copies of each stage; for the other
  schedules the parameters held by several ranks (the embedding: stage 0 and the MTP of the last stage
  under 1F1B) are all-reduced. The gradient norm for clipping is summed over owners (a replicated stage counts once).
- The loss parts (main, MTP per depth, balance) are accumulated on the stages that compute them and
  all-reduced, so the reported `train/loss` is the model's total loss, as in the non-pipelined loop.
  Expert loads are all-reduced by the loop as under data parallelism (a layer's counts are non-zero
  only on the ranks running it), so every rank applies the same routing-bias update (§2.1.2).
- Bubbles: each step's per-rank timelines are gathered on the logging steps; rank 0 logs the measured
  bubble fraction per rank, the mean, and the analytic values of bubble.analytic with measured op costs;
  `gantt(path)` draws the last gathered step.
- Data parallelism over pipelines (`parallel.dp` > 1, world = dp × pp): ranks d·pp .. d·pp+pp-1 form
  pipeline d (its own process group, P2P inside it); the ranks at the same stage position form a
  data-parallel group. Pipeline d reads data shard d of the global batch; after the pipeline's own
  gradient sync, each held parameter's gradient and the loss parts are averaged over the
  data-parallel group (DDP's sum/dp), so every pipeline applies the same update and the run
  equals the non-pipelined dp run. Clipping works per pipeline; all pipelines hold the same weights,
  so checkpoints are assembled from pipeline 0.
- Checkpoints stay one whole model: `full_state(opt, ema)` (a collective) gathers, from each parameter's
  owner (the lowest rank of pipeline 0 holding it), its weight, AdamW state and EMA to global rank 0, which
  builds a whole `DeepSeekV3` (plus the buffers), the optimizer state_dict of the plain run (same
  parameter order) and the whole EMA dict; `checkpoint.save` and the HF export `final/` are unchanged.
  `checkpoint.load(ckpt, model, opt, ema, part=self)` loads a whole checkpoint into the split model
  (resume and rollback): every rank reads it and keeps its part.
- Validation (`evaluate`): the windows of the pipeline's data shard go through the stages in order, one
  batch at a time, hidden states sent point-to-point (stage s on the lowest rank holding it); no schedule,
  so evaluation has a (PP-1)/PP bubble but needs no weights beyond a rank's own stages. With the same
  number of data ranks, the windows and the loss are the plain run's (EMA evaluation: the held EMA
  weights are swapped into the held parameters).
Memory: a rank stores the weights, gradients, AdamW state and CPU EMA of the parameters it holds only:
1F1B ≈ 1/PP of the model, DualPipeV 2 of 2PP stages ≈ 1/PP, DualPipe 2 of PP stages ≈ 2/PP (the whole
model at PP=2) — plus the embedding, head and MTP on the end stages with an even layer split (`small`,
PP=2, 1F1B: 39% / 70% of the 132 MB on ranks 0 / 1; DualPipeV: 62% / 38%; PP=4 1F1B: 27/25/13/45%;
`parallel.stage_bounds` evens them out). Transient whole-model copies remain at build time (every rank),
at checkpoint time (global rank 0 assembles the model + AdamW state + EMA in CPU memory) and when loading
a checkpoint (every rank reads the whole one into CPU memory).
- Expert parallelism (`parallel.ep` = M > 1, §3.2.2): `ExpertStep` (dsv3/train/expert_step.py) first
  shards the routed experts over EP groups of M consecutive members of each stage position's
  data-parallel group, then this class is built with `ep=` it: the held parameters are the stage's,
  of its MoE layers only the E/M slice; grads of non-expert held parameters are averaged over the dp
  group (as above), of expert slices over the replica group (the same slice in the other EP groups; the
  all-to-all backward already summed the EP group's tokens), both /dp; the clip norm adds the expert
  slices' norms² over the EP group; `full_state` gathers from pipelines 0..M-1 to rank 0 under the whole
  model's names and optimizer order (ExpertStep.whole_name / whole_groups), `checkpoint.load(...,
  part=self)` keeps each rank's part; validation is padded to the same number of batches on every
  pipeline (the MoE stages are collectives).
  All schedules keep the EP group's all-to-alls in one order (see expert_step.py).
- FP8 (`train.precision=fp8`, §3.3): `build_model` (the run's `Precision`) swaps the Linear layers for
  `dsv3.fp8.FP8Linear` before the pipeline is built; each FP8Linear takes part in the zero-bubble split itself (FP8 Dgrad in B, its FP8
  Wgrad queued for the W op, the same ops as without a pipeline; `split_weight_grads` leaves it alone).
  Its Wgrad tile scales (128 tokens) depend on how tokens are batched into micro-batches, so fp8 pipelines
  match the fp8 plain run to ~2e-5 in the losses and ~3e-4 in the grad norm after a few steps, not to fp32
  rounding (step 1's losses, from the batching-independent FP8 Fprop, do: tests/train/test_pipeline.py).
Config errors (`check_pipeline_config`, through layout.check_layout before any work and before Ray
starts): more stages than layers, a batch size not divisible into `parallel.chunks` micro-batches.
The DualPipe rules (even pp, num_chunks >= 2·pp) are ParallelConfig's, the rank counts layout.py's.
"""

from __future__ import annotations


import torch
import torch.distributed as dist

from dsv3.model.config import ConfigError
from dsv3.model.loss import shifted_cross_entropy
from dsv3.parallel import collectives
from dsv3.parallel.partition import pipeline_for
from dsv3.train import checkpoint as ckpt
from dsv3.train.stream import bits_per_byte
from dsv3.train.lr_schedule import Schedules
from dsv3.train.optim import group_names
from dsv3.train.precision import Precision


def check_pipeline_config(cfg) -> None:
    """Errors for a pipeline layout that cannot work, naming the config key (ranks: layout.py)."""
    par = cfg.parallel
    n_stages = 2 * par.pp if par.schedule == "dualpipev" else par.pp
    if n_stages > cfg.model.num_hidden_layers:
        raise ConfigError(f"parallel.pp: {par.schedule} with pp={par.pp} needs {n_stages} stages but the model has "
                          f"{cfg.model.num_hidden_layers} layers")
    for batch in sorted(set(Schedules(cfg.train, cfg.model, par.dp).plan.batches)):
        if batch % par.chunks:
            raise ConfigError(f"parallel.num_chunks: the batch size {batch} is not divisible into {par.chunks} "
                              "micro-batches (train.batch_size / batch ramp must be multiples of num_chunks)")


def _dp_pp_groups(dp: int, pp: int):
    """Pipelines of consecutive ranks (d·pp .. d·pp+pp-1) and, per stage position i, the data-parallel
    group {d·pp + i}. new_group is a collective: every rank creates every group, in the same order."""
    me = dist.get_rank()
    pipe_group = dp_group = None
    for d in range(dp):
        group = dist.new_group([d * pp + i for i in range(pp)])
        if me // pp == d:
            pipe_group = group
    for i in range(pp):
        group = dist.new_group([d * pp + i for d in range(dp)])
        if me % pp == i:
            dp_group = group
    return pipe_group, dp_group


class PipelineStep:
    """This rank's part of a pipeline-parallel training step; see the module docstring."""

    def __init__(self, model, cfg, group=None, ep=None):
        """ep: the ExpertStep that sharded `model`'s routed experts (parallel.ep > 1), built before this."""
        self.model, self.cfg, self.ep = model, cfg, ep
        self.precision = Precision.of(cfg.train.precision)
        check_pipeline_config(cfg)
        self.dp, self.dp_rank, self.dp_group = 1, 0, None
        if group is None and cfg.parallel.dp > 1:
            group, self.dp_group = _dp_pp_groups(cfg.parallel.dp, cfg.parallel.pp)
            self.dp, self.dp_rank = cfg.parallel.dp, dist.get_rank() // cfg.parallel.pp
        self.data_rank, self.data_world = self.dp_rank, self.dp  # the ranks of one pipeline share its batch
        self.group = group or dist.group.WORLD
        self.rank, self.pp = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.kind, self.chunks = cfg.parallel.schedule, cfg.parallel.chunks
        self.seq_len = cfg.train.seq_len
        self.pipe, self.criterion = pipeline_for(model, self.kind, 1, self.seq_len, self.group,
                                                 cfg.parallel.stage_bounds)
        self.device = self.pipe._device
        self.stages = list(self.pipe.module)
        self.params = list(model.parameters())
        self._place_parameters()
        self.timelines: list | None = None
        # stage index -> the pipeline rank that runs it in evaluation (the lowest rank holding it)
        self.n_stages = 2 * self.pp if self.kind == "dualpipev" else self.pp
        ids = [self.rank] if self.kind == "1f1b" else [self.rank, self.n_stages - 1 - self.rank]
        self.stage_of = dict(zip(ids, self.stages))
        self.stage_rank = [min(i, self.n_stages - 1 - i) if self.kind != "1f1b" else i for i in range(self.n_stages)]
        # the whole model's names, shapes and optimizer order (dsv3.train.optim.param_groups), kept before freeing
        self.names = [n for n, _ in model.named_parameters()]
        if len(self.names) != len(self.params):
            raise RuntimeError("named_parameters and parameters disagree")
        self.shapes = [tuple(p.shape) for p in self.params]
        self.to_whole = ep.whole_name if ep is not None else (lambda name: name)  # local -> whole-model names
        self.whole_names = [self.to_whole(n) for n in self.names]
        self.whole_groups = ep.whole_groups if ep is not None else group_names(model)
        self.experts = {i for i, n in enumerate(self.names) if n in ep.expert_names} if ep is not None else set()
        self.n_params = ep.n_params if ep is not None else sum(p.numel() for p in self.params)
        self.whole_bytes = sum(p.numel() * p.element_size() for p in self.params)
        self._free()

    def _place_parameters(self) -> None:
        """held (this rank's parameter indices), owner (the lowest pipeline rank holding each) and shared
        (held by several ranks outside DualPipe's stage copies, whose grads DualPipe.sync_grads sums)."""
        index = {id(p): i for i, p in enumerate(self.params)}
        held = sorted({index[id(p)] for m in self.stages for p in m.parameters()})
        self.held = set(held)
        all_held = [None] * self.pp
        dist.all_gather_object(all_held, held, group=self.group)
        holders: dict[int, list[int]] = {}
        for r, indices in enumerate(all_held):
            for i in indices:
                holders.setdefault(i, []).append(r)
        missing = [i for i in range(len(self.params)) if i not in holders]
        if missing:
            raise RuntimeError(f"parameters held by no pipeline rank: {missing[:5]}")
        self.owner = {i: min(ranks) for i, ranks in holders.items()}
        self.shared = [] if self.kind == "dualpipe" else sorted(i for i, ranks in holders.items() if len(ranks) > 1)

    @torch.no_grad()
    def _free(self) -> None:
        """Drop the storage of every parameter this rank does not hold: it becomes an empty tensor of the
        same dtype / device / number of dimensions (so the optimizer's grouping by ndim and name is the plain
        run's). The modules stay in the model (names, buffers and the gate biases are whole on every rank)."""
        for i, p in enumerate(self.params):
            if i not in self.held:
                p.data = torch.empty((0,) * p.ndim, dtype=p.dtype, device=p.device)
                p.grad = None
        self.held_bytes = sum(p.numel() * p.element_size() for p in self.params)

    # ---------- the step ----------
    def _feed(self, x: torch.Tensor):
        """(inputs, labels) this rank passes to pipe.step; labels = (input_ids, labels) per loss chunk."""
        first, last, half = self.rank == 0, self.rank == self.pp - 1, x.shape[0] // 2
        if self.kind == "dualpipe":
            if first:  # pp == 2: rank 0 is the first stage of one direction only
                return (x[:half],), (x[half:], x[half:])
            if last:
                return (x[half:],), (x[:half], x[:half])
            return (), ()
        if self.kind == "dualpipev":
            return ((x,), (x, x)) if first else ((), ())
        return ((x,) if first else ()), ((x, x) if last else ())

    def forward_backward(self, x: torch.Tensor, micro_batch: int, mtp_weight: float,
                         poison: bool = False) -> torch.Tensor:
        """Loss + grads of the whole batch `x` [B, S] (labels = x) in `parallel.chunks` micro-batches
        (`micro_batch` is the plain step's and unused); returns [loss, main, balance, mtp_1..] (float64)
        summed over the pipeline's stages. poison (train.debug_nan_steps): the criterion times NaN, as
        the plain step's injected bad batch (NaN loss, NaN grads)."""
        n = self.chunks
        B, S = x.shape
        if B % n:
            raise ValueError(f"batch of {B} is not divisible into parallel.num_chunks={n} micro-batches")
        self.pipe.set_p2p_tensor_shapes([(B // n, S, self.model.config.hidden_size)])
        for stage in self.stages:
            stage.aux_grad_scale, stage.stats = 1.0 / n, {}
            if stage.last:
                stage.mtp_loss_weight = mtp_weight
        inputs, labels = self._feed(x)
        scale = float("nan") if poison else 1.0
        crit = (lambda h, ids, lab: self.criterion(h, ids, lab) / n * scale) if self.criterion is not None else None
        with self.precision.autocast(self.device):
            loss, _ = self.pipe.step(*inputs, num_chunks=n, criterion=crit, labels=labels)
        parts = torch.zeros(3 + self.cfg.model.num_nextn_predict_layers, dtype=torch.float64)
        for stage in self.stages:
            stats, stage.stats = stage.stats, None
            parts[1] += float(stats.get("main", 0.0))
            parts[2] += float(stats.get("balance", 0.0))
            for k, v in stats.get("mtp", {}).items():
                parts[3 + k] += float(v)
        parts[1:] /= n
        if loss is not None:
            parts[0] = float(loss.double().sum())
        parts[0] += parts[2]  # the balance loss is not in the pipeline's criterion
        return collectives.all_reduce_sum(parts, self.group, self.device)

    def sync_grads(self, sums: torch.Tensor) -> torch.Tensor:
        """Sum the grads of parameters held twice in the pipeline; with data-parallel pipelines, the
        replicas' mean of the grads and loss sums (expert slices: over the replica group, see above)."""
        if self.kind == "dualpipe":
            self.pipe.sync_grads()
        if self.shared:
            self._sum_shared_grads()
        if self.dp_group is None:
            return sums
        sums = collectives.all_reduce_mean(sums, self.dp, self.dp_group, self.device)
        collectives.mean_grads_([self.params[i] for i in sorted(self.held - self.experts)], self.dp, self.dp_group)
        if self.ep is not None:  # expert slices: the same slice in the data-parallel group's other EP groups
            collectives.mean_grads_([self.params[i] for i in sorted(self.held & self.experts)], self.dp,
                                    self.ep.replica_group, reduce=self.ep.n_replicas > 1)
        return sums

    def _sum_shared_grads(self) -> None:
        """A rank not holding a shared parameter adds zeros of its (whole) shape."""
        grads = []
        for i in self.shared:
            grad = self.params[i].grad if i in self.held else None
            grads.append(grad if grad is not None else
                         torch.zeros(self.shapes[i], device=self.device, dtype=self.params[i].dtype))
        for i, summed in zip(self.shared, collectives.all_reduce_flat(grads, group=self.group)):
            if i in self.held:
                self.params[i].grad = summed.clone()

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> float:
        """Global grad norm (each parameter counted once, on its owner; with ep each expert slice once: the
        pipeline's slice norms² summed over the EP group) and clipping, as clip_grad_norm_."""
        owned = [i for i in self.held if self.owner[i] == self.rank]
        dense = [self.params[i] for i in owned if i not in self.experts]
        experts = [self.params[i] for i in owned if i in self.experts]
        sq_norms = torch.stack([collectives.grad_sq_norm(dense, self.device),  # [dense, expert slices]
                                collectives.grad_sq_norm(experts, self.device)])
        dist.all_reduce(sq_norms, group=self.group)
        if self.ep is not None:
            expert_sq = sq_norms[1:].clone()
            dist.all_reduce(expert_sq, group=self.ep.ep_group)
            sq_norms[1] = expert_sq[0]
        return collectives.clip_grads_([self.params[i] for i in self.held], max_norm, sq_norms[0] + sq_norms[1])

    # ---------- evaluation ----------
    @torch.no_grad()
    def evaluate(self, stream, batches: int, batch: int) -> tuple[float, float | None]:
        """`step.evaluate` for the split model (a collective over the world): the validation windows of this
        pipeline's data shard go through the stages in order, one batch at a time (stage s runs on the
        lowest pipeline rank holding it; hidden states are sent point-to-point, cast to the model dtype as
        in training). The last stage adds the main next-token loss. No schedule, no overlap: evaluation
        has a (PP-1)/PP bubble, but needs no weights beyond the rank's own stages. With ep, an MoE stage is a
        collective over its EP group (the same stage position in other pipelines, running the same stages in
        the same order), so every pipeline runs the same number of batches (`ExpertStep.pad_batches`; the
        padding batches are not counted)."""
        model, dev = self.model, self.device
        was = model.training
        model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=dev)  # [loss × tokens, tokens]
        global_rank = ((lambda r: r) if self.group is dist.group.WORLD
                       else (lambda r: dist.get_global_rank(self.group, r)))
        xs = list(stream.eval_batches(batches, batch, self.dp_rank, self.dp))
        for x, counted in (self.ep.pad_batches(xs, self.seq_len) if self.ep is not None else [(x, True) for x in xs]):
            x, h = x.to(dev), None
            for i in range(self.n_stages):
                if self.stage_rank[i] != self.rank:
                    continue
                stage = self.stage_of[i]
                if i and self.stage_rank[i - 1] != self.rank:
                    h = torch.empty(*x.shape, model.config.hidden_size, dtype=model.dtype, device=dev)
                    dist.recv(h, src=global_rank(self.stage_rank[i - 1]), group=self.group)
                with self.precision.autocast(dev):
                    h = stage(x if i == 0 else h)
                    if i == self.n_stages - 1 and counted:
                        n = x.shape[0] * (x.shape[1] - 1)
                        totals[0] += shifted_cross_entropy(stage.logits(h), x, 1).double() * n
                        totals[1] += n
                if i + 1 < self.n_stages and self.stage_rank[i + 1] != self.rank:
                    dist.send(h.to(model.dtype).contiguous(), dst=global_rank(self.stage_rank[i + 1]), group=self.group)
        dist.all_reduce(totals)  # each pipeline's last stage holds its sums; the others add zeros
        model.train(was)
        loss = float(totals[0] / totals[1].clamp(min=1))
        return loss, bits_per_byte(loss, stream.bytes_per_token)

    # ---------- whole-model checkpoints ----------
    def full_state(self, opt, ema=None):
        """(whole model, object with the whole optimizer state_dict(), object with the whole EMA state_dict())
        on global rank 0, (None, None, None) elsewhere; a collective: call on every rank. Each parameter,
        its AdamW state and its EMA come from its owner (the lowest pipeline rank holding it) in pipeline 0
        (data-parallel pipelines hold the same values); buffers (routing biases) are whole on every rank."""
        ep = self.ep
        # pipelines 0 .. M-1 (EP group 0 at every stage position) hold every stage and every expert slice
        contributes = self.dp_rank < (ep.ep_size if ep is not None else 1)
        if ep is None and not contributes:
            return None, None, None
        whole = dict(zip(self.names, self.whole_names))
        owned = {self.names[i] for i in self.held if self.owner[i] == self.rank} if contributes else set()
        names = [n for group in group_names(self.model, opt) for n in group]  # local names in optimizer order
        opt_sd = opt.state_dict()
        mine = {"w": {whole[n]: p.detach().cpu() for n, p in zip(self.names, self.params) if n in owned},
                "o": {whole[names[k]]: {a: (v.cpu() if torch.is_tensor(v) else v) for a, v in state.items()}
                      for k, state in opt_sd["state"].items() if names[k] in owned},
                "e": {whole[n]: v for n, v in ema.state_dict().items() if n in owned} if ema is not None else {}}
        # ep: every rank takes part (the others send nothing); else pipeline 0 only (it holds global rank 0)
        state = collectives.gather_union(mine, None if ep is not None else self.group)
        if state is None:
            return None, None, None
        weights = state["w"]
        canonical = {id(p): n for n, p in zip(self.names, self.params)}
        for n, p in self.model.named_parameters(remove_duplicate=False):  # tied weights under both names
            weights.setdefault(self.to_whole(n), weights[whole[canonical[id(p)]]])
        keys = set(self.model.state_dict())
        weights.update({self.to_whole(n): b.detach().cpu() for n, b in self.model.named_buffers() if n in keys})
        model = collectives.assemble_whole_model(self.model, weights)
        opt_state = ckpt.merge_optimizer_state(opt_sd["param_groups"], self.whole_groups, state["o"])
        return model, ckpt.StateDict(opt_state), (ckpt.StateDict(state["e"]) if ema is not None else None)

    def load(self, path, opt=None, ema=None) -> dict:
        return ckpt.load(path, self.model, opt, ema, part=self)

    # ---------- loading a whole checkpoint (checkpoint.load(..., part=self): resume, rollback) ----------
    @torch.no_grad()
    def load_weights(self, model, whole: dict) -> None:
        """Keep the held parameters of the whole model's state_dict (every rank reads the whole checkpoint,
        one whole model in CPU memory, transiently); buffers (routing biases) are taken whole."""
        for i, (name, p) in enumerate(zip(self.whole_names, self.params)):
            if i in self.held:
                p.copy_(whole[name])
        for n, b in model.named_buffers():
            if self.to_whole(n) in whole:
                b.copy_(whole[self.to_whole(n)])

    def local_optimizer_state(self, opt, full: dict) -> dict:
        """The AdamW state of the held parameters, at this rank's optimizer indices."""
        held = {self.names[i] for i in self.held}
        return ckpt.slice_optimizer_state(full, self.whole_groups, group_names(self.model, opt), self.to_whole,
                                          keep=held.__contains__)

    def local_ema_state(self, ema, whole: dict) -> dict:
        held = {self.names[i] for i in self.held}
        return {n: (whole[self.to_whole(n)] if n in held else v) for n, v in ema.state_dict().items()}

    # ---------- bubbles ----------
    def step_metrics(self, log_due: bool) -> dict:
        """On logging steps: gather this step's timelines (a collective); metrics for rank 0 (empty elsewhere)."""
        from dsv3.parallel.bubble import gather_timelines, report

        if not log_due:
            return {}
        timelines = gather_timelines(self.pipe)
        if self.rank != 0:
            return {}
        self.timelines = timelines
        rep = report(self.kind, timelines)
        metrics = {"pipeline/bubble_fraction": rep["fraction"], "pipeline/bubble_s": rep["bubble"],
                   "pipeline/span_s": rep["span"]}
        for r, stats in enumerate(rep["per_rank"]):
            metrics[f"pipeline/bubble_fraction/rank_{r}"] = stats["fraction"]
        for k, v in rep["costs"].items():
            metrics[f"pipeline/op_s/{k}"] = v
        for k, v in rep["analytic"].items():
            metrics[f"pipeline/analytic_bubble_s/{k}"] = v
        # the formula of the schedule in use (DualPipeV has DualPipe's bubble), as a fraction of the span
        own = rep["analytic"]["1f1b" if self.kind == "1f1b" else "dualpipe"]
        metrics["pipeline/analytic_bubble_fraction"] = own / rep["span"] if rep["span"] else 0.0
        return metrics

    def artifacts(self, out_dir) -> list:
        """The Gantt chart of the last gathered step (rank 0), to log under plots/."""
        from pathlib import Path

        from dsv3.parallel.bubble import gantt

        path = Path(out_dir) / "pipeline_gantt.png"
        if not self.timelines or not gantt(self.timelines, str(path),
                                           f"{self.kind} PP={self.pp}, {self.chunks} chunks (last step)"):
            return []
        return [path]
