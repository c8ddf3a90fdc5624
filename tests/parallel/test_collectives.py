"""The shared collectives (dsv3.parallel.collectives) on 3 gloo ranks: the flat gradient mean equals the
per-tensor mean (missing grads count as zeros, sub-groups and a group of one), the sharded global-norm clip
equals torch's clip_grad_norm_ on the whole parameter set, gather_union merges every rank's part on rank 0,
a whole model assembles from its parts, and a broadcast object reaches every rank."""

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from dsv3.parallel import collectives
from tests.parallel.workers import spawn

WORLD = 3


def _grads(rank: int, n: int = 4):
    """Parameters of mixed shapes whose gradients differ per rank (the last one has none on rank 1)."""
    g = torch.Generator().manual_seed(10 + rank)
    params = [torch.nn.Parameter(torch.zeros(s)) for s in ((3, 5), (7,), (2, 2, 2), (4,))][:n]
    for i, p in enumerate(params):
        if not (rank == 1 and i == len(params) - 1):
            p.grad = torch.randn(p.shape, generator=g)
    return params


def _worker(rank, world, out):
    rep: dict = {}
    params = _grads(rank)
    collectives.mean_grads_(params, world)
    rep["mean"] = [p.grad.tolist() for p in params]
    pair = dist.new_group([0, 2])  # a sub-group; rank 1 reduces alone (reduce=False: only the division)
    params = _grads(rank)
    if rank == 1:
        collectives.mean_grads_(params, 4, reduce=False)
    else:
        collectives.mean_grads_(params, 4, pair)
    rep["pair"] = [p.grad.tolist() for p in params]
    # sharded clipping: rank r owns parameter r (of 3) of a "whole model"; the norm is summed over ranks
    mine = _grads(rank, 3)[rank]
    sq = collectives.grad_sq_norm([mine])
    dist.all_reduce(sq)
    rep["norm"] = collectives.clip_grads_([mine], 0.5, sq)
    rep["clipped"] = mine.grad.tolist()
    big = collectives.all_reduce_mean(torch.tensor([float(rank), 2.0 * rank], dtype=torch.float64), world)
    rep["stats"] = big.tolist()
    got = collectives.gather_union({"w": {f"p{rank}": rank}, "o": {f"q{rank}": [rank]}})
    rep["union"] = got
    rep["broadcast"] = collectives.broadcast_object(f"from {rank}")
    Path(out, f"r{rank}.json").write_text(json.dumps(rep))


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    d = tmp_path_factory.mktemp("coll")
    spawn(_worker, WORLD, str(d))
    return [json.loads((d / f"r{r}.json").read_text()) for r in range(WORLD)]


def test_mean_grads_equals_the_mean_of_each_tensor(reports):
    per_rank = [_grads(r) for r in range(WORLD)]
    for i in range(4):
        grads = [p[i].grad if p[i].grad is not None else torch.zeros_like(p[i]) for p in per_rank]
        want = torch.stack(grads).sum(0) / WORLD
        for rep in reports:
            assert torch.allclose(torch.tensor(rep["mean"][i]), want, rtol=1e-6, atol=1e-7), i
        pair = (grads[0] + grads[2]) / 4
        assert torch.allclose(torch.tensor(reports[0]["pair"][i]), pair, rtol=1e-6, atol=1e-7)
        assert torch.allclose(torch.tensor(reports[2]["pair"][i]), pair, rtol=1e-6, atol=1e-7)
        assert torch.allclose(torch.tensor(reports[1]["pair"][i]), grads[1] / 4, rtol=1e-6, atol=1e-7)


def test_sharded_clip_equals_torch_clip_on_the_whole_set(reports):
    whole = [_grads(r, 3)[r] for r in range(WORLD)]
    norm = float(torch.nn.utils.clip_grad_norm_(whole, 0.5))
    assert norm > 0.5  # the clip is active
    for rep in reports:
        assert rep["norm"] == pytest.approx(norm, rel=1e-6)
    for r, rep in enumerate(reports):
        assert torch.allclose(torch.tensor(rep["clipped"]), whole[r].grad, rtol=1e-6, atol=1e-7)


def test_clip_leaves_small_and_flags_non_finite_grads():
    p = torch.nn.Parameter(torch.zeros(3))
    p.grad = torch.tensor([0.1, 0.2, 0.2])
    norm = collectives.clip_grads_([p], 1.0, collectives.grad_sq_norm([p]))
    assert norm == pytest.approx(0.3) and p.grad.tolist() == pytest.approx([0.1, 0.2, 0.2])
    p.grad = torch.tensor([float("inf"), 0.0, 1.0])
    norm = collectives.clip_grads_([p], 1.0, collectives.grad_sq_norm([p]))
    assert norm == float("inf") and torch.isnan(p.grad).all()  # the loop skips such a step


def test_stats_union_and_broadcast(reports):
    for rep in reports:
        assert rep["stats"] == pytest.approx([1.0, 2.0])  # (0 + 1 + 2) / 3, (0 + 2 + 4) / 3
        assert rep["broadcast"] == "from 0"
    assert reports[0]["union"] == {"w": {"p0": 0, "p1": 1, "p2": 2}, "o": {"q0": [0], "q1": [1], "q2": [2]}}
    assert reports[1]["union"] is None and reports[2]["union"] is None


def test_assemble_whole_model_from_parts():
    from dsv3 import DeepSeekV3, ModelConfig

    torch.manual_seed(0)
    model = DeepSeekV3(ModelConfig.preset("tiny"))
    sd = model.state_dict()
    names = sorted(sd)
    parts = [{k: sd[k].clone() for k in names[i::2]} for i in range(2)]  # two "ranks'" halves
    whole = collectives.assemble_whole_model(model, {**parts[0], **parts[1]})
    assert type(whole) is type(model) and whole.embed_tokens.weight.device.type == "cpu"
    assert all(torch.equal(v, sd[k]) for k, v in whole.state_dict().items())
    with pytest.raises(RuntimeError, match="Missing key"):
        collectives.assemble_whole_model(model, parts[0])
