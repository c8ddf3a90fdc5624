"""Expert-parallel serving with redundant experts (§3.4) on gloo ranks vs single-process inference:
same logits (forward and latent-cache decode), EPLB lowers the measured per-rank expert load, and the
dual micro-batch overlap gives the same output as the plain path."""

import copy

import pytest
import torch

from dsv3.model.config import ModelConfig
from dsv3.model.transformer import DeepSeekV3
from dsv3.serve.eplb import default_placement, imbalance
from dsv3.serve.expert_parallel import (EPConfig, MicroBatchOverlap, RedundantExpertMoE, ep_logits,
                                        place_experts, rank_loads, run_micro_batches,
                                        update_placement)
from dsv3.serve.load_stats import ExpertLoadRecorder
from tests.parallel.workers import spawn

B, S, V = 4, 12, 512  # sequences per rank, prompt length, vocabulary


def tiny_model(hot: bool = True) -> DeepSeekV3:
    torch.manual_seed(0)
    model = DeepSeekV3(ModelConfig.preset("tiny", vocab_size=V)).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger weights than the init: routing and logits depend on them
            p.mul_(8)
        if hot:  # skew routing as training leaves it: experts 0, 1 (group 0) and 5 are hot
            for m in model.moe_layers():
                m.gate.e_score_correction_bias[[0, 1, 5]] = 1.0
    return model


def tokens(rank: int, n: int = B, s: int = S) -> torch.Tensor:
    return torch.randint(0, V, (n, s), generator=torch.Generator().manual_seed(1000 + rank))


