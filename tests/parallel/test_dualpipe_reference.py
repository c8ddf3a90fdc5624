"""DeepSeek's DualPipe example checks, written as a user of the reference package would, run on dsv3's schedules.

Mirrors `examples/example_dualpipe.py` and `examples/example_dualpipev.py` of github.com/deepseek-ai/DualPipe
(our own code, same calls). A reference user changes only the import: `from dualpipe import DualPipe,
DualPipeV, set_p2p_tensor_shapes, set_p2p_tensor_dtype` and `from dualpipe.utils import WeightGradStore,
run_backward` become the `dsv3.parallel` import below. Everything else is called exactly as the example
calls it: the module-level `set_p2p_tensor_*` functions, `DualPipe(nn.Sequential(stage_a, stage_b))`,
`step(x, num_chunks=..., criterion=..., labels=(l,), return_outputs=...)` with `x = l = None` on the
ranks that neither feed nor finish a pipe, a stage class with its own weight-grad-splitting Linear and
an `overlapped_forward_backward` classmethod.

Checks (the example's): per-chunk losses `torch.equal` to a sequential micro-batch reference (DualPipe: the
first rank's are the second half's, the last rank's the first half's; DualPipeV: all on rank 0), every
grad within 1e-13 cos-diff of the reference's (DualPipe: after adding the mirror rank's grads of the
same stage), forward-only losses and outputs `torch.equal`, None elsewhere. At PP = 2 and 4 (DualPipeV
also at PP = 1, as the example's loop goes down to 1). Not the example's: gloo CPU processes instead of
NCCL GPUs, tiny sizes, and `dist.all_gather` (gloo's `all_gather_into_tensor` wants a flat output) in the
grad check; plus asserts that the hook and the stage's own deferred weight grads were really used.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from dsv3.parallel import (DualPipe, DualPipeV, WeightGradStore, run_backward, set_p2p_tensor_dtype,
                           set_p2p_tensor_shapes)
from tests.parallel.workers import spawn

NUM_CHUNKS, MICRO_BATCH, SEQ_LEN, HIDDEN = 20, 3, 4, 8


class DeferredLinearFn(torch.autograd.Function):
    """x W^T whose weight grad is queued in WeightGradStore while a zero-bubble B runs."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)

        def weight_grad():
            weight.grad += grad_out.flatten(0, -2).T @ x.flatten(0, -2)

        if WeightGradStore.enabled:
            WeightGradStore.put(weight_grad)
            StageWithHook.deferred += 1
        else:
            weight_grad()
        return grad_out @ weight, None


class DeferredLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DeferredLinearFn.apply(x, self.weight)


class StageWithHook(nn.Module):
    calls = 0      # overlapped_forward_backward calls in this process
    deferred = 0   # weight grads queued in WeightGradStore

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.up = DeferredLinear(hidden, 4 * hidden, bias=False)
        self.down = DeferredLinear(4 * hidden, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.gelu(self.up(x)))

    @classmethod
    def overlapped_forward_backward(
        cls, module0: "StageWithHook", inputs0: List[torch.Tensor], criterion0: Optional[Callable],
        labels0: Optional[List[torch.Tensor]], module1: "StageWithHook", loss1: Optional[torch.Tensor],
        outputs1: Optional[List[torch.Tensor]], output_grads1: Optional[List[torch.Tensor]],
    ) -> Tuple[List[torch.Tensor], Optional[torch.Tensor]]:
        """Forward of one chunk, then the backward of the other (no real overlap: a plain sequence)."""
        cls.calls += 1
        outputs0 = module0(*inputs0)
        outputs0 = [outputs0] if isinstance(outputs0, torch.Tensor) else outputs0
        loss0 = criterion0(*outputs0, *labels0) if criterion0 is not None else None
        if loss1 is not None:
            loss1.backward()
            loss1.detach_()
        else:
            run_backward(outputs1, output_grads1)
        return outputs0, loss0


