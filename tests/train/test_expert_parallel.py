"""Expert-parallel pretraining (§3.2.2): `parallel.dp=2, parallel.ep=2` shards the routed
experts over the 2 ranks and gives the per-step losses, gradient norms and final weights of the plain
dp=2 run (aux_loss_alpha > 0, MTP on; bias updates from global loads); node-limited routing (max_nodes=1
over 2 one-rank nodes) equals the plain run with n_group=2, topk_group=1; fp8 works with EP (looser
tolerance: FP8 tile scales depend on how tokens are batched); each rank holds only its expert slice;
a NaN step rolls back through the EP checkpoint load; its checkpoints are one whole model + AdamW + EMA
state (they load into a plain DeepSeekV3) and resume an ep=2 run bitwise. All runs share one 2-rank gloo job (process start-up dominates on 2 cores)."""

import gc
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsv3.config import RunConfig
from dsv3.model.config import ConfigError
from dsv3.parallel.local import spawn
from dsv3.train.layout import check_layout
from tests.train.conftest import tiny_cfg

COMPARED = ("train/loss", "train/main_loss", "train/mtp_loss_1", "train/balance_loss", "train/grad_norm")


def _cfg(shards, out, *ov):
    return tiny_cfg(shards, out, "parallel.dp=2", "model.aux_loss_alpha=0.01", "train.steps=4",
                    "train.ckpt_every=2", "train.eval_every=2", "train.keep_last=3", *ov)


def _records(run_dir):
    return [r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]


def _slice_report(cfg) -> dict:
    """Build + shard a model as the loop does; what this rank holds (and what is alive in the process)."""
    from dsv3.model.layers import Expert
    from dsv3.parallel.expert import ExpertParallelMoE
    from dsv3.train.expert_step import ExpertStep
    from dsv3.train.step import build_model

    gc.collect()
    model = build_model(cfg, torch.device("cpu"))
    full = sum(p.numel() for p in model.parameters())
    ep = ExpertStep(model, cfg)
    gc.collect()
    layers, mine = model.moe_layers(), {id(m) for m in model.modules()}
    return {"full": full, "local": sum(p.numel() for p in model.parameters()), "whole": ep.n_params,
            "per_expert": sum(p.numel() for p in layers[0].experts[0].parameters()), "n_moe": len(layers),
            "ep_layers": all(isinstance(m, ExpertParallelMoE) for m in layers),
            "ranges": [list(m.local_range) for m in layers], "experts": [len(m.experts) for m in layers],
            "stray_experts": sum(isinstance(o, Expert) and id(o) not in mine for o in gc.get_objects())}


def _worker(rank, world, runs, report, resume_from, resume_to):
    from dsv3.train.loop import train

    for c in runs:
        train(RunConfig.from_dict(c), track=False)
    rep = _slice_report(RunConfig.from_dict(runs[1]))
    Path(report.format(rank=rank)).write_text(json.dumps(rep))
    if rank == 0:  # resume the ep=2 run from its step-2 checkpoint
        shutil.copytree(resume_from, resume_to)
        shutil.rmtree(Path(resume_to) / "checkpoints" / "step_00000004")
    torch.distributed.barrier()
    cfg = RunConfig.from_dict(runs[1])
    # step 2 was re-saved after the rollback (data moved past the bad batch): resume without the NaN
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"out_dir": resume_to, "debug_nan_steps": []})})
    train(cfg, resume=True, track=False)


@pytest.fixture(scope="module")
def runs(tiny_shards, tmp_path_factory):
    d = tmp_path_factory.mktemp("ep")
    node = ("model.n_group=1", "model.topk_group=1", "parallel.max_nodes=1", "train.steps=2")
    bad = ("train.debug_nan_steps=[3]", "train.max_bad_steps=1")  # a NaN at step 3: skip, roll back to step 2
    cfgs = [_cfg(tiny_shards, d / "ref", *bad), _cfg(tiny_shards, d / "ep", "parallel.ep=2", *bad),
            _cfg(tiny_shards, d / "ref_node", "model.n_group=2", "model.topk_group=1", "train.steps=2"),
            _cfg(tiny_shards, d / "ep_node", "parallel.ep=2", *node),
            _cfg(tiny_shards, d / "ref_fp8", "train.precision=fp8", "train.steps=2"),
            _cfg(tiny_shards, d / "ep_fp8", "train.precision=fp8", "train.steps=2", "parallel.ep=2")]
    spawn(_worker, 2, [c.model_dump(mode="json") for c in cfgs], str(d / "slice_{rank}.json"),
          str(d / "ep"), str(d / "resumed"))
    return d


def _assert_same_run(got_dir, ref_dir, steps, rel=1e-5, grad_rel=1e-5, atol=1e-6):
    got, ref = _records(got_dir), _records(ref_dir)
    assert len(got) == len(ref) == steps
    for g, r in zip(got, ref):
        for k in COMPARED:
            tol = grad_rel if k == "train/grad_norm" else rel
            assert g[k] == pytest.approx(r[k], rel=tol, abs=1e-8, nan_ok=True), (g["step"], k, g[k], r[k])
    wg, wr = (load_file(str(d / "final" / "model.safetensors")) for d in (got_dir, ref_dir))
    assert wg.keys() == wr.keys()  # the export is the whole model, all experts
    for k in wr:
        assert torch.allclose(wg[k], wr[k], rtol=1e-4, atol=atol), k


