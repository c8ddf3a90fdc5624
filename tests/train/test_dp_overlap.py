"""Overlapped data parallelism (dsv3/parallel/grad_buckets.py) and ZeRO-1 (dsv3/parallel/zero.py) give the
flat path's numbers: over several steps with gradient accumulation, on a MoE with many experts (some get no
token on a rank: their buckets still reduce zeros, in the same order on every rank), the loss parts, every
gradient, the grad norm and the weights equal the flat all-reduce's bitwise on 2 gloo ranks (a sum of two
is commutative) and to float rounding on 3 (gloo's ring sums an element in an order set by its offset in
the buffer); ZeRO-1 equals the unsharded optimizer bitwise in both. End to end through `train()`: metrics,
checkpoint weights, optimizer.pt and EMA are the flat run's; resume works across zero1 on/off."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsv3.config import RunConfig
from dsv3.model.config import ConfigError
from dsv3.parallel.local import spawn
from dsv3.train.layout import build_step
from dsv3.train.optim import make_optimizer
from dsv3.train.stream import PackedStream
from tests.train.conftest import tiny_cfg

STEPS = 3
VARIANTS = {"flat": ("parallel.bucket_mb=0",), "buckets": ("parallel.bucket_mb=0.02",),
            "zero1": ("parallel.bucket_mb=0.02", "parallel.zero1=true")}
COMPARED = ("train/loss", "train/main_loss", "train/mtp_loss_1", "train/balance_loss", "train/grad_norm")


def _cfg(shards, out, world, *ov) -> RunConfig:
    # 32 experts, one 32-token row per micro-batch: every step leaves experts without a token on a rank
    return tiny_cfg(shards, out, f"parallel.dp={world}", "model.n_routed_experts=32", "model.aux_loss_alpha=0.01",
                    f"train.batch_size={2 * world}", "train.micro_batch_size=1", *ov)


def _steps(cfg, shards, rank, world) -> dict:
    """STEPS optimizer steps as the loop runs them (2 micro-batches each); what every step produced."""
    step = build_step(cfg, torch.device("cpu"))
    opt = make_optimizer(step.model, cfg.train, zero1=cfg.parallel.zero1)
    stream = PackedStream(shards, "train", cfg.train.seq_len, seed=0)
    rec = {"sums": [], "grads": [], "norms": [], "stats": []}
    batch = cfg.train.batch_size
    for k in range(STEPS):
        x = stream.rank_batch(k * batch, batch, rank, world)
        rec["sums"].append(step.sync_grads(step.forward_backward(x, 1, 0.3)))
        rec["grads"].append(torch.cat([p.grad.reshape(-1) for p in step.params]))
        rec["norms"].append(step.clip_grad_norm(1.0))
        rec["stats"].append(step.grad_buckets().stats() if step.grad_buckets() else {})
        opt.step()
        opt.zero_grad(set_to_none=True)
    rec["weights"] = torch.cat([p.detach().reshape(-1) for p in step.params])
    if cfg.parallel.zero1:
        rec["shard_numel"] = opt.shard_numel
        rec["state_numel"] = sum(v.numel() for st in opt.inner.state.values() for v in st.values()
                                 if torch.is_tensor(v) and v.ndim)
    return rec


def _worker(rank, world, shards, out, loop_runs):
    from dsv3.train.loop import train

    for name, ov in VARIANTS.items():
        rec = _steps(_cfg(shards, Path(out) / name, world, *ov), shards, rank, world)
        torch.save(rec, Path(out) / f"{name}_r{rank}.pt")
    if not loop_runs:
        return
    for name, c in loop_runs.items():
        train(RunConfig.from_dict(c), track=False)
    # resume across layouts: the zero1 run's step-2 checkpoint without zero1 (flat), the flat run's with zero1
    for src, dst, ov in (("loop_zero1", "res_flat", "loop_flat"), ("loop_flat", "res_zero1", "loop_zero1")):
        if rank == 0:
            shutil.copytree(Path(out) / src, Path(out) / dst)
            shutil.rmtree(Path(out) / dst / "checkpoints" / "step_00000004")
        torch.distributed.barrier()
        cfg = RunConfig.from_dict(loop_runs[ov])
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"out_dir": str(Path(out) / dst)})})
        train(cfg, resume=True, track=False)


def _load(d, world):
    return {name: [torch.load(Path(d) / f"{name}_r{r}.pt", weights_only=False) for r in range(world)]
            for name in VARIANTS}


@pytest.fixture(scope="module")
def dp2(tiny_shards, tmp_path_factory):
    d = tmp_path_factory.mktemp("dp2")
    loop = {name: _cfg(tiny_shards, d / name, 2, *ov, "train.steps=4", "train.ckpt_every=2", "train.eval_every=2",
                       "train.keep_last=3").model_dump(mode="json")
            for name, ov in (("loop_flat", VARIANTS["flat"]), ("loop_zero1", VARIANTS["zero1"]))}
    spawn(_worker, 2, tiny_shards, str(d), loop)
    return d, _load(d, 2)


@pytest.fixture(scope="module")
def dp3(tiny_shards, tmp_path_factory):
    d = tmp_path_factory.mktemp("dp3")
    spawn(_worker, 3, tiny_shards, str(d), {})
    return _load(d, 3)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_buckets_overlap_and_reduce_unused_experts(dp2, dp3):
    for recs in (dp2[1], dp3):
        for name in ("buckets", "zero1"):
            for rank_rec in recs[name]:
                for st in rank_rec["stats"]:
                    assert st["buckets"] > 10 and st["launched_in_backward"] == st["buckets"], st
                    assert st["marked_at_finish"] == 0
                # experts without a token on this rank in some step: reduced as zeros, found before backward
                assert max(st["unused"] for st in rank_rec["stats"]) > 0
        assert all(st == {} for st in recs["flat"][0]["stats"])


def test_dp2_bitwise_equal_to_the_flat_all_reduce(dp2):
    recs = dp2[1]
    flat = recs["flat"][0]
    for name in ("buckets", "zero1"):
        for rank, rec in enumerate(recs[name]):
            for k in range(STEPS):
                assert torch.equal(rec["sums"][k], flat["sums"][k]), (name, rank, k)
                assert torch.equal(rec["grads"][k], flat["grads"][k]), (name, rank, k)
                assert rec["norms"][k] == flat["norms"][k]
            assert torch.equal(rec["weights"], flat["weights"]), (name, rank)
    # ZeRO-1: each rank keeps the AdamW moments of its shard only, and the shards cover the model once
    z = recs["zero1"]
    n = flat["weights"].numel()
    assert sum(z[0]["shard_numel"]) == n and max(z[0]["shard_numel"]) < 0.75 * n
    assert [r["state_numel"] for r in z] == [2 * s for s in z[0]["shard_numel"]]


def test_dp3_equal_to_float_rounding_and_zero1_bitwise(dp3):
    flat, buckets, zero1 = dp3["flat"][0], dp3["buckets"][0], dp3["zero1"]
    for k in range(STEPS):
        assert buckets["sums"][k].tolist() == pytest.approx(flat["sums"][k].tolist(), rel=1e-6)
        assert _rel(buckets["grads"][k], flat["grads"][k]) < 1e-6
        assert buckets["norms"][k] == pytest.approx(flat["norms"][k], rel=1e-6)
    assert _rel(buckets["weights"], flat["weights"]) < 1e-6
    assert (buckets["weights"] - flat["weights"]).abs().max() < 1e-6
    for rank, rec in enumerate(zero1):  # the same reductions, a sharded optimizer: bitwise, on every rank
        for k in range(STEPS):
            assert torch.equal(rec["grads"][k], buckets["grads"][k]) and torch.equal(rec["sums"][k], buckets["sums"][k])
        assert torch.equal(rec["weights"], buckets["weights"]), rank


def _metrics(run_dir):
    rows = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "train/loss" in r}


def test_train_end_to_end_checkpoints_and_resume_across_layouts(dp2):
    d = dp2[0]
    flat, zero1 = _metrics(d / "loop_flat"), _metrics(d / "loop_zero1")
    assert sorted(flat) == sorted(zero1) == [1, 2, 3, 4]
    for s in flat:
        assert [zero1[s][k] for k in COMPARED] == [flat[s][k] for k in COMPARED], s
    assert zero1[4]["perf/grad_buckets_in_backward"] == zero1[4]["perf/grad_buckets"] > 10
    assert "perf/grad_buckets" not in flat[4]
    a, b = d / "loop_flat" / "checkpoints" / "step_00000004", d / "loop_zero1" / "checkpoints" / "step_00000004"
    wa, wb = load_file(a / "model" / "model.safetensors"), load_file(b / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ea, eb = load_file(a / "ema.safetensors"), load_file(b / "ema.safetensors")
    assert all(torch.equal(ea[k], eb[k]) for k in ea)
    oa, ob = (torch.load(p / "optimizer.pt", weights_only=True) for p in (a, b))
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i, st in oa["state"].items():
        assert st.keys() == ob["state"][i].keys() and all(torch.equal(v, ob["state"][i][k]) for k, v in st.items())
    for dst in ("res_flat", "res_zero1"):
        got = _metrics(d / dst)
        assert sorted(got) == [1, 2, 3, 4]  # steps 3 and 4 rerun after resuming from step 2
        for s in got:
            assert [got[s][k] for k in COMPARED] == [flat[s][k] for k in COMPARED], (dst, s)


def test_config_errors(tiny_shards, tmp_path):
    with pytest.raises((ConfigError, ValueError), match="zero1"):
        tiny_cfg(tiny_shards, tmp_path, "parallel.dp=2", "parallel.ep=2", "parallel.zero1=true")
    with pytest.raises((ConfigError, ValueError), match="bucket_mb"):
        tiny_cfg(tiny_shards, tmp_path, "parallel.bucket_mb=-1")
