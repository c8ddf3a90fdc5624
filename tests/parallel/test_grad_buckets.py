"""GradBuckets (dsv3.parallel.grad_buckets) on 3 gloo ranks: with gradient accumulation and parameters that
get no gradient on some ranks (MoE's unused experts), the bucketed mean equals the flat `mean_grads_` bitwise
(integer-valued gradients: every summation order gives the same sums), every bucket is launched before
`finish()`, unused parameters are found by the graph walk before backward (or at finish without it); the
bucket layout follows reverse registration order, the size cap and dtypes; misuse raises."""

import json
from pathlib import Path

import pytest
import torch

from dsv3.parallel import collectives
from dsv3.parallel.grad_buckets import GradBuckets, reachable_leaves
from tests.parallel.workers import spawn

WORLD, N, SIZE = 3, 6, 1000
# parameters used by the first (not armed) and the last micro-batch, per rank; parameter 5 only on rank 2
USED = {0: ({0, 1, 2}, {0, 3}), 1: ({4}, {0, 1, 2, 3}), 2: (set(), {5, 1})}


def _params() -> list[torch.nn.Parameter]:
    return [torch.nn.Parameter(torch.zeros(SIZE)) for _ in range(N)]


def _loss(params, rank: int, used: set[int], scale: float) -> torch.Tensor:
    """Integer-valued gradients: d/dp_i = (rank + 1 + i) * scale."""
    terms = [(rank + 1 + i) * scale * params[i].sum() for i in sorted(used)]
    return torch.stack(terms).sum() if terms else torch.zeros((), requires_grad=True)


def _run(rank, params, buckets, with_loss: bool) -> None:
    first, last = USED[rank]
    _loss(params, rank, first, 1.0).backward()  # no_sync: not armed
    loss = _loss(params, rank, last, 3.0)
    buckets.arm(loss if with_loss else None)
    loss.backward()
    buckets.finish()


def _worker(rank, world, out):
    rep: dict = {}
    ref = _params()
    for used in USED[rank]:
        _loss(ref, rank, used, 1.0 if used is USED[rank][0] else 3.0).backward()
    collectives.mean_grads_(ref, world)
    rep["flat"] = [p.grad.tolist() for p in ref]
    for name, with_loss in (("walk", True), ("no_walk", False)):
        params = _params()
        buckets = GradBuckets(params, world, bucket_mb=2 * SIZE * 4 / 2 ** 20)  # two parameters per bucket
        for _ in range(2):  # twice: the per-step state resets
            for p in params:
                p.grad = None
            _run(rank, params, buckets, with_loss)
        rep[name] = [p.grad.tolist() for p in params]
        rep[name + "_stats"] = buckets.stats()
    params = _params()
    buckets = GradBuckets(params, world, bucket_mb=1.0)
    buckets.arm(_loss(params, rank, {0}, 1.0))  # parameter 1 is not reached by this loss...
    try:
        _loss(params, rank, {0, 1}, 1.0).backward()  # ...but this backward gives it a gradient
    except RuntimeError as e:
        rep["unreached_error"] = str(e)
    buckets.finish()
    loss = _loss(params, rank, {0}, 1.0)
    buckets.arm(loss)
    loss.backward()  # the one bucket is in flight
    try:
        buckets.arm()
    except RuntimeError as e:
        rep["in_flight_error"] = str(e)
    buckets.finish()
    Path(out, f"r{rank}.json").write_text(json.dumps(rep))


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    d = tmp_path_factory.mktemp("buckets")
    spawn(_worker, WORLD, str(d))
    return [json.loads((d / f"r{r}.json").read_text()) for r in range(WORLD)]


def test_bucketed_mean_equals_the_flat_mean(reports):
    for rank, rep in enumerate(reports):
        assert rep["walk"] == rep["flat"] and rep["no_walk"] == rep["flat"], rank
        # not a trivial zero: the mean of parameter 5 is rank 2's gradient / 3
        assert rep["flat"][5][0] == pytest.approx((2 + 1 + 5) * 3.0 / WORLD)
        assert rep["flat"][4][0] == pytest.approx((1 + 1 + 4) * 1.0 / WORLD)


def test_unused_parameters_are_found_before_backward(reports):
    for rank, rep in enumerate(reports):
        st = rep["walk_stats"]
        assert st["buckets"] == N // 2 and st["launched_in_backward"] == N // 2 and st["marked_at_finish"] == 0
        assert st["unused"] == N - len(USED[rank][1])
        st = rep["no_walk_stats"]  # without the walk the unused ones wait for finish()
        assert st["unused"] == 0 and st["marked_at_finish"] == N - len(USED[rank][1])
        assert st["launched_in_backward"] < N // 2


def test_misuse_raises(reports):
    for rep in reports:
        assert "does not reach" in rep["unreached_error"]
        assert "in flight" in rep["in_flight_error"]


def test_bucket_layout_and_graph_walk():
    params = [torch.nn.Parameter(torch.zeros(n)) for n in (100, 300, 200, 50)]
    params.append(torch.nn.Parameter(torch.zeros(10, dtype=torch.float64)))
    b = GradBuckets(params, 1, bucket_mb=400 * 4 / 2 ** 20)
    # reverse registration order; a new bucket past 400 floats (300 + 100 fits) and at the dtype change
    assert [[p.numel() for p in ps] for ps in b.buckets] == [[10], [50, 200], [300, 100]]
    b.remove()
    with pytest.raises(ValueError, match="bucket_mb"):
        GradBuckets(params, 1, bucket_mb=0)
    loss = (params[0].sum() * 2 + params[2].sum()).exp()
    assert reachable_leaves(loss) == {id(params[0]), id(params[2])}