def criterion(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(output, target).clone()


def sequential_step(x, labels, model, chunks):
    """The reference: the whole model on one micro-batch after another, backward per micro-batch."""
    outs, losses = [], []
    for micro_x, micro_l in zip(x.chunk(chunks), labels.chunk(chunks)):
        y = model(micro_x)
        loss = criterion(y, micro_l)
        loss.backward()
        outs.append(y)
        losses.append(loss)
    return torch.stack(losses), torch.cat(outs, 0)


def cos_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return 1 - 2 * (a * b).sum().item() / (a * a + b * b).sum().item()


def local_copies(full: nn.Sequential, first: int, second: int) -> Tuple[nn.Sequential, nn.Sequential]:
    local_full = nn.Sequential(full[first], full[second])
    local = nn.Sequential(StageWithHook(HIDDEN), StageWithHook(HIDDEN))
    local[0].load_state_dict(local_full[0].state_dict())
    local[1].load_state_dict(local_full[1].state_dict())
    return local_full, local


def check_used_own_split(local: nn.Sequential) -> None:
    assert StageWithHook.calls > 0, "the stage's overlapped_forward_backward was never called"
    assert StageWithHook.deferred > 0, "no weight grad went through the stage's own WeightGradStore split"
    assert all("forward" not in vars(m) for m in local.modules()), "a stage's own Linear forward was replaced"
    StageWithHook.calls = StageWithHook.deferred = 0


def main_dualpipe(rank: int, pp_size: int) -> None:
    is_first_rank, is_last_rank = rank == 0, rank == pp_size - 1
    torch.manual_seed(233)
    set_p2p_tensor_shapes([(MICRO_BATCH, SEQ_LEN, HIDDEN)])
    set_p2p_tensor_dtype(torch.float32)
    full_modules = nn.Sequential(*[StageWithHook(HIDDEN) for _ in range(pp_size)])
    full_x = torch.randn(NUM_CHUNKS * MICRO_BATCH, SEQ_LEN, HIDDEN)
    full_l = torch.randn(NUM_CHUNKS * MICRO_BATCH, SEQ_LEN, HIDDEN)
    loss_ref, output_ref = sequential_step(full_x, full_l, full_modules, NUM_CHUNKS)

    local_full_modules, local_modules = local_copies(full_modules, rank, pp_size - 1 - rank)
    dualpipe_model = DualPipe(local_modules)
    if is_first_rank:
        x, l = full_x.chunk(2)[0], full_l.chunk(2)[1]
    elif is_last_rank:
        x, l = full_x.chunk(2)[1], full_l.chunk(2)[0]
    else:
        x = l = None

    loss, outputs = dualpipe_model.step(x, num_chunks=NUM_CHUNKS, criterion=criterion, labels=(l,),
                                        return_outputs=False)
    if is_first_rank:
        assert torch.equal(loss, loss_ref.chunk(2)[1])
    elif is_last_rank:
        assert torch.equal(loss, loss_ref.chunk(2)[0])
    else:
        assert loss is None
    assert outputs is None
    check_used_own_split(local_modules)

    for p0, p1 in zip(local_modules[0].parameters(), local_modules[1].parameters()):
        p0all = [torch.empty_like(p0) for _ in range(pp_size)]
        p1all = [torch.empty_like(p1) for _ in range(pp_size)]
        dist.all_gather(p0all, p0.grad)
        dist.all_gather(p1all, p1.grad)
        p0.grad += p1all[pp_size - 1 - rank]
        p1.grad += p0all[pp_size - 1 - rank]
    for (name, p), p_ref in zip(local_modules.named_parameters(), local_full_modules.parameters()):
        assert cos_diff(p.grad, p_ref.grad) < 1e-13, (rank, name, cos_diff(p.grad, p_ref.grad))
    dualpipe_model.zero_grad()

    with torch.no_grad():
        loss, outputs = dualpipe_model.step(x, num_chunks=NUM_CHUNKS, criterion=criterion, labels=(l,),
                                            return_outputs=True)
    if is_first_rank:
        assert torch.equal(loss, loss_ref.chunk(2)[1])
        assert torch.equal(outputs, output_ref.chunk(2)[1])
    elif is_last_rank:
        assert torch.equal(loss, loss_ref.chunk(2)[0])
        assert torch.equal(outputs, output_ref.chunk(2)[0])
    else:
        assert loss is None
        assert outputs is None


def main_dualpipev(rank: int, pp_size: int) -> None:
    is_first_rank = rank == 0
    torch.manual_seed(233)
    set_p2p_tensor_shapes([(MICRO_BATCH, SEQ_LEN, HIDDEN)])
    set_p2p_tensor_dtype(torch.float32)
    full_modules = nn.Sequential(*[StageWithHook(HIDDEN) for _ in range(pp_size * 2)])
    x = torch.randn(NUM_CHUNKS * MICRO_BATCH, SEQ_LEN, HIDDEN)
    l = torch.randn(NUM_CHUNKS * MICRO_BATCH, SEQ_LEN, HIDDEN)
    loss_ref, output_ref = sequential_step(x, l, full_modules, NUM_CHUNKS)

    local_full_modules, local_modules = local_copies(full_modules, rank, pp_size * 2 - 1 - rank)
    dualpipev_model = DualPipeV(local_modules)
    if not is_first_rank:
        x = l = None

    loss, outputs = dualpipev_model.step(x, num_chunks=NUM_CHUNKS, criterion=criterion, labels=(l,),
                                         return_outputs=False)
    if is_first_rank:
        assert torch.equal(loss, loss_ref)
    else:
        assert loss is None
    assert outputs is None
    check_used_own_split(local_modules)

    for (name, p), p_ref in zip(local_modules.named_parameters(), local_full_modules.parameters()):
        assert cos_diff(p.grad, p_ref.grad) < 1e-13, (rank, name, cos_diff(p.grad, p_ref.grad))
    dualpipev_model.zero_grad()

    with torch.no_grad():
        loss, outputs = dualpipev_model.step(x, num_chunks=NUM_CHUNKS, criterion=criterion, labels=(l,),
                                             return_outputs=True)
    if is_first_rank:
        assert torch.equal(loss, loss_ref)
        assert torch.equal(outputs, output_ref)
    else:
        assert loss is None
        assert outputs is None


def _conventions(rank: int, pp_size: int) -> None:
    """Beyond the example (PP=2): a Sequential of another size is refused by name, a schedule's own
    set_p2p_tensor_* (the dsv3 methods) wins over the module-level default, a first rank without
    inputs gets a clear error, and the old tuple form still works."""
    stages = [StageWithHook(HIDDEN) for _ in range(3)]
    with pytest.raises(ValueError, match=r"DualPipe takes 2 stage module\(s\) per rank .*got 3"):
        DualPipe(nn.Sequential(*stages))
    set_p2p_tensor_shapes([(MICRO_BATCH + 1, SEQ_LEN, HIDDEN)])  # a wrong default ...
    pipe = DualPipe((stages[0], stages[1]))
    pipe.set_p2p_tensor_shapes([(MICRO_BATCH, SEQ_LEN, HIDDEN)])  # ... that this schedule overrides
    x = torch.randn(2 * pp_size * MICRO_BATCH, SEQ_LEN, HIDDEN)
    loss, _ = pipe.step(x, num_chunks=4 * pp_size, criterion=criterion, labels=(x,))
    assert loss.shape == (2 * pp_size,) and torch.isfinite(loss).all()
    with pytest.raises(ValueError, match="runs a first stage and needs inputs"):
        pipe.step(None, num_chunks=4 * pp_size, criterion=criterion, labels=(x,))


def _examples(rank: int, pp_size: int) -> None:
    if pp_size % 2 == 0:  # DualPipe needs an even PP
        main_dualpipe(rank, pp_size)
        dist.barrier()
    main_dualpipev(rank, pp_size)
    if pp_size == 2:
        dist.barrier()
        _conventions(rank, pp_size)


@pytest.mark.parametrize("pp_size", [1, 2, 4])
def test_reference_examples(pp_size):
    spawn(_examples, pp_size)
