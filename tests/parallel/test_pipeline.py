"""DualPipe / DualPipeV / 1F1B on gloo vs the sequential single-process reference (§3.2.1)."""

import copy

import pytest
import torch
import torch.distributed as dist

from dsv3.parallel import DualPipe, DualPipeV, OneFOneB, WeightGradStore, split_weight_grads
from dsv3.parallel.bubble import gather_timelines, report
from tests.parallel.workers import DIM, MB, assert_grads, criterion, data, make_stages, reference, spawn


def _pipe(cls, mods, mapping=None):
    p = cls(mods, rank_mapping=mapping)
    p.set_p2p_tensor_shapes([(MB, DIM)])
    p.set_p2p_tensor_dtype(torch.float32)
    return p


def _check_dualpipe(rank, pp, nc, mapping=None):
    rank = mapping[rank] if mapping else rank  # process rank -> pipeline rank
    stages = make_stages(pp)
    x, y = data(nc)
    half = nc // 2
    # direction 0 carries the first half of the batch through stages 0..PP-1 (inputs on rank 0),
    # direction 1 the second half (inputs on the last rank); each rank holds copies of 2 stages.
    l0, o0, ref0 = reference(stages, x[: half * MB], y[: half * MB], half)
    l1, o1, ref1 = reference(stages, x[half * MB:], y[half * MB:], half)
    pipe = _pipe(DualPipe, (copy.deepcopy(stages[rank]), copy.deepcopy(stages[pp - 1 - rank])), mapping)
    first, last = rank == 0, rank == pp - 1
    args = (x[: half * MB],) if first else (x[half * MB:],) if last else ()
    labels = (y[half * MB:],) if first else (y[: half * MB],) if last else ()
    for it in range(2):  # second step: state is reset, grads accumulate like the reference's
        loss, out = pipe.step(*args, num_chunks=nc, criterion=criterion, labels=labels, return_outputs=True)
        if first:
            assert torch.equal(loss, l1) and torch.equal(out, o1), "rank 0: loss/outputs of direction 1"
        elif last:
            assert torch.equal(loss, l0) and torch.equal(out, o0), "last rank: loss/outputs of direction 0"
        else:
            assert loss is None and out is None
        if it == 0:
            assert_grads(pipe.module[0], ref0[rank], f"rank{rank}.stage{rank}")
            assert_grads(pipe.module[1], ref1[pp - 1 - rank], f"rank{rank}.stage{pp - 1 - rank}")
    kinds = {e[0] for e in pipe.timeline}
    assert {"F", "B", "Bi", "W", "FB", "wait"} <= kinds, kinds
    rep = report("dualpipe", gather_timelines(pipe))
    assert rep["pp"] == pp and rep["costs"]["W"] > 0 and 0 <= rep["fraction"] < 1
    assert all(s["count"]["W"] == s["count"]["Bi"] for s in rep["per_rank"])
    with torch.no_grad():
        loss, out = pipe.step(*args, num_chunks=nc, criterion=criterion, labels=labels, return_outputs=True)
    if first:
        assert torch.equal(loss, l1) and torch.equal(out, o1)
    if last:
        assert torch.equal(loss, l0) and torch.equal(out, o0)


def _check_dualpipev(rank, pp, nc):
    stages = make_stages(2 * pp)
    x, y = data(nc)
    lref, oref, ref = reference(stages, x, y, nc)
    pipe = _pipe(DualPipeV, (copy.deepcopy(stages[rank]), copy.deepcopy(stages[2 * pp - 1 - rank])))
    args, labels = ((x,), (y,)) if rank == 0 else ((), ())
    loss, out = pipe.step(*args, num_chunks=nc, criterion=criterion, labels=labels, return_outputs=True)
    if rank == 0:
        assert torch.equal(loss, lref) and torch.equal(out, oref)
    else:
        assert loss is None
    assert_grads(pipe.module[0], ref[rank], f"V rank{rank}.stage{rank}")
    assert_grads(pipe.module[1], ref[2 * pp - 1 - rank], f"V rank{rank}.stage{2 * pp - 1 - rank}")
    with torch.no_grad():
        loss, out = pipe.step(*args, num_chunks=nc, criterion=criterion, labels=labels, return_outputs=True)
    if rank == 0:
        assert torch.equal(loss, lref) and torch.equal(out, oref)