def test_ep_matches_data_parallel(runs):
    _assert_same_run(runs / "ep", runs / "ref", 5)  # 4 steps + the NaN step 3 rolled back (EP load path)
    assert [r["train/rollbacks"] for r in _records(runs / "ep")][-1] == 1
    val = [r["val/loss"] for r in map(json.loads, (runs / "ep" / "metrics.jsonl").read_text().splitlines())
           if "val/loss" in r]
    ref = [r["val/loss"] for r in map(json.loads, (runs / "ref" / "metrics.jsonl").read_text().splitlines())
           if "val/loss" in r]
    assert len(val) == 3 and val == pytest.approx(ref, rel=1e-5)  # steps 2, 2 (after the rollback), 4


def test_node_limited_routing_matches_group_limited(runs):
    _assert_same_run(runs / "ep_node", runs / "ref_node", 2)


def test_fp8_with_ep(runs):
    """FP8 (§3.3) under EP: the weight-gradient GEMM quantizes along the token dimension in 128-row tiles,
    and an expert's tokens are batched across the EP group, so the scales (not the math) differ slightly."""
    # weights: AdamW's first steps move a weight by ~lr·sign(g), so a near-zero gradient can differ by ~2·lr
    _assert_same_run(runs / "ep_fp8", runs / "ref_fp8", 2, rel=1e-4, grad_rel=1e-3, atol=1e-3)


def test_each_rank_holds_its_expert_slice(runs):
    reps = [json.loads((runs / f"slice_{r}.json").read_text()) for r in range(2)]
    E, M = 8, 2
    for rank, rep in enumerate(reps):
        assert rep["ep_layers"] and rep["experts"] == [E // M] * rep["n_moe"]
        assert rep["ranges"] == [[rank * E // M, (rank + 1) * E // M]] * rep["n_moe"]
        assert rep["local"] == rep["full"] - (E - E // M) * rep["per_expert"] * rep["n_moe"]
        assert rep["whole"] == rep["full"]
        assert rep["stray_experts"] == 0  # the other experts are gone from the process, not just hidden


def test_checkpoint_is_one_whole_model_and_resumes(runs, tiny_shards, tmp_path):
    from dsv3.model.transformer import DeepSeekV3
    from dsv3.train import checkpoint as ckpt
    from dsv3.train.ema import CpuEMA
    from dsv3.train.optim import make_optimizer

    cfg = _cfg(tiny_shards, tmp_path)
    c, r = runs / "ep" / "checkpoints" / "step_00000002", runs / "ref" / "checkpoints" / "step_00000002"
    model = DeepSeekV3(cfg.model)
    opt, ema = make_optimizer(model, cfg.train), CpuEMA(model)
    state = ckpt.load(c, model, opt, ema)  # plain model, plain AdamW, plain EMA: strict name checks
    assert state["step"] == 2
    ref = DeepSeekV3.from_pretrained(r / "model").state_dict()
    for k, v in model.state_dict().items():
        assert torch.allclose(v, ref[k], rtol=1e-4, atol=1e-6), k
    o, oref = torch.load(c / "optimizer.pt", weights_only=True), torch.load(r / "optimizer.pt", weights_only=True)
    assert o["param_groups"] == oref["param_groups"] and o["state"].keys() == oref["state"].keys()
    for i in oref["state"]:
        for k in ("exp_avg", "exp_avg_sq"):
            assert torch.allclose(o["state"][i][k], oref["state"][i][k], rtol=1e-4, atol=1e-9), (i, k)
    e, eref = load_file(str(c / "ema.safetensors")), load_file(str(r / "ema.safetensors"))
    assert e.keys() == eref.keys() and all(torch.allclose(e[k], eref[k], rtol=1e-4, atol=1e-6) for k in e)
    a = [x["train/loss"] for x in _records(runs / "ep") if x["train/loss"] == x["train/loss"]]  # without the NaN
    b = [x["train/loss"] for x in _records(runs / "resumed")]
    assert len(a) == 4 and a == b  # resumed at step 2: bitwise


def test_config_errors_name_the_key(tiny_shards, tmp_path):
    from dsv3.train.loop import train

    with pytest.raises(ConfigError, match="parallel.ep: ep=2 does not divide parallel.dp=3"):
        check_layout(_cfg(tiny_shards, tmp_path, "parallel.dp=3", "parallel.ep=2"), 3)
    with pytest.raises(ConfigError, match="model.n_routed_experts"):
        check_layout(_cfg(tiny_shards, tmp_path, "parallel.dp=3", "parallel.ep=3"), 3)
    with pytest.raises(ConfigError, match="parallel.dp: expert parallelism needs dp × pp = 2 × 2 ranks, got 2"):
        check_layout(_cfg(tiny_shards, tmp_path, "parallel.ep=2", "parallel.pp=2"), 2)
    check_layout(_cfg(tiny_shards, tmp_path, "parallel.ep=2", "parallel.pp=2"), 4)  # ep with pp: supported
    with pytest.raises(ConfigError, match="parallel.dp"):
        check_layout(_cfg(tiny_shards, tmp_path, "parallel.ep=2"), 4)
    with pytest.raises(ConfigError, match="first_k_dense_replace"):
        check_layout(_cfg(tiny_shards, tmp_path, "parallel.ep=2", "model.first_k_dense_replace=3",
                          "model.num_nextn_predict_layers=0"), 2)
    with pytest.raises(ConfigError, match="parallel.dp"):
        train(_cfg(tiny_shards, tmp_path, "parallel.ep=2"), track=False)  # one process is not 2 ranks
    from dsv3.train.launcher import run_training

    with pytest.raises(ConfigError, match="parallel.ep: ep=3 does not divide parallel.dp=2"):
        run_training(_cfg(tiny_shards, tmp_path, "parallel.ep=3"), progress=False)  # before Ray starts
    with pytest.raises(ConfigError, match="max_nodes"):
        _cfg(tiny_shards, tmp_path, "parallel.ep=2", "parallel.max_nodes=3")
