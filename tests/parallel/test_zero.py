"""Zero1 (dsv3.parallel.zero) on 3 gloo ranks: each rank keeps the optimizer state of its shard only, and the
updated weights are bitwise the unsharded optimizer's (torch AdamW and dsv3.fp8.AdamWBF16); the gathered
state_dict is the unsharded one (same numbering, groups and tensors); loading an unsharded state_dict and
stepping on equals the unsharded optimizer; misuse raises."""

import copy
import json
from pathlib import Path

import pytest
import torch

from dsv3.fp8.optim import AdamWBF16
from dsv3.parallel.zero import Zero1, partition
from tests.parallel.workers import spawn

WORLD, STEPS = 3, 3
SHAPES = ((40, 8), (8,), (16, 16), (3,), (70,), (5, 5))
MAKERS = {"adamw": lambda groups: torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1),
          "bf16": lambda groups: AdamWBF16(groups, lr=1e-2, weight_decay=0.1)}


def _groups():
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s)) for s in SHAPES]
    return ps, [{"params": [ps[i] for i in (0, 2, 5)], "weight_decay": 0.1},
                {"params": [ps[i] for i in (1, 3, 4)], "weight_decay": 0.0}]


def _grads(ps, step):
    g = torch.Generator().manual_seed(100 + step)  # the same on every rank (after an all-reduce)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)


def _same(a: dict, b: dict) -> bool:
    if a["param_groups"] != b["param_groups"] or a["state"].keys() != b["state"].keys():
        return False
    return all(sa.keys() == b["state"][i].keys() and all(torch.equal(torch.as_tensor(v), torch.as_tensor(b["state"][i][k]))
                                                        for k, v in sa.items()) for i, sa in a["state"].items())


def _worker(rank, world, out):
    rep = {}
    for name, make in MAKERS.items():
        ref_ps, ref_groups = _groups()
        ref = make(ref_groups)
        ps, groups = _groups()
        z = Zero1(groups, make)
        for step in range(STEPS):
            for params, opt in ((ref_ps, ref), (ps, z)):
                _grads(params, step)
                opt.step()
                opt.zero_grad(set_to_none=True)
        rep[name] = {"weights": all(torch.equal(a, b) for a, b in zip(ps, ref_ps)),
                     "n_state": len(z.inner.state), "mine": z.mine}
        full = z.full_state_dict()
        if rank == 0:
            rep[name]["full_equal"] = _same(full, ref.state_dict())
        else:
            rep[name]["full_none"] = full is None
        # a fresh Zero1 loading the unsharded state continues as the unsharded optimizer
        ps2, groups2 = _groups()
        with torch.no_grad():
            for a, b in zip(ps2, ref_ps):
                a.copy_(b)
        z2 = Zero1(groups2, make)
        z2.load_state_dict(copy.deepcopy(ref.state_dict()))  # as read from a checkpoint (no shared tensors)
        for params, opt in ((ref_ps, ref), (ps2, z2)):
            _grads(params, STEPS)
            opt.step()
        rep[name]["resumed"] = all(torch.equal(a, b) for a, b in zip(ps2, ref_ps))
    try:
        z.state_dict()
    except RuntimeError as e:
        rep["state_dict_error"] = str(e)
    bad = ref.state_dict()
    bad["param_groups"] = bad["param_groups"][:1]
    try:
        z.load_state_dict(bad)
    except ValueError as e:
        rep["load_error"] = str(e)
    Path(out, f"r{rank}.json").write_text(json.dumps(rep))


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    d = tmp_path_factory.mktemp("zero")
    spawn(_worker, WORLD, str(d))
    return [json.loads((d / f"r{r}.json").read_text()) for r in range(WORLD)]


@pytest.mark.parametrize("name", list(MAKERS))
def test_sharded_state_gives_the_unsharded_update(reports, name):
    mine = [rep[name]["mine"] for rep in reports]
    assert sorted(i for m in mine for i in m) == list(range(len(SHAPES)))  # every parameter owned once
    for rep in reports:
        r = rep[name]
        assert r["weights"] and r["resumed"]
        assert r["n_state"] == len(r["mine"]) < len(SHAPES)
    assert reports[0][name]["full_equal"]
    assert all(rep[name]["full_none"] for rep in reports[1:])


def test_misuse_raises(reports):
    for rep in reports:
        assert "full_state_dict" in rep["state_dict_error"]
        assert "groups hold" in rep["load_error"]


def test_partition_is_balanced_and_deterministic():
    sizes = [100, 10, 10, 50, 40, 7, 60]
    owner = partition(sizes, 3)
    assert owner == partition(sizes, 3)
    loads = [sum(s for s, r in zip(sizes, owner) if r == k) for k in range(3)]
    assert sorted(loads) == [87, 90, 100]  # 100 | 60+10+10+7 | 50+40
    assert partition([5], 3) == [0]
