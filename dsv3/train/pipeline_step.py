"""One optimizer step's loss + gradients through a pipeline schedule (report §3.2.1), for `train(cfg)`
when `cfg.parallel.pp > 1` (issue 7 point 5).

The pipeline ranks are the workers of the training group (Ray Train via `dsv3.launch.run_training`
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
- Gradients: `DualPipe.sync_grads()` sums the two copies of each stage; for the other schedules the
  parameters held by several ranks (the embedding: stage 0 and the MTP of the last stage under 1F1B)
  are all-reduced. The gradient norm for clipping is summed over owners (a replicated stage counts once).
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
  model's names and optimizer order (ExpertStep.g / whole_optimizer), `checkpoint.load(..., part=self)`
  keeps each rank's part; validation is padded to the same number of batches on every pipeline (the MoE stages are collectives).
  All schedules keep the EP group's all-to-alls in one order (see expert_step.py).
- FP8 (`train.precision=fp8`, §3.3): `build_model` swaps the Linear layers for `dsv3.fp8.FP8Linear` before
  the pipeline is built; each FP8Linear takes part in the zero-bubble split itself (FP8 Dgrad in B, its FP8
  Wgrad queued for the W op, the same ops as without a pipeline; `split_weight_grads` leaves it alone).
  Its Wgrad tile scales (128 tokens) depend on how tokens are batched into micro-batches, so fp8 pipelines
  match the fp8 plain run to ~2e-5 in the losses and ~3e-4 in the grad norm after a few steps, not to fp32
  rounding (step 1's losses, from the batching-independent FP8 Fprop, do: tests/train/test_pipeline.py).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from dsv3.model.config import ConfigError
from dsv3.train.checkpoint import StateDict


def check_config(cfg, world: int) -> None:
    """Errors for a pipeline run that cannot work, naming the config key."""
    p, t = cfg.parallel, cfg.train
    if world % p.pp:
        raise ConfigError(f"parallel.pp: pp={p.pp} does not divide the number of ranks {world} (pipeline runs "
                          "need pp ranks: dsv3 pretrain / dsv3.launch.run_training start dp × pp Ray workers)")
    if world != p.dp * p.pp:
        raise ConfigError(f"parallel: dp × pp = {p.dp} × {p.pp} = {p.dp * p.pp} ranks expected, got {world} "
                          "(launch with dsv3.launch.run_training / dsv3 pretrain, which starts dp × pp workers)")
    if p.schedule == "dualpipe" and p.pp % 2:
        raise ConfigError(f"parallel.pp: DualPipe needs an even number of pipeline ranks, got {p.pp}")
    n = p.chunks
    if p.schedule in ("dualpipe", "dualpipev") and n < 2 * p.pp:
        raise ConfigError(f"parallel.num_chunks: {p.schedule} needs >= 2*pp = {2 * p.pp}, got {n}")
    n_stages = 2 * p.pp if p.schedule == "dualpipev" else p.pp
    if n_stages > cfg.model.num_hidden_layers:
        raise ConfigError(f"parallel.pp: {p.schedule} with pp={p.pp} needs {n_stages} stages but the model has "
                          f"{cfg.model.num_hidden_layers} layers")
    from dsv3.train.lr_schedule import Schedules

    for b in sorted(set(Schedules(t, cfg.model, p.dp).plan.batches)):
        if b % n:
            raise ConfigError(f"parallel.num_chunks: the batch size {b} is not divisible into {n} micro-batches "
                              "(train.batch_size / batch ramp must be multiples of num_chunks)")


def _dp_pp_groups(dp: int, pp: int):
    """Pipelines of consecutive ranks (d·pp .. d·pp+pp-1) and, per stage position i, the data-parallel
    group {d·pp + i}. new_group is a collective: every rank creates every group, in the same order."""
    me = dist.get_rank()
    pipe_g = dp_g = None
    for d in range(dp):
        g = dist.new_group([d * pp + i for i in range(pp)])
        if me // pp == d:
            pipe_g = g
    for i in range(pp):
        g = dist.new_group([d * pp + i for d in range(dp)])
        if me % pp == i:
            dp_g = g
    return pipe_g, dp_g


class PipelineStep:
    """This rank's part of a pipeline-parallel training step; see the module docstring."""

    def __init__(self, model, cfg, group=None, ep=None):
        """ep: the ExpertStep that sharded `model`'s routed experts (parallel.ep > 1), built before this."""
        from dsv3.parallel.stages import pipeline_for

        self.model, self.cfg, self.ep = model, cfg, ep
        check_config(cfg, dist.get_world_size())
        self.dp, self.dp_rank, self.dp_group = 1, 0, None
        if group is None and cfg.parallel.dp > 1:
            group, self.dp_group = _dp_pp_groups(cfg.parallel.dp, cfg.parallel.pp)
            self.dp, self.dp_rank = cfg.parallel.dp, dist.get_rank() // cfg.parallel.pp
        self.group = group or dist.group.WORLD
        self.rank, self.pp = dist.get_rank(self.group), dist.get_world_size(self.group)
        self.kind, self.chunks = cfg.parallel.schedule, cfg.parallel.chunks
        self.seq_len = cfg.train.seq_len
        self.pipe, self.criterion = pipeline_for(model, self.kind, 1, self.seq_len, self.group,
                                                 cfg.parallel.stage_bounds)
        self.stages = list(self.pipe.module)
        params = list(model.parameters())
        index = {id(p): i for i, p in enumerate(params)}
        self.params = params
        held = sorted({index[id(p)] for m in self.stages for p in m.parameters()})
        self.held = set(held)
        all_held = [None] * self.pp
        dist.all_gather_object(all_held, held, group=self.group)
        holders: dict[int, list[int]] = {}
        for r, hs in enumerate(all_held):
            for i in hs:
                holders.setdefault(i, []).append(r)
        missing = [i for i in range(len(params)) if i not in holders]
        if missing:
            raise RuntimeError(f"parameters held by no pipeline rank: {missing[:5]}")
        self.owner = {i: min(rs) for i, rs in holders.items()}
        # parameters held by several ranks outside DualPipe's stage copies (sync_grads sums those)
        self.shared = [] if self.kind == "dualpipe" else sorted(i for i, rs in holders.items() if len(rs) > 1)
        self.timelines: list | None = None
        # stage index -> the pipeline rank that runs it in evaluation (the lowest rank holding it)
        self.n_stages = 2 * self.pp if self.kind == "dualpipev" else self.pp
        ids = [self.rank] if self.kind == "1f1b" else [self.rank, self.n_stages - 1 - self.rank]
        self.stage_of = dict(zip(ids, self.stages))
        self.stage_rank = [min(s, self.n_stages - 1 - s) if self.kind != "1f1b" else s for s in range(self.n_stages)]
        # the whole model's names, shapes and optimizer order (dsv3.train.optim.param_groups), kept before freeing
        self.names = [n for n, _ in model.named_parameters()]
        if len(self.names) != len(params):
            raise RuntimeError("named_parameters and parameters disagree")
        self.shapes = [tuple(p.shape) for p in params]
        # whole-model names (a local expert slice's index -> the global expert's) and the expert slices
        self.gnames = [ep.g(n) for n in self.names] if ep is not None else self.names
        self.experts = {i for i, n in enumerate(self.names) if n in ep.expert_names} if ep is not None else set()
        self.n_params = ep.n_params if ep is not None else sum(p.numel() for p in params)
        self.whole_bytes = sum(p.numel() * p.element_size() for p in params)
        self._free()

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

    def forward_backward(self, x: torch.Tensor, mtp_weight: float, autocast, poison: bool = False) -> torch.Tensor:
        """Loss + grads of the whole batch `x` [B, S] (labels = x); returns the all-reduced
        [loss, main, balance, mtp_1..] (float64, as the loop's `sums`). poison (train.debug_nan_steps): the
        criterion is multiplied by NaN, as the plain loop's injected bad batch (NaN loss, NaN grads)."""
        n = self.chunks
        B, S = x.shape
        if B % n:
            raise ValueError(f"batch of {B} is not divisible into parallel.num_chunks={n} micro-batches")
        self.pipe.set_p2p_tensor_shapes([(B // n, S, self.model.config.hidden_size)])
        for st in self.stages:
            st.aux_grad_scale, st.stats = 1.0 / n, {}
            if st.last:
                st.mtp_loss_weight = mtp_weight
        inputs, labels = self._feed(x)
        scale = float("nan") if poison else 1.0
        crit = (lambda h, ids, lab: self.criterion(h, ids, lab) / n * scale) if self.criterion is not None else None
        with autocast:
            loss, _ = self.pipe.step(*inputs, num_chunks=n, criterion=crit, labels=labels)
        n_mtp = self.cfg.model.num_nextn_predict_layers
        parts = torch.zeros(3 + n_mtp, dtype=torch.float64)
        for st in self.stages:
            s, st.stats = st.stats, None
            parts[1] += float(s.get("main", 0.0))
            parts[2] += float(s.get("balance", 0.0))
            for k, v in s.get("mtp", {}).items():
                parts[3 + k] += float(v)
        parts[1:] /= n
        if loss is not None:
            parts[0] = float(loss.double().sum())
        parts[0] += parts[2]  # the balance loss is not in the pipeline's criterion
        dev = self.pipe._device
        parts_d = parts.to(dev)
        dist.all_reduce(parts_d, group=self.group)
        self._sync_grads()
        if self.dp_group is not None:  # data parallel over pipelines: mean of the replicas' grads and losses
            parts_d /= self.dp
            dist.all_reduce(parts_d, group=self.dp_group)
            dense = [self.params[i] for i in sorted(self.held - self.experts)]
            self._mean_grads(dense, self.dp_group)
            if self.ep is not None:  # expert slices: the same slice in the data-parallel group's other EP groups
                experts = [self.params[i] for i in sorted(self.held & self.experts)]
                self._mean_grads(experts, self.ep.rep_group if self.ep.n_rep > 1 else None)
        return parts_d.cpu()

    def _mean_grads(self, held: list, group) -> None:
        """grad = sum over `group` (None: this rank alone) / dp, i.e. the DDP mean over the data-parallel
        pipelines (an expert slice's grad already sums its EP group's tokens through the all-to-all)."""
        if not held:  # the same on every member of the group (same stage position, same slice)
            return
        for p in held:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        flat = torch._utils._flatten_dense_tensors([p.grad for p in held])
        flat /= self.dp
        if group is not None:
            dist.all_reduce(flat, group=group)
        for p, g in zip(held, torch._utils._unflatten_dense_tensors(flat, [p.grad for p in held])):
            p.grad.copy_(g)

    def _sync_grads(self) -> None:
        if self.kind == "dualpipe":
            self.pipe.sync_grads()
        if self.shared:
            dev = self.pipe._device
            parts = []
            for i in self.shared:  # a rank not holding a shared parameter adds zeros of its (whole) shape
                g = self.params[i].grad if i in self.held else None
                parts.append(g.reshape(-1) if g is not None else torch.zeros(math.prod(self.shapes[i]), device=dev,
                                                                             dtype=self.params[i].dtype))
            flat = torch.cat(parts)
            dist.all_reduce(flat, group=self.group)
            off = 0
            for i in self.shared:
                n = math.prod(self.shapes[i])
                if i in self.held:
                    self.params[i].grad = flat[off:off + n].view(self.shapes[i]).clone()
                off += n

    @torch.no_grad()
    def clip_grad_norm(self, max_norm: float) -> float:
        """Global grad norm (each parameter counted once, on its owner; with ep each expert slice once: the
        pipeline's slice norms² summed over the EP group) and clipping, as clip_grad_norm_."""
        sq = torch.zeros(2, dtype=torch.float64, device=self.pipe._device)  # [dense, expert slices]
        for i in self.held:
            g = self.params[i].grad
            if g is not None and self.owner[i] == self.rank:
                sq[int(i in self.experts)] += g.double().pow(2).sum()
        dist.all_reduce(sq, group=self.group)
        if self.ep is not None:
            e = sq[1:].clone()
            dist.all_reduce(e, group=self.ep.ep_group)
            sq[1] = e[0]
        norm = float((sq[0] + sq[1]).sqrt())
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0 or not math.isfinite(norm):
            for i in self.held:
                if self.params[i].grad is not None:
                    self.params[i].grad.mul_(coef)
        return norm

    # ---------- evaluation ----------
    @torch.no_grad()
    def evaluate(self, stream, batches: int, batch: int, precision: str) -> tuple[float, float | None]:
        """`loop.evaluate` for the split model (a collective over the world): the validation windows of this
        pipeline's data shard go through the stages in order, one batch at a time (stage s runs on the
        lowest pipeline rank holding it; hidden states are sent point-to-point, cast to the model dtype as
        in training). The last stage adds the main next-token loss. No schedule, no overlap: evaluation
        has a (PP-1)/PP bubble, but needs no weights beyond the rank's own stages. With ep, an MoE stage is a
        collective over its EP group (the same stage position in other pipelines, running the same stages in
        the same order), so every pipeline runs the same number of batches (`ExpertStep.pad_batches`; the
        padding batches are not counted)."""
        from dsv3.model.loss import shifted_cross_entropy
        from dsv3.train.data import bits_per_byte
        from dsv3.train.loop import autocast_ctx

        model, dev = self.model, self.pipe._device
        was = model.training
        model.eval()
        tot = torch.zeros(2, dtype=torch.float64, device=dev)
        glob = (lambda r: r) if self.group is dist.group.WORLD else (lambda r: dist.get_global_rank(self.group, r))
        xs = list(stream.eval_batches(batches, batch, self.dp_rank, self.dp))
        for x, counted in (self.ep.pad_batches(xs, self.seq_len) if self.ep is not None else [(x, True) for x in xs]):
            x, h = x.to(dev), None
            for s in range(self.n_stages):
                if self.stage_rank[s] != self.rank:
                    continue
                st = self.stage_of[s]
                if s and self.stage_rank[s - 1] != self.rank:
                    h = torch.empty(*x.shape, model.config.hidden_size, dtype=model.dtype, device=dev)
                    dist.recv(h, src=glob(self.stage_rank[s - 1]), group=self.group)
                with autocast_ctx(precision, dev):
                    h = st(x if s == 0 else h)
                    if s == self.n_stages - 1 and counted:
                        n = x.shape[0] * (x.shape[1] - 1)
                        tot[0] += shifted_cross_entropy(st.logits(h), x, 1).double() * n
                        tot[1] += n
                if s + 1 < self.n_stages and self.stage_rank[s + 1] != self.rank:
                    dist.send(h.to(model.dtype).contiguous(), dst=glob(self.stage_rank[s + 1]), group=self.group)
        dist.all_reduce(tot)  # each pipeline's last stage holds its sums; the others add zeros
        model.train(was)
        loss = float(tot[0] / tot[1].clamp(min=1))
        return loss, bits_per_byte(loss, stream.bytes_per_token)

    # ---------- whole-model checkpoints ----------
    def _opt_names(self, opt) -> list[str]:
        """Parameter names in the optimizer's index order (the plain run's: same model, same grouping)."""
        pos = {id(p): i for i, p in enumerate(self.params)}
        return [self.names[pos[id(p)]] for g in opt.param_groups for p in g["params"]]

    def full_state(self, opt, ema=None):
        """(whole model, object with the whole optimizer state_dict(), object with the whole EMA state_dict())
        on global rank 0, (None, None, None) elsewhere; a collective: call on every rank. Each parameter,
        its AdamW state and its EMA come from its owner (the lowest pipeline rank holding it) in pipeline 0
        (data-parallel pipelines hold the same values); buffers (routing biases) are whole on every rank."""
        ep = self.ep
        # pipelines 0 .. M-1 (EP group 0 at every stage position) hold every stage and every expert slice
        contributes = self.dp_rank < (ep.M if ep is not None else 1)
        if ep is None and not contributes:
            return None, None, None
        g = dict(zip(self.names, self.gnames))  # local -> whole-model names
        owned = {self.names[i] for i in self.held if self.owner[i] == self.rank} if contributes else set()
        w = {g[n]: p.detach().cpu() for n, p in zip(self.names, self.params) if n in owned}
        names = self._opt_names(opt)
        sd = opt.state_dict()
        o = {g[names[k]]: {a: (v.cpu() if torch.is_tensor(v) else v) for a, v in st.items()}
             for k, st in sd["state"].items() if names[k] in owned}
        e = {g[n]: v for n, v in ema.state_dict().items() if n in owned} if ema is not None else {}
        # ep: every rank takes part (the others send nothing); else pipeline 0 only (it holds global rank 0)
        n_in = dist.get_world_size() if ep is not None else self.pp
        out = [None] * n_in if dist.get_rank() == 0 else None
        dist.gather_object({"w": w, "o": o, "e": e}, out, dst=0, group=None if ep is not None else self.group)
        if dist.get_rank() != 0:
            return None, None, None
        for d in out[1:]:
            w.update(d["w"])
            o.update(d["o"])
            e.update(d["e"])
        canon = {id(p): n for n, p in zip(self.names, self.params)}
        for n, p in self.model.named_parameters(remove_duplicate=False):  # tied weights under both names
            w.setdefault(ep.g(n) if ep is not None else n, w[g[canon[id(p)]]])
        keys = set(self.model.state_dict())
        w.update({(ep.g(n) if ep is not None else n): b.detach().cpu()
                  for n, b in self.model.named_buffers() if n in keys})
        with torch.device("meta"):
            whole = type(self.model)(self.model.config)
        whole.to_empty(device="cpu")
        whole.load_state_dict(w)
        if ep is not None:  # the whole model's parameter order (more experts than this rank's optimizer has)
            full_opt = ep.whole_optimizer(sd["param_groups"], o)
        else:
            index = {n: k for k, n in enumerate(names)}
            full_opt = {"state": {index[n]: st for n, st in sorted(o.items(), key=lambda kv: index[kv[0]])},
                        "param_groups": sd["param_groups"]}
        return whole, StateDict(full_opt), (StateDict(e) if ema is not None else None)

    # ---------- loading a whole checkpoint (checkpoint.load(..., part=self): resume, rollback) ----------
    def load_weights(self, model, whole: dict) -> None:
        """Keep the held parameters of the whole model's state_dict (every rank reads the whole checkpoint,
        one whole model in CPU memory, transiently); buffers (routing biases) are taken whole."""
        for i, (gn, p) in enumerate(zip(self.gnames, self.params)):
            if i in self.held:
                p.copy_(whole[gn])
        g = self.ep.g if self.ep is not None else (lambda n: n)  # local -> whole-model names
        for n, b in model.named_buffers():
            if g(n) in whole:
                b.copy_(whole[g(n)])

    def local_optimizer_state(self, opt, full: dict) -> dict:
        """The AdamW state of the held parameters, at this rank's optimizer indices."""
        held = {self.names[i] for i in self.held}
        names = self._opt_names(opt)
        if self.ep is not None:  # whole-model indices -> this rank's (its expert slices only)
            local = [[names[k] for k in pg["params"]] for pg in opt.state_dict()["param_groups"]]
            return self.ep.local_optimizer(full, local, keep=held.__contains__)
        return {"state": {k: st for k, st in full["state"].items() if names[k] in held},
                "param_groups": full["param_groups"]}

    def local_ema_state(self, ema, whole: dict) -> dict:
        held = {self.names[i] for i in self.held}
        g = self.ep.g if self.ep is not None else (lambda n: n)
        return {n: (whole[g(n)] if n in held else t) for n, t in ema.state_dict().items()}

    # ---------- bubbles ----------
    def bubble_metrics(self) -> dict:
        """Gather this step's timelines (a collective); metrics for rank 0 (empty elsewhere)."""
        from dsv3.parallel.bubble import gather_timelines, report

        tls = gather_timelines(self.pipe)
        if self.rank != 0:
            return {}
        self.timelines = tls
        rep = report(self.kind, tls)
        m = {"pipeline/bubble_fraction": rep["fraction"], "pipeline/bubble_s": rep["bubble"],
             "pipeline/span_s": rep["span"]}
        for r, st in enumerate(rep["per_rank"]):
            m[f"pipeline/bubble_fraction/rank_{r}"] = st["fraction"]
        for k, v in rep["costs"].items():
            m[f"pipeline/op_s/{k}"] = v
        for k, v in rep["analytic"].items():
            m[f"pipeline/analytic_bubble_s/{k}"] = v
        # the formula of the schedule in use (DualPipeV has DualPipe's bubble), as a fraction of the span
        own = rep["analytic"]["1f1b" if self.kind == "1f1b" else "dualpipe"]
        m["pipeline/analytic_bubble_fraction"] = own / rep["span"] if rep["span"] else 0.0
        return m

    def gantt(self, path) -> str | None:
        from dsv3.parallel.bubble import gantt

        if not self.timelines:
            return None
        return gantt(self.timelines, str(path), f"{self.kind} PP={self.pp}, {self.chunks} chunks (last step)")
