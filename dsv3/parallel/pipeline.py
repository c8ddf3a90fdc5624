"""DualPipe, DualPipeV and 1F1B pipeline executors on torch.distributed (DeepSeek-V3 report §3.2.1).

Design:
- One executor (`PipelineSchedule`) runs the per-rank op list from `schedules.build` (F, B, W and the
  overlapped F&B pair); DualPipe / DualPipeV / OneFOneB only pick the topology and the op list.
- Zero bubble: the backward of every `nn.Linear` in the stage modules is split (its forward is swapped
  for `_SplitLinear`, numerically `F.linear`). B runs autograd as usual but, while `WeightGradStore.enabled`,
  each Linear returns only its input grad and queues the closure `dW += g^T x, db += sum g`; a W op pops
  one chunk's closures and runs them. `dsv3.fp8.FP8Linear` does the same split in its own backward (FP8
  Dgrad in B, the FP8 Wgrad closure queued; `split_weight_grads` leaves it alone), so fp8 models keep their
  FP8 GEMMs in a pipeline. Parameters outside Linear layers get their grads in B. The grads
  are the same sums as autograd's, so they match the sequential reference to rounding (exactly the
  same math, only `.grad` accumulation order may differ).
- P2P: `isend`/`irecv` (gloo on CPU, NCCL on GPU) into buffers shaped by `set_p2p_tensor_shapes` /
  `set_p2p_tensor_dtype` (module-level functions as in the reference: the default for every schedule;
  the methods of the same name set one schedule's own, which wins); tags separate activations from
  gradients and the two directions (gloo matches per tag; NCCL ignores tags, so on NCCL a step checks by
  simulation that every rank pair's messages come in the expected order, and refuses otherwise). After
  each op, its sends and the next op's receives are posted as one `batch_isend_irecv` (as the reference
  commits its comms), so transfers overlap the next compute and a send/recv pair between two ranks
  cannot block each other. DualPipeV's hand-over at the last rank is a local queue, not a message.
- An F&B pair runs the forward then the backward with both chunks' receives posted ahead and sends issued
  at once. Interleaving the two chunks' compute with their all-to-all (§3.2.2) is the stage's job: as in
  the reference, when both stage modules are of one class with a classmethod
  `overlapped_forward_backward(module0, inputs0, criterion0, labels0, module1, loss1, outputs1,
  output_grads1) -> (outputs0, loss0)`, a training step's F&B pairs call it instead.
- Every op is timed (F, B, Bi = zero-bubble input-grad B, W, FB, and `wait` = blocked on a receive) into
  `self.timeline` (see `bubble.py`); forward-only steps (under `torch.no_grad`) run the F ops in order.
- The reference calling convention (github.com/deepseek-ai/DualPipe) works unchanged apart from the
  import: `DualPipe(nn.Sequential(stage_a, stage_b))` (or a tuple/list), `batch_dim`, `process_group`,
  `rank_mapping` (process-group rank -> pipeline rank); `step(*inputs, num_chunks, criterion, labels,
  return_outputs) -> (loss, outputs)`; ranks that neither feed nor finish a pipe may pass anything
  (the reference passes `step(None, ..., labels=(None,))`) and get (None, None); outputs are None unless
  return_outputs. `run_backward` / `WeightGradStore` serve stage code that splits its own weight grads
  (a Linear subclass with its own forward is left alone). DualPipe: the first rank feeds the first half
  of the batch and computes the loss of the second half (its `labels` belong to the last rank's
  inputs), the last rank the other way round. DualPipeV / 1F1B: the first rank gets inputs; the loss is
  on the first (V) / last (1F1B) rank.
- DualPipe keeps two copies of every stage (ranks r and PP-1-r); `DualPipe.sync_grads()` sums their
  grads after a step (before the optimizer), as the report's "two copies of the parameters" require.
"""

from __future__ import annotations

