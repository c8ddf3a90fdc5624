"""Gradient buckets all-reduced while backward runs: data parallelism that overlaps (§3.2; DDP's scheme).

The flat path (collectives.mean_grads_) waits for the whole backward, then all-reduces one buffer.
`GradBuckets` starts the communication as soon as gradients exist:
- Buckets: the parameters in reverse registration order (backward produces the last layers' gradients
  first), cut into buckets of about `bucket_mb` MB (a new bucket also at a dtype / device change).
- Hooks: `register_post_accumulate_grad_hook` on every parameter marks it ready once autograd has
  accumulated its gradient. A bucket whose parameters are all ready is flattened into one buffer and
  all-reduced asynchronously (`dist.all_reduce(..., async_op=True)`); `finish()` (the step's
  sync_grads) waits for the buckets, divides by `divisor` and copies back (the division follows the
  sum, as in the flat path).
- Same collectives in the same order on every rank: buckets are launched strictly in bucket order
  (bucket i only after 0..i-1), whatever order autograd produces gradients in on this rank.
- Unused parameters: a MoE rank leaves the experts no token went to without a gradient (their hook
  never fires), so their bucket would never fill and would hold back every later bucket. `arm(loss)`
  walks the autograd graph of `loss` before backward (DDP's find_unused_parameters) and marks every
  parameter it does not reach ready at once (a missing gradient becomes zeros, as in the flat path);
  a hook firing for such a parameter raises (a graph the walk cannot see through, e.g. reentrant
  checkpointing). `finish()` marks whatever is still not ready (arm() without a loss: everything
  backward did not reach) and launches the remaining buckets in order.
- Gradient accumulation (no_sync semantics): hooks act only after `arm()`; the caller arms before the
  last micro-batch's backward, so the earlier backwards only accumulate locally.
- Arithmetic: every element is summed over the same ranks and divided by the same divisor as in the
  flat buffer. With 2 ranks a sum is one addition (commutative: bitwise the flat path's); with more,
  gloo's ring sums an element in an order that depends on its offset in the buffer, so 3 ranks agree
  with the flat path to float rounding (tests/train/test_dp_overlap.py).
- Copies: gradients are flattened into a fresh buffer at launch and copied back after the wait
  (DDP's gradient_as_bucket_view would save that memory; not done).
Statistics of the last step (`stats()`): buckets launched during backward, parameters found unused by the
graph walk, parameters marked at finish, seconds blocked in the waits.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist


class GradBuckets:
    """Overlapped gradient mean over `group` for `params` (see the module docstring)."""

    def __init__(self, params: list[torch.Tensor], divisor: int, group=None, bucket_mb: float = 25.0):
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb must be > 0, got {bucket_mb}")
        self.divisor, self.group = divisor, group
        cap = bucket_mb * 2 ** 20
        self.buckets: list[list[torch.Tensor]] = []
        size, key = 0, None
        for p in reversed(params):
            nbytes = p.numel() * p.element_size()
            if not self.buckets or size + nbytes > cap and size > 0 or (p.dtype, p.device) != key:
                self.buckets.append([])
                size, key = 0, (p.dtype, p.device)
            self.buckets[-1].append(p)
            size += nbytes
        self.bucket_of = {id(p): b for b, ps in enumerate(self.buckets) for p in ps}
        self.handles = [p.register_post_accumulate_grad_hook(self._ready) for p in params]
        self.armed = False
        self._reset()
        self.last: dict = {}

    def _reset(self) -> None:
        self.pending = [len(ps) for ps in self.buckets]  # parameters of each bucket not yet ready
        self.marked: set[int] = set()
        self.unused: set[int] = set()  # marked by arm()'s graph walk: no gradient may arrive for them
        self.works: list = []  # (work, flat buffer, bucket index), in launch order
        self.next = 0  # the next bucket to launch

    def arm(self, loss: torch.Tensor | None = None) -> None:
        """Reduce from the next backward on (the last micro-batch's, of `loss`: parameters its graph does
        not reach are ready now)."""
        if self.works:
            raise RuntimeError("GradBuckets.arm: buckets of the previous backward are in flight "
                               "(finish() / sync_grads was not called after it)")
        self._reset()
        self.armed = True
        if loss is not None:
            reached = reachable_leaves(loss)
            self.unused = {i for i in self.bucket_of if i not in reached}
            for b, ps in enumerate(self.buckets):
                for p in ps:
                    if id(p) in self.unused:
                        self.marked.add(id(p))
                        self.pending[b] -= 1
            self._launch_ready()

    def _ready(self, p: torch.Tensor) -> None:
        if not self.armed:
            return
        if id(p) in self.unused:
            raise RuntimeError("GradBuckets: a gradient arrived for a parameter the loss's autograd graph does "
                               "not reach (reentrant checkpointing?); its bucket was already reduced")
        if id(p) in self.marked:
            return
        self.marked.add(id(p))
        self.pending[self.bucket_of[id(p)]] -= 1
        self._launch_ready()

    def _launch_ready(self) -> None:
        while self.next < len(self.buckets) and self.pending[self.next] == 0:
            self._launch(self.next)
            self.next += 1

    @torch.no_grad()
    def _launch(self, b: int) -> None:
        grads = []
        for p in self.buckets[b]:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad)
        flat = torch._utils._flatten_dense_tensors(grads)
        self.works.append((dist.all_reduce(flat, group=self.group, async_op=True), flat, b))

    @torch.no_grad()
    def finish(self) -> None:
        """Launch what backward left (parameters without a gradient: zeros), wait, divide, copy back."""
        early, unmarked = self.next, 0
        for b in range(self.next, len(self.buckets)):
            unmarked += self.pending[b]
            self.pending[b] = 0
        self._launch_ready()
        waited = 0.0
        for work, flat, b in self.works:
            start = time.perf_counter()
            work.wait()
            waited += time.perf_counter() - start
            grads = [p.grad for p in self.buckets[b]]
            for grad, reduced in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
                torch.div(reduced, self.divisor, out=grad)  # the division and the copy back in one pass
        self.last = {"buckets": len(self.buckets), "launched_in_backward": early,
                     "unused": len(self.unused), "marked_at_finish": unmarked, "wait_s": waited}
        self.armed = False
        self._reset()

    def stats(self) -> dict:
        """The last finished step's: buckets, buckets launched before finish() (during backward, or at arm()
        when all unused), parameters the graph walk
        found unused, parameters marked at finish (not reached by the armed backward), seconds blocked waiting."""
        return dict(self.last)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def reachable_leaves(loss: torch.Tensor) -> set[int]:
    """ids of the leaf tensors (parameters) whose gradient a backward of `loss` accumulates."""
    found: set[int] = set()
    seen: set = set()
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        var = getattr(fn, "variable", None)  # an AccumulateGrad node
        if var is not None:
            found.add(id(var))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found