def _ep_worker(rank, ep):  # fn(rank, world)
    ref = tiny_model()
    xs = [tokens(r) for r in range(ep)]
    with torch.no_grad():
        want = ref(torch.cat(xs)).logits[rank * B:(rank + 1) * B]
    # 1) plain E/EP sharding, the server's online recorder attached
    model = place_experts(copy.deepcopy(ref), *default_placement(len(ref.moe_layers()), 8))
    rec = ExpertLoadRecorder.for_model(model)
    torch.testing.assert_close(ep_logits(model, xs[rank]), want, rtol=1e-5, atol=1e-5)
    before = rank_loads(model)
    # 2) EPLB from the online statistics of every rank: redundant experts placed, same logits, flatter ranks
    rec.sync()
    with torch.no_grad():
        single = ExpertLoadRecorder.for_model(ref)
        ref(torch.cat(xs))
        single.detach()
    torch.testing.assert_close(rec.load, single.load)  # the ranks' counts add up to single-process routing
    plan = EPConfig(ep=ep, num_redundant=ep).plan(rec.load, ref.config.n_group)
    update_placement(model, ref, *plan)
    assert {len(m.experts) for m in model.moe_layers()} == {(8 + ep) // ep}
    got = ep_logits(model, xs[rank])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    after = rank_loads(model)
    torch.testing.assert_close(before.sum(1), after.sum(1))  # same rows, spread differently
    n_run = len(ref.layers) - ref.config.first_k_dense_replace  # the MTP layer does not run here
    assert (imbalance(after[:n_run]) < imbalance(before[:n_run])).all(), (before, after)
    # a model placed from scratch with the plan serves the same logits
    torch.testing.assert_close(ep_logits(place_experts(copy.deepcopy(ref), *plan), xs[rank]), got)
    # dual micro-batch overlap: same logits as the plain EP forward
    torch.testing.assert_close(ep_logits(model, xs[rank], overlap=True), got, rtol=1e-5, atol=1e-5)
    # latent-cache decoding, one cache per micro-batch, overlapped
    caches = [model.new_cache(B // 2, S + 2) for _ in range(2)]
    halves = xs[rank].chunk(2)
    steps = [run_micro_batches([lambda c=c, h=h: model.forward_step(h, c) for c, h in zip(caches, halves)])]
    nxt = [s[:, -1].argmax(-1, keepdim=True) for s in steps[0]]
    steps.append(run_micro_batches([lambda c=c, t=t: model.forward_step(t, c) for c, t in zip(caches, nxt)]))
    with torch.no_grad():  # the reference runs the same micro-batches (GEMM results depend on the batch shape)
        for c, h, t, s0, s1 in zip([ref.new_cache(B // 2, S + 2) for _ in range(2)], halves, nxt, *steps):
            torch.testing.assert_close(s0, ref.forward_step(h, c), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(s1, ref.forward_step(t, c), rtol=1e-5, atol=1e-5)


    _uneven(rank, ep)


@pytest.mark.parametrize("ep", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_ep_serving_with_replicas_matches_single_process(ep):
    spawn(_ep_worker, ep)


def _uneven(rank, world):
    # ranks with different numbers of sequences and lengths (decode-like single tokens on rank 0)
    ref = tiny_model()
    plan = EPConfig(ep=world, num_redundant=2).plan(torch.arange(1.0, 9).repeat(3, 1), 4)
    model = place_experts(copy.deepcopy(ref), *plan)
    x = tokens(rank, n=2 + rank, s=1 + 4 * rank)
    with torch.no_grad():
        want = ref(x).logits
    torch.testing.assert_close(ep_logits(model, x), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ep_logits(model, x, overlap=True), want, rtol=1e-5, atol=1e-5)
    # a rank whose experts no token selects still runs every collective (its slots get no rows)
    with torch.no_grad():
        for m in ref.moe_layers():
            m.gate.e_score_correction_bias[4:] = -100.0
        want = ref(x).logits
    model = place_experts(copy.deepcopy(ref), *default_placement(3, 8))
    torch.testing.assert_close(ep_logits(model, x, overlap=True), want, rtol=1e-5, atol=1e-5)
    assert rank_loads(model)[:2, world // 2:].sum() == 0


def test_replica_dispatch_is_round_robin():
    class Fake(RedundantExpertMoE):
        def __init__(self, rank, log2phy, logcnt):
            torch.nn.Module.__init__(self)
            self.rank, self.n_experts = rank, logcnt.numel()
            self.log2phy, self.logcnt = log2phy, logcnt

    # expert 0 has 3 replicas (slots 0, 4, 5), expert 1 one (slot 1), expert 2 two (slots 2, 3)
    log2phy = torch.tensor([[0, 4, 5], [1, -1, -1], [2, 3, -1]])
    layer = Fake(1, log2phy, torch.tensor([3, 1, 2]))
    idx = torch.tensor([[0, 2]] * 6)
    phys = layer.physical(idx)
    assert sorted(phys[:, 0].tolist()) == [0, 0, 4, 4, 5, 5] and sorted(phys[:, 1].tolist()) == [2, 2, 2, 3, 3, 3]
    assert phys[0].tolist() == [4, 3]  # rank 1 starts at replica 1


def test_overlap_scheduler_alternates_and_raises():
    trace = []
    sched = MicroBatchOverlap()

    def mb(name):
        for i in range(3):
            trace.append(f"{name}{i}")
            sched.switch()
        return name

    assert sched.run([lambda: mb("a"), lambda: mb("b")]) == ["a", "b"]
    assert trace == ["a0", "b0", "a1", "b1", "a2", "b2"]

    def boom():
        sched.switch()
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        sched.run([boom, lambda: mb("c")])


def test_bad_plan():
    ref = tiny_model()
    with pytest.raises(ValueError, match="MoE layers"):
        place_experts(ref, *default_placement(5, 8))
    with pytest.raises(ValueError, match="micro-batch overlap needs"):
        ep_logits(ref, tokens(0, n=1), overlap=True)
    with pytest.raises(ValueError, match="multiple of num_nodes"):
        EPConfig(ep=3, num_nodes=2)
    with pytest.raises(ValueError, match="num_redundant"):
        EPConfig(ep=2, num_redundant=-1)
