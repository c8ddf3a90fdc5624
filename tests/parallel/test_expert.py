"""Expert parallelism vs the single-process DeepSeekMoE (§3.2.2): outputs and grads, node-limited routing."""

import copy

import pytest
import torch
import torch.distributed as dist

from dsv3.model.config import ModelConfig
from dsv3.model.moe import DeepSeekMoE
from dsv3.parallel.expert import ExpertParallelMoE, all_to_all, shard_experts
from tests.parallel.workers import spawn

T = 6  # tokens per sequence


def _moe(n_nodes, max_nodes):
    # no group limit in the model itself: the EP layer must impose the node limit
    cfg = ModelConfig.preset("tiny", n_group=1, topk_group=1, num_experts_per_tok=4 if max_nodes == 2 else 2)
    torch.manual_seed(0)
    moe = DeepSeekMoE(cfg)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return moe


def _tokens(rank):
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(2, T, 64, generator=g)


def _ep_worker(rank, ep, ranks_per_node, max_nodes, starve=False):
    moe = _moe(ep // ranks_per_node, max_nodes)
    if starve:  # the last rank's experts are never selected: it must still run the backward all-to-alls
        moe.gate.e_score_correction_bias[-moe.n_experts // ep:] = -100.0
    ref = copy.deepcopy(moe).train()
    if max_nodes:  # the single-process equivalent: group-limited routing with groups = nodes, M groups
        ref.gate.n_group, ref.gate.topk_group = ep // ranks_per_node, max_nodes
    layer = ExpertParallelMoE(moe, ranks_per_node=ranks_per_node, max_nodes=max_nodes).train()
    xs = [_tokens(r) for r in range(ep)]  # every rank knows all ranks' tokens, for the reference
    # reference: the full MoE on all ranks' tokens, one backward of the summed loss
    xr = torch.cat(xs).requires_grad_(True)
    gy = torch.randn(xr.shape, generator=torch.Generator().manual_seed(7))
    (ref(xr) * gy).sum().backward()
    x = xs[rank].clone().requires_grad_(True)
    y = layer(x)
    (y * gy[2 * rank: 2 * rank + 2]).sum().backward()
    torch.testing.assert_close(y, ref(xr)[2 * rank: 2 * rank + 2].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad, xr.grad[2 * rank: 2 * rank + 2], rtol=1e-5, atol=1e-6)
    lo, hi = layer.local_range
    for e in range(lo, hi):  # routed expert grads collect every rank's tokens through the all-to-all
        for p, q in zip(layer.experts[e - lo].parameters(), ref.experts[e].parameters()):
            if q.grad is None:  # an expert no token selected
                assert p.grad is None or not p.grad.any()
                continue
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
    for p, q in zip(list(layer.gate.parameters()) + list(layer.shared_experts.parameters()),
                    list(ref.gate.parameters()) + list(ref.shared_experts.parameters())):
        g = p.grad.clone()
        dist.all_reduce(g)  # replicated parts: data-parallel grads (summed in another order: looser)
        torch.testing.assert_close(g, q.grad, rtol=1e-4, atol=1e-5)
    # load counters see this rank's tokens only
    torch.testing.assert_close(layer.gate.load.sum(), torch.tensor(2.0 * T * moe.topk))
    if max_nodes:
        _, _, idx = layer.route(x.detach().reshape(-1, 64))
        nodes = layer.nodes_of(idx)
        n_distinct = torch.tensor([len(set(r.tolist())) for r in nodes])
        assert int(n_distinct.max()) <= max_nodes
        free = moe.gate(x.detach().reshape(-1, 64))[1]  # without the limit tokens do span more nodes
        assert max(len(set(r.tolist())) for r in layer.nodes_of(free)) > max_nodes
    layer.eval()
    with torch.no_grad():
        torch.testing.assert_close(layer.forward_overlapped(xs[rank]), layer(xs[rank]), rtol=1e-5, atol=2e-5)


def _a2a_worker(rank, world):
    # uneven per-rank splits, forward and the backward of the custom Function
    send = [rank + d + 1 for d in range(world)]
    recv = [s + rank + 1 for s in range(world)]
    x = torch.arange(sum(send), dtype=torch.float64).unsqueeze(1).add(100 * rank).requires_grad_(True)
    y = all_to_all(x, recv, send)
    chunks = y.split(recv)
    for s, c in enumerate(chunks):  # from rank s: its slice for me starts after its slices for ranks < me
        start = sum(s + d + 1 for d in range(rank))
        assert torch.equal(c.squeeze(1), torch.arange(start, start + s + rank + 1, dtype=torch.float64) + 100 * s)
    (y * torch.arange(1, y.shape[0] + 1).unsqueeze(1)).sum().backward()
    assert x.grad.shape == x.shape and (x.grad > 0).all()


def _bad_worker(rank, world):
    with pytest.raises(ValueError, match="max_nodes"):
        ExpertParallelMoE(_moe(1, None), ranks_per_node=4, max_nodes=2)  # 4 ranks = 1 node
    with pytest.raises(ValueError, match="ranks_per_node"):
        ExpertParallelMoE(_moe(1, None), ranks_per_node=3)


def _model_worker(rank, world):
    from dsv3.model.transformer import DeepSeekV3

    torch.manual_seed(0)
    model = DeepSeekV3(ModelConfig.preset("tiny", aux_loss_alpha=0.0)).eval()
    ref = copy.deepcopy(model)
    shard_experts(model, ranks_per_node=2)
    layers = model.moe_layers()
    assert layers and all(isinstance(m, ExpertParallelMoE) and len(m.experts) == 2 for m in layers)
    ids = torch.randint(0, 512, (2, 8), generator=torch.Generator().manual_seed(rank))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-6)


def _all(rank, world):
    _model_worker(rank, world)
    _a2a_worker(rank, world)
    for ranks_per_node, max_nodes in [(1, None), (2, 1), (1, 2)]:  # 4 nodes unlimited; 2 nodes, M=1; 4 nodes, M=2
        _ep_worker(rank, world, ranks_per_node, max_nodes)
        dist.barrier()
    _ep_worker(rank, world, 1, None, starve=True)
    dist.barrier()
    _bad_worker(rank, world)


def test_expert_parallel_matches_single_process():
    """One 4-rank gloo job (process start-up dominates on 2 cores): all-to-all with uneven splits,
    then EP layers with and without node limits, forward, backward and the overlapped forward; and a layer
    whose last rank's experts get no token (its backward all-to-alls must still run)."""
    spawn(_all, 4)