import time
import types
from collections import deque
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dsv3.model.wgrad import WeightGradStore, accumulate_grad  # noqa: F401  (the reference API names)
from dsv3.parallel import schedules


def run_backward(tensors, grad_tensors) -> None:
    """Backward from `tensors` with `grad_tensors`, accumulating into .grad (the reference's helper, for
    stage code such as an `overlapped_forward_backward` hook)."""
    torch.autograd.backward(tuple(tensors), tuple(grad_tensors))


_P2P: dict = {"shapes": None, "dtype": None}  # defaults for every schedule (the reference's globals)


def set_p2p_tensor_shapes(shapes) -> None:
    """Default shapes of the tensors passed between stages, per micro-batch (a list of shapes)."""
    _P2P["shapes"] = [tuple(s) for s in shapes]


def set_p2p_tensor_dtype(dtype: torch.dtype) -> None:
    """Default dtype of the tensors passed between stages."""
    _P2P["dtype"] = dtype


class _SplitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, holder):
        ctx.save_for_backward(x)
        ctx.holder = holder
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        lin = ctx.holder
        gx = g.matmul(lin.weight) if ctx.needs_input_grad[0] else None
        need_w, need_b = ctx.needs_input_grad[1], ctx.needs_input_grad[2]

        def wgrad():
            g2, x2 = g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1])
            return (g2.t().matmul(x2) if need_w else None), (g2.sum(0) if need_b else None)

        if WeightGradStore.enabled and (need_w or need_b):
            def deferred():
                gw, gb = wgrad()
                if gw is not None:
                    accumulate_grad(lin.weight, gw)
                if gb is not None:
                    accumulate_grad(lin.bias, gb)
            WeightGradStore.put(deferred)
            return gx, None, None, None
        gw, gb = wgrad()
        return gx, gw, gb, None


def _split_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _SplitLinear.apply(x, self.weight, self.bias, self)


def split_weight_grads(module: nn.Module) -> nn.Module:
    """Make every nn.Linear in `module` defer its weight grad while WeightGradStore.enabled. A Linear class
    with `splits_weight_grad = True` (dsv3.fp8.FP8Linear: its Wgrad is an FP8 GEMM) defers its own and is
    left as it is, and so is a Linear subclass with its own forward (stage code written for the reference
    DualPipe splits its weight grads itself through `WeightGradStore`)."""
    for m in module.modules():
        if isinstance(m, nn.Linear) and not getattr(m, "_dsv3_split", False) \
                and not getattr(m, "splits_weight_grad", False) and type(m).forward is nn.Linear.forward:
            m.forward = types.MethodType(_split_linear_forward, m)
            m._dsv3_split = True
    return module


def _as_tuple(x) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _scatter(tensors, n: int, dim: int) -> list:
    """n micro-batches (tuples) of `tensors` split along `dim`; a None stays None in every micro-batch."""
    if not tensors:
        return [() for _ in range(n)]
    for t in tensors:
        if t is not None and t.shape[dim] % n:
            raise ValueError(f"batch dim {dim} of size {t.shape[dim]} is not divisible into {n} chunks")
    parts = [(None,) * n if t is None else t.chunk(n, dim) for t in tensors]
    return [tuple(p[i] for p in parts) for i in range(n)]


