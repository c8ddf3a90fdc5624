"""EPLB (§3.4 redundant experts): DeepSeek's published example, the invariants of a plan, bad input."""

import itertools

import pytest
import torch

from dsv3.serve.eplb import (balanced_packing, default_placement, gpu_loads, imbalance, rebalance_experts,
                             replicate_experts)

# github.com/deepseek-ai/EPLB README: 2 layers x 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs
README_WEIGHT = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                              [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
README_PHY2LOG = torch.tensor([[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                               [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]])


def check_plan(weight, P, G, N, gpus, phy2log, log2phy, logcnt):
    L, E = weight.shape
    assert phy2log.shape == (L, P) and logcnt.shape == (L, E) and log2phy.shape[:2] == (L, E)
    assert phy2log.dtype == log2phy.dtype == logcnt.dtype == torch.int64
    assert log2phy.shape[2] == int(logcnt.max())
    assert (logcnt >= 1).all() and (logcnt.sum(-1) == P).all()
    for l in range(L):
        assert torch.equal(torch.bincount(phy2log[l], minlength=E), logcnt[l])
        for e in range(E):
            slots = log2phy[l, e]
            n = int(logcnt[l, e])
            assert (slots[n:] == -1).all() and (slots[:n] >= 0).all()
            assert (phy2log[l, slots[:n]] == e).all() and len(set(slots[:n].tolist())) == n
    if G % N == 0:  # hierarchical: a group's replicas all live on one node
        node = phy2log.view(L, N, -1)
        gsize = E // G
        for l in range(L):
            for n in range(N):
                groups = set((node[l, n] // gsize).tolist())
                assert len(groups) == G // N, (l, n, groups)


def test_readme_example():
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert torch.equal(phy2log, README_PHY2LOG)
    check_plan(README_WEIGHT, 16, 4, 2, 8, phy2log, log2phy, logcnt)
    # the figure in the README: experts 5, 4, 10, 1 of layer 0 get the 4 redundant slots
    assert logcnt[0].tolist() == [1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1]
    before = imbalance(gpu_loads(README_WEIGHT, *default_placement(2, 12)[::2], 4))
    after = imbalance(gpu_loads(README_WEIGHT, phy2log, logcnt, 8))
    assert (after < before).all()  # vs 3 experts on each of 4 GPUs without replicas


@pytest.mark.parametrize("G,N,gpus,extra", [(4, 2, 8, 4), (8, 4, 8, 8), (4, 3, 6, 2), (1, 1, 4, 4),
                                           (8, 2, 4, 0), (2, 1, 2, 6)])
def test_random_plans(G, N, gpus, extra):
    g = torch.Generator().manual_seed(G * 100 + N * 10 + gpus)
    E = 16
    P = E + extra
    P += (-P) % gpus
    for dist in ("uniform", "skewed", "ints"):
        if dist == "uniform":
            w = torch.rand(3, E, generator=g)
        elif dist == "skewed":
            w = torch.rand(3, E, generator=g) ** 6 * 1000
        else:
            w = torch.randint(0, 5, (3, E), generator=g)  # many ties
        plan = rebalance_experts(w, P, G, N, gpus)
        check_plan(w, P, G, N, gpus, *plan)


def test_replication_minimises_max_load_per_replica():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        w = torch.rand(1, 4, generator=g) * 10
        _, _, cnt = replicate_experts(w, 7)
        best = min(max(w[0, i].item() / c[i] for i in range(4))
                   for c in itertools.product(range(1, 5), repeat=4) if sum(c) == 7)
        assert (w[0] / cnt[0]).max().item() == pytest.approx(best)


def test_balanced_packing_is_even_and_greedy():
    w = torch.tensor([[10.0, 9, 8, 7, 1, 1]])
    pack, rank = balanced_packing(w, 2)
    assert sorted(torch.bincount(pack[0]).tolist()) == [3, 3]
    loads = torch.zeros(2).index_add_(0, pack[0], w[0])
    assert loads.tolist() == [18.0, 18.0]  # 10+7+1 / 9+8+1
    assert sorted(rank[0, pack[0] == 0].tolist()) == [0, 1, 2]


def test_skewed_load_is_balanced():
    g = torch.Generator().manual_seed(1)
    w = torch.rand(4, 32, generator=g) ** 8 * 1e4  # a few very hot experts
    before = imbalance(gpu_loads(w, *default_placement(4, 32)[::2], 8))
    phy2log, _, logcnt = rebalance_experts(w, 40, 4, 1, 8)
    after = imbalance(gpu_loads(w, phy2log, logcnt, 8))
    assert (after < before).all()
    assert after.max() < 1.3 < before.min()


@pytest.mark.parametrize("args,msg", [
    ((torch.ones(12), 16, 4, 2, 8), "weight must be"),
    ((torch.ones(2, 12), 10, 4, 2, 2), "num_replicas=10 <"),
    ((torch.ones(2, 12), 16, 4, 2, 6), "num_replicas=16 is not a multiple of num_gpus=6"),
    ((torch.ones(2, 12), 16, 4, 3, 8), "num_gpus=8 is not a multiple of num_nodes=3"),
    ((torch.ones(2, 12), 16, 5, 1, 8), "do not split into num_groups=5"),
    ((-torch.ones(2, 12), 16, 4, 2, 8), "non-negative"),
    ((torch.full((2, 12), float("nan")), 16, 4, 2, 8), "finite"),
])
def test_bad_input(args, msg):
    with pytest.raises(ValueError, match=msg):
        rebalance_experts(*args)