def _check_1f1b(rank, pp, nc):
    stages = make_stages(pp)
    x, y = data(nc)
    lref, oref, ref = reference(stages, x, y, nc)
    pipe = _pipe(OneFOneB, copy.deepcopy(stages[rank]))
    args = (x,) if rank == 0 else ()
    labels = (y,) if rank == pp - 1 else ()
    loss, out = pipe.step(*args, num_chunks=nc, criterion=criterion, labels=labels, return_outputs=True)
    if rank == pp - 1:
        assert torch.equal(loss, lref) and torch.equal(out, oref)
    assert_grads(pipe.module[0], ref[rank], f"1f1b rank{rank}")


def _errors(rank, pp):
    stages = make_stages(pp)
    pipe = DualPipe((stages[rank], stages[pp - 1 - rank]))
    x, y = data(2 * pp)
    with pytest.raises(RuntimeError, match="set_p2p_tensor_shapes"):
        pipe.step(x, num_chunks=2 * pp, criterion=criterion, labels=(y,))
    pipe.set_p2p_tensor_shapes([(MB, DIM)])
    pipe.set_p2p_tensor_dtype(torch.float32)
    with pytest.raises(ValueError, match="num_chunks >= 2"):
        pipe.step(x, num_chunks=2 * pp - 2, criterion=criterion, labels=(y,))
    odd = dist.new_group([0])  # every rank must take part in new_group
    if rank == 0:
        with pytest.raises(ValueError, match="even number of pipeline ranks"):
            DualPipe((stages[0], stages[0]), process_group=odd)
    dist.barrier()


def _worker(rank, pp, cases):
    for name, nc in cases:
        {"dualpipe": _check_dualpipe, "dualpipev": _check_dualpipev, "1f1b": _check_1f1b}[name](rank, pp, nc)
        dist.barrier()
    if pp == 2:
        _errors(rank, pp)
    if pp == 4:
        _check_dualpipe(rank, pp, 8, mapping=[2, 0, 3, 1])


def test_pipelines_pp2():
    spawn(_worker, 2, [("dualpipe", 4), ("dualpipe", 6), ("dualpipev", 4), ("dualpipev", 5), ("1f1b", 4)])


def test_pipelines_pp4():
    spawn(_worker, 4, [("dualpipe", 8), ("dualpipe", 12), ("dualpipev", 8), ("dualpipev", 10), ("1f1b", 8)])


def test_weight_grad_split_is_exact_and_deferred():
    torch.manual_seed(0)
    ref = make_stages(1)[0]
    mod = split_weight_grads(copy.deepcopy(ref))
    x = torch.randn(4, DIM, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    ref(xr).square().sum().backward()
    WeightGradStore.clear()
    WeightGradStore.enabled = True
    try:
        mod(x).square().sum().backward()
    finally:
        WeightGradStore.enabled = False
    WeightGradStore.flush()
    assert mod[0].weight.grad is None and mod[3].weight.grad is None  # deferred
    assert mod[2].weight.grad is not None  # LayerNorm: not split, computed in B
    assert torch.equal(x.grad, xr.grad)
    WeightGradStore.pop()
    for p, q in zip(mod.parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=1e-6, atol=1e-7)
    assert not WeightGradStore.queue


def test_deferred_weight_grad_under_bf16_autocast_is_cast_like_autograd():
    """Under bf16 autocast (train.precision bf16 / fp8: the Linears left in high precision) a split Linear's
    deferred weight grad is computed in bf16; the W op casts it to the fp32 parameter's dtype, as autograd
    does with a Function's returned grad, so split and plain grads are equal."""
    torch.manual_seed(0)
    ref = make_stages(1)[0]
    mod = split_weight_grads(copy.deepcopy(ref))
    x = torch.randn(4, DIM)
    for m, zb in ((ref, False), (mod, True)):
        WeightGradStore.clear()
        WeightGradStore.enabled = zb
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                m(x).float().square().sum().backward()
        finally:
            WeightGradStore.enabled = False
        if zb:
            WeightGradStore.flush()
            assert mod[0].weight.grad is None
            with torch.autocast("cpu", dtype=torch.bfloat16):  # the pipeline's W ops run in the step's autocast
                WeightGradStore.pop()
    for (n, p), q in zip(mod.named_parameters(), ref.parameters()):
        assert p.grad.dtype == torch.float32 and torch.equal(p.grad, q.grad), n