class PipelineSchedule(nn.Module):
    """Base executor; subclasses set `kind` (a schedules.KINDS name)."""

    kind = "1f1b"

    def __init__(self, modules, batch_dim: int = 0, process_group=None, rank_mapping=None):
        super().__init__()
        want = 1 if self.kind == "1f1b" else 2
        # the reference passes nn.Sequential(stage_a, stage_b); 1F1B takes one module (a Sequential too)
        pair = want == 2 and isinstance(modules, (nn.Sequential, nn.ModuleList))
        modules = tuple(modules) if pair or isinstance(modules, (tuple, list)) else (modules,)
        if len(modules) != want:
            how = " (a tuple, list or nn.Sequential of the two)" if want == 2 else ""
            raise ValueError(f"{type(self).__name__} takes {want} stage module(s) per rank{how}, got {len(modules)}")
        self.module = nn.ModuleList(split_weight_grads(m) for m in modules)
        # the reference's hook: F&B pairs go through the stage class's own overlapped forward-backward
        self.overlapped_forward_backward = want == 2 and type(modules[0]) is type(modules[1]) \
            and hasattr(type(modules[0]), "overlapped_forward_backward")
        self.batch_dim = batch_dim
        self.group = process_group or dist.group.WORLD
        self.num_ranks = dist.get_world_size(self.group)
        if self.kind == "dualpipe" and self.num_ranks % 2:
            raise ValueError(f"DualPipe needs an even number of pipeline ranks, got {self.num_ranks}")
        mapping = list(rank_mapping) if rank_mapping is not None else list(range(self.num_ranks))
        if sorted(mapping) != list(range(self.num_ranks)):
            raise ValueError(f"rank_mapping must be a permutation of 0..{self.num_ranks - 1}, got {mapping}")
        self.rank = mapping[dist.get_rank(self.group)]
        self.is_first_rank, self.is_last_rank = self.rank == 0, self.rank == self.num_ranks - 1
        inverse = {pp: g for g, pp in enumerate(mapping)}
        self._global = {pp: dist.get_global_rank(self.group, g) if self.group is not dist.group.WORLD else g
                        for pp, g in inverse.items()}
        self.prev, self.next = schedules.topology(self.kind, self.num_ranks, self.rank)
        self.shapes, self.dtype = None, None
        self.timeline: list = []
        self._nccl_ok: set = set()
        params = [p for m in self.module for p in m.parameters()]
        self._device = params[0].device if params else torch.device("cpu")

    def set_p2p_tensor_shapes(self, shapes) -> None:
        """This schedule's shapes of the tensors passed between stages, per micro-batch (a list of shapes);
        wins over the module-level `set_p2p_tensor_shapes`."""
        self.shapes = [tuple(s) for s in shapes]

    def set_p2p_tensor_dtype(self, dtype: torch.dtype) -> None:
        """This schedule's P2P dtype; wins over the module-level `set_p2p_tensor_dtype`."""
        self.dtype = dtype

    # ---------- communication ----------
    def _tag(self, kind: str, d: int) -> int:
        return (0 if kind == "F" else 2) + d

    def _recv_ops(self, kind: str, d: int):
        """Buffers and irecv ops feeding op (kind, d) of this rank; None when not remote."""
        src = self.prev[d] if kind == "F" else self.next[d]
        if src is None or src[0] == self.rank:
            return None
        bufs = [torch.empty(s, dtype=self._p2p_dtype, device=self._device) for s in self._p2p_shapes]
        return bufs, [dist.P2POp(dist.irecv, b, self._global[src[0]], self.group, self._tag(kind, d)) for b in bufs]

    def _commit(self, ops: list, upto: int) -> None:
        """Post, as one batch_isend_irecv, the current op's sends and the receives of the ops up to index
        `upto` not yet posted (so that a send and a receive between the same two ranks never wait on
        each other, as with NCCL streams). gloo looks one op further ahead (receives are independent
        there), so a transfer overlaps a whole op of compute."""
        p2p, entries = list(self._outbox), []
        for op in ops[self._posted:upto]:
            parts = [("F", op[1])] if op[0] == "F" else [("B", op[1])] if op[0] == "B" else \
                [("F", op[1]), ("B", op[2])] if op[0] == "FB" else []
            for kind, d in parts:
                r = self._recv_ops(kind, d)
                if r is not None:
                    entries.append(((kind, d), r[0], len(p2p), len(r[1])))
                    p2p += r[1]
        self._posted = max(self._posted, min(upto, len(ops)))
        self._outbox = []
        if not p2p:
            return
        works = dist.batch_isend_irecv(p2p)
        per_op = len(works) == len(p2p)
        n_send = len(p2p) - sum(e[3] for e in entries)  # sends come first in p2p
        self._sends += [(op.tensor, w) for op, w in zip(p2p[:n_send], works)] if per_op else [(None, w) for w in works]
        for key, bufs, i, n in entries:  # posting order == consumption order per (kind, direction)
            self._pending[key].append((bufs, works[i:i + n] if per_op else works))

    def _recv(self, kind: str, d: int):
        key = (kind, d)
        src = self.prev[d] if kind == "F" else self.next[d]
        if src[0] == self.rank:
            return self._local[key].popleft()
        bufs, works = self._pending[key].popleft()
        self._close_segment()
        t0 = time.perf_counter()
        for w in works:
            w.wait()
        self._event("wait", d, t0, -1)
        self._seg_t0 = time.perf_counter()
        return tuple(bufs)

    def _send(self, kind: str, d: int, tensors) -> None:
        dst = self.next[d] if kind == "F" else self.prev[d]
        dd = dst[1]
        tensors = tuple(t.detach() for t in tensors)
        if dst[0] == self.rank:
            self._local[(kind, dd)].append(tensors)
            return
        for t in tensors:
            t = t.to(self._p2p_dtype).contiguous()
            self._outbox.append(dist.P2POp(dist.isend, t, self._global[dst[0]], self.group, self._tag(kind, dd)))

    def _event(self, name: str, d: int, t0: float, op_index: int) -> None:
        """Timeline entry (name, direction, t0, t1, op index); an op interrupted by receive waits is
        recorded as several segments with the same op index, so entries never overlap."""
        self.timeline.append((name, d, t0 - self._t_start, time.perf_counter() - self._t_start, op_index))

    def _close_segment(self) -> None:
        if self._seg is not None:
            self._event(self._seg[0], self._seg[1], self._seg_t0, self._seg[2])

    # ---------- compute ----------
    def _forward_inputs(self, d: int) -> tuple:
        """(chunk index, inputs) of the next forward of direction d: step inputs or received activations."""
        i = self._fcount[d]
        self._fcount[d] += 1
        if self.prev[d] is None:
            return i, self._inputs[i]
        return i, tuple(t.requires_grad_(not self.forward_only) if t.is_floating_point() else t
                        for t in self._recv("F", d))

    def _forward_done(self, d: int, i: int, inputs, outputs, loss) -> None:
        """Keep what the backward needs, record the loss/outputs of a last stage, send the activations."""
        if self.next[d] is None:
            if loss is not None:
                self._losses.append(loss.detach())
                if not self.forward_only:
                    self._saved[d].append((inputs, loss))
            if self.return_outputs:
                self._outputs.append(tuple(o.detach() if o is not None else None for o in outputs))
        else:
            self._send("F", d, outputs)
            if not self.forward_only:
                self._saved[d].append((inputs, outputs))

    def _forward(self, d: int) -> None:
        i, inputs = self._forward_inputs(d)
        outputs = _as_tuple(self.module[d](*inputs))
        last = self.next[d] is None and self.criterion is not None
        self._forward_done(d, i, inputs, outputs, self.criterion(*outputs, *self._labels[i]) if last else None)

    def _backward_inputs(self, d: int) -> tuple:
        """(stage inputs, loss or None, outputs, output grads) of the next backward of direction d."""
        self._bcount[d] += 1
        inputs, outputs = self._saved[d].popleft()
        if self.next[d] is None:
            return inputs, outputs, (), ()
        pairs = [(o, g) for o, g in zip(outputs, self._recv("B", d)) if o is not None and o.requires_grad]
        return inputs, None, tuple(o for o, _ in pairs), tuple(g for _, g in pairs)

    def _backward_done(self, d: int, inputs) -> None:
        if self.prev[d] is not None:
            self._send("B", d, [t.grad if t.grad is not None else torch.zeros_like(t) for t in inputs])

    def _backward(self, d: int, zb: bool) -> None:
        inputs, loss, outputs, grads = self._backward_inputs(d)
        WeightGradStore.enabled = zb
        try:
            if loss is not None:
                loss.backward()
            elif outputs:
                run_backward(outputs, grads)
        finally:
            WeightGradStore.enabled = False
        if zb:
            WeightGradStore.flush()
        self._backward_done(d, inputs)

    def _forward_backward(self, df: int, db: int) -> None:
        """An F&B pair through the stage class's `overlapped_forward_backward` (the reference's hook)."""
        i, inputs0 = self._forward_inputs(df)
        last0 = self.next[df] is None and self.criterion is not None
        criterion0, labels0 = (self.criterion, list(self._labels[i])) if last0 else (None, [])
        inputs1, loss1, outputs1, grads1 = self._backward_inputs(db)
        module0, module1 = self.module[df], self.module[db]
        outputs0, loss0 = type(module0).overlapped_forward_backward(
            module0, list(inputs0), criterion0, labels0, module1, loss1, list(outputs1), list(grads1))
        self._forward_done(df, i, inputs0, _as_tuple(outputs0), loss0 if last0 else None)
        self._backward_done(db, inputs1)

    def _run(self, op, j: int) -> None:
        name = op[0]
        self._seg = ("Bi" if name == "B" and op[2] else name, op[1] if len(op) > 1 else -1, j)
        self._seg_t0 = time.perf_counter()
        if name == "F":
            self._forward(op[1])
        elif name == "B":
            self._backward(op[1], op[2])  # recorded as Bi when zero-bubble: its W comes later
        elif name == "W":
            WeightGradStore.pop()
        elif self.overlapped_forward_backward:
            self._forward_backward(op[1], op[2])
        else:
            self._forward(op[1])   # F&B pair: receives of both were posted before, sends go out at once
            self._backward(op[2], False)
        self._close_segment()
        self._seg = None

    # ---------- step ----------
    def _check_step(self, num_chunks: int) -> None:
        """Resolve the P2P shapes/dtype (own setting, else the module-level default) and check the args."""
        self._p2p_shapes = self.shapes if self.shapes is not None else _P2P["shapes"]
        self._p2p_dtype = self.dtype if self.dtype is not None else _P2P["dtype"]
        if self._p2p_shapes is None or self._p2p_dtype is None:
            raise RuntimeError("set_p2p_tensor_shapes and set_p2p_tensor_dtype must be called before step()")
        schedules.check_args(self.kind, self.num_ranks, num_chunks)
        if dist.get_backend(self.group) == "nccl" and (num_chunks, torch.is_grad_enabled()) not in self._nccl_ok:
            # NCCL ignores tags: messages on each rank pair must arrive in the order they are expected
            if not schedules.simulate(self.kind, self.num_ranks, num_chunks,
                                      forward_only=not torch.is_grad_enabled())["channels_ok"]:
                raise RuntimeError(f"{self.kind} PP={self.num_ranks} num_chunks={num_chunks}: the message order "
                                   "is not NCCL-safe (it relies on P2P tags); use gloo or another PP size")
            self._nccl_ok.add((num_chunks, torch.is_grad_enabled()))

    def _reset(self, inputs: tuple, labels: tuple, n: int) -> None:
        """Per-step state; inputs (labels) are split into n micro-batches only on a rank that feeds (finishes)
        a pipe, so other ranks may pass anything, e.g. the reference's `step(None, labels=(None,))`."""
        feeds = any(p is None for p in self.prev)
        finishes = any(p is None for p in self.next)
        if feeds and all(t is None for t in inputs):
            raise ValueError(f"rank {self.rank} runs a first stage and needs inputs")
        if finishes and not self.forward_only and self.criterion is None:
            raise ValueError(f"rank {self.rank} runs a last stage and needs a criterion")
        self._inputs = _scatter(inputs, n, self.batch_dim) if feeds else None
        self._labels = _scatter(labels, n, self.batch_dim) if finishes and self.criterion is not None else None
        self._fcount, self._bcount = [0, 0], [0, 0]
        self._saved = [deque(), deque()]
        self._local = {k: deque() for k in [("F", 0), ("F", 1), ("B", 0), ("B", 1)]}
        self._pending = {k: deque() for k in [("F", 0), ("F", 1), ("B", 0), ("B", 1)]}
        self._sends, self._outbox, self._losses, self._outputs = [], [], [], []
        WeightGradStore.clear()
        self.timeline, self._seg = [], None

    def step(self, *inputs, num_chunks: int = 0, criterion: Callable | None = None, labels=(),
             return_outputs: bool = False):
        """Run one training (or, under torch.no_grad, forward-only) step; see the module docstring.
        Returns (loss [chunks of this rank's loss stage] or None, outputs or None)."""
        self._check_step(num_chunks)
        self.forward_only = not torch.is_grad_enabled()
        self.criterion, self.return_outputs = criterion, return_outputs
        ops = schedules.build(self.kind, self.num_ranks, self.rank, num_chunks, self.forward_only)
        self._reset(inputs, tuple(labels), schedules.chunks_per_direction(self.kind, num_chunks))
        self._t_start = time.perf_counter()
        ahead = 1 if dist.get_backend(self.group) == "nccl" else 2
        self._posted = 0
        self._commit(ops, ahead)
        for j, op in enumerate(ops):
            self._run(op, j)
            self._commit(ops, j + 1 + ahead)
        t0 = time.perf_counter()
        for _, w in self._sends:
            w.wait()
        self._event("wait", -1, t0, -1)
        assert not WeightGradStore.queue and all(not p for p in self._pending.values())
        self._sends = []
        loss = torch.stack(self._losses) if self._losses else None
        outputs = None
        if return_outputs and self._outputs:
            cat = tuple(None if o0 is None else torch.cat([o[k] for o in self._outputs], self.batch_dim)
                        for k, o0 in enumerate(self._outputs[0]))
            outputs = cat[0] if len(cat) == 1 else cat
        self._inputs = self._labels = self._outputs = self._losses = None
        return loss, outputs


class DualPipe(PipelineSchedule):
    """Bidirectional pipeline: `modules=(stage r, stage PP-1-r)`; PP even; num_chunks >= 2*PP, even."""

    kind = "dualpipe"

    @torch.no_grad()
    def sync_grads(self) -> None:
        """Sum the grads of the two copies of each stage (stage r lives on ranks r and PP-1-r, §3.2.1):
        ranks r and PP-1-r exchange the grads of their (same two) stages, ordered by stage index and
        de-duplicated by tensor (a parameter shared by both stages, e.g. the MTP embedding, counts once)."""
        partner = self.num_ranks - 1 - self.rank
        mods = [self.module[0], self.module[1]] if self.rank < partner else [self.module[1], self.module[0]]
        params, seen = [], set()
        for m in mods:
            for p in m.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    params.append(p)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        other = torch.empty_like(flat)
        ops = [dist.P2POp(dist.isend, flat, self._global[partner], self.group),
               dist.P2POp(dist.irecv, other, self._global[partner], self.group)]
        for w in dist.batch_isend_irecv(ops):
            w.wait()
        total, off = flat + other, 0
        for p in params:
            n = p.numel()
            p.grad = total[off:off + n].view_as(p).clone()
            off += n


class DualPipeV(PipelineSchedule):
    """DualPipe cut in half ("V" shape): `modules=(stage r, stage 2*PP-1-r)`; the first rank feeds inputs
    and computes the loss."""

    kind = "dualpipev"


class OneFOneB(PipelineSchedule):
    """Classic 1F1B: `modules=stage r` (or a 1-tuple); the first rank feeds inputs, the last computes the loss."""

    kind = "1f1b"
