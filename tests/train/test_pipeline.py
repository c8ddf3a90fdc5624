"""Pipeline-parallel pretraining (§3.2.1): `parallel.pp=2` runs the same loop with the
model split into stages, and its per-step losses (total = main + λ·MTP + balance, with the config's
aux_loss_alpha; and each component) and final weights match the non-pipelined run within fp32 tolerance.
DualPipe on a local Ray cluster with 2 CPU workers (MLflow: bubble metrics and the Gantt chart);
1F1B and DualPipeV on 2 spawned gloo ranks (faster, same loop); two data-parallel 1F1B pipelines on 4 ranks;
a resumed pipeline run is bitwise equal. Each pipeline rank holds only its stages' parameter bytes, and a
pipeline checkpoint loads strictly into a plain model with the plain run's AdamW state and EMA; a NaN step
rolls a 1F1B run back through the pipeline's checkpoint load exactly as the plain run. Expert parallelism
inside the pipelines (dp=2 × pp=2 × ep=2 on 4 ranks, 1F1B; slow: dp=4 on 8 ranks, DualPipeV, DualPipe)
matches the plain run too, and each rank holds only its stage and expert slice. FP8 training (DualPipeV,
its zero-bubble W ops running the FP8 Wgrad) matches the plain fp8 run within FP8's batching tolerance."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dsv3.config import RunConfig
from dsv3.model.config import ConfigError
from dsv3.parallel.local import spawn
from dsv3.train.loop import train
from dsv3.train.layout import check_layout
from tests.train.conftest import tiny_cfg

STEPS = 3
COMPARED = ("train/loss", "train/main_loss", "train/mtp_loss_1", "train/balance_loss", "train/grad_norm")


def _records(run_dir):
    return [r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r]


def _weights(run_dir):
    return load_file(str(Path(run_dir) / "final" / "model.safetensors"))


def _val(run_dir):
    return [r for r in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines()) if "val/loss" in r]


def _assert_matches(run_dir, ref_dir, val=True, n=STEPS, atol=1e-6):
    """val: also the validation losses (live and EMA weights); the pipeline evaluates through its stages.
    Off when the reference has a different number of data ranks (then the validation windows differ).
    n: the number of step records (a rolled-back step is recorded twice)."""
    got, ref = _records(run_dir), _records(ref_dir)
    assert len(got) == len(ref) == n
    for g, r in zip(got, ref):
        for k in COMPARED:
            assert g[k] == pytest.approx(r[k], rel=1e-5, abs=1e-8, nan_ok=True), (g["step"], k, g[k], r[k])
    if val:
        gv, rv = _val(run_dir), _val(ref_dir)
        assert len(gv) == len(rv) >= 1
        for g, r in zip(gv, rv):
            for k in ("val/loss", "val/ema_loss"):
                assert g[k] == pytest.approx(r[k], rel=1e-5), (g["step"], k, g[k], r[k])
    wg, wr = _weights(run_dir), _weights(ref_dir)
    assert wg.keys() == wr.keys()  # the export is the whole model
    for k in wr:
        assert torch.allclose(wg[k], wr[k], rtol=1e-4, atol=atol), k


def _cfg(shards, out, *ov):
    return tiny_cfg(shards, out, f"train.steps={STEPS}", "train.eval_every=3", "train.ckpt_every=3", *ov)


def test_config_errors(tiny_shards, tmp_path):
    with pytest.raises(ConfigError, match="DualPipe needs an even"):
        _cfg(tiny_shards, tmp_path, "parallel.pp=3", "parallel.schedule=dualpipe")
    with pytest.raises(ConfigError, match="num_chunks: dualpipe needs >= 2\*pp"):
        _cfg(tiny_shards, tmp_path, "parallel.pp=2", "parallel.num_chunks=2")
    cfg = _cfg(tiny_shards, tmp_path, "parallel.pp=2")
    with pytest.raises(ConfigError, match="does not divide"):
        check_layout(cfg, 3)
    with pytest.raises(ConfigError, match="does not divide"):
        train(cfg, track=False)  # one process cannot run a 2-rank pipeline
    with pytest.raises(ConfigError, match="divisible"):  # batch 4 into 6 micro-batches
        check_layout(_cfg(tiny_shards, tmp_path, "parallel.pp=2", "parallel.num_chunks=6"), 2)
    with pytest.raises(ConfigError, match="stages"):  # DualPipeV pp=2: 4 stages, tiny has 3 layers
        check_layout(_cfg(tiny_shards, tmp_path, "parallel.pp=2", "parallel.schedule=dualpipev"), 2)
    with pytest.raises(ConfigError, match="dp × pp"):
        check_layout(_cfg(tiny_shards, tmp_path, "parallel.pp=2", "parallel.dp=2"), 2)
    check_layout(_cfg(tiny_shards, tmp_path, "parallel.pp=2", "parallel.dp=2", "parallel.ep=2"), 4)  # supported
    check_layout(_cfg(tiny_shards, tmp_path, "parallel.pp=2", "train.precision=fp8"), 2)  # supported
    assert isinstance(RunConfig.load("configs/pretrain_tiny.yaml", ["parallel.pp=2"]).parallel.pp, int)


def _worker(rank, world, cfg_dict):
    train(RunConfig.from_dict(cfg_dict), track=False)


# 1F1B also runs 4 steps with a NaN at step 4: one bad step rolls back to the step-2 checkpoint (older than
# step 3's update, so PipelineStep.load must restore weights, AdamW state and EMA), then steps 3-4 again
BAD = ("train.steps=4", "train.debug_nan_steps=[4]", "train.max_bad_steps=1", "train.ckpt_every=2",
       "train.eval_every=2")


@pytest.mark.parametrize("schedule,layers,bad", [("1f1b", 3, BAD), ("dualpipev", 4, ())])
def test_schedule_matches_plain_loop(tiny_shards, tmp_path, schedule, layers, bad):
    ov = (f"model.num_hidden_layers={layers}", *bad)
    train(_cfg(tiny_shards, tmp_path / "ref", *ov), track=False)
    cfg = _cfg(tiny_shards, tmp_path / "pp", *ov, "parallel.pp=2", f"parallel.schedule={schedule}")
    spawn(_worker, 2, cfg.model_dump(mode="json"))
    _assert_matches(tmp_path / "pp", tmp_path / "ref", n=6 if bad else STEPS)
    if bad:
        recs = _records(tmp_path / "pp")
        assert [r["step"] for r in recs] == [1, 2, 3, 4, 3, 4] and recs[-1]["train/rollbacks"] == 1
        assert recs[3]["train/loss"] != recs[3]["train/loss"]  # the NaN step
    _assert_loads_into_plain_model(cfg, tmp_path / "pp", tmp_path / "ref")


def _assert_loads_into_plain_model(cfg, run_dir, ref_dir):
    """The pipeline run's checkpoint (assembled from the ranks' stages) loads strictly into a plain
    DeepSeekV3 + AdamW + EMA, and its AdamW state and EMA equal the plain run's."""
    from dsv3.model.transformer import DeepSeekV3
    from dsv3.train import checkpoint as ckpt
    from dsv3.train.ema import CpuEMA
    from dsv3.train.optim import make_optimizer

    c, r = ckpt.latest(Path(run_dir) / "checkpoints"), ckpt.latest(Path(ref_dir) / "checkpoints")
    assert c.name == r.name
    model = DeepSeekV3(cfg.model)
    opt, ema = make_optimizer(model, cfg.train), CpuEMA(model, cfg.train.ema_decay)
    ckpt.load(c, model, opt, ema)  # strict: every weight of the whole model is in the checkpoint
    got, ref = opt.state_dict(), torch.load(r / "optimizer.pt", weights_only=True)
    n = sum(len(g["params"]) for g in ref["param_groups"])
    assert sorted(got["state"]) == sorted(ref["state"]) == list(range(n))  # every parameter, plain order
    for k, st in ref["state"].items():  # fp32 rounding of the stage-wise grads: compared in norm
        for a in ("exp_avg", "exp_avg_sq"):
            g, want = got["state"][k][a], st[a]
            assert g.shape == want.shape and float((g - want).norm()) <= 1e-4 * float(want.norm()) + 1e-12, (k, a)
    e_ref = load_file(str(r / "ema.safetensors"))
    e_got = ema.state_dict()
    assert e_got.keys() == e_ref.keys()
    for k in e_ref:
        assert torch.allclose(e_got[k], e_ref[k], rtol=1e-4, atol=1e-6), k


def _memory_worker(rank, world, cfgs, out):
    from dsv3.train.step import build_model
    from dsv3.train.pipeline_step import PipelineStep

    res = {}
    for name, cfg_dict in cfgs.items():
        cfg = RunConfig.from_dict(cfg_dict)
        model = build_model(cfg, torch.device("cpu"))
        pipe = PipelineStep(model, cfg)
        freed = [n for n, p in model.named_parameters() if p.untyped_storage().nbytes() == 0]
        res[name] = {"held": pipe.held_bytes, "whole": pipe.whole_bytes, "freed": freed,
                     "counted": sum(p.untyped_storage().nbytes() for p in model.parameters())}
    Path(out, f"rank{rank}.json").write_text(json.dumps(res))


def test_ranks_hold_only_their_stages(tiny_shards, tmp_path):
    """Per-rank parameter bytes after the pipeline is built: exactly the stages the rank runs (the other
    parameters have no storage). tiny, PP=2. 1F1B (3 layers split 2+1): rank 0 = embedding + layers 0-1,
    rank 1 = layer 2 + norm + head + MTP + the embedding MTP reads (so the embedding is on both).
    DualPipeV (4 layers, 4 stages): rank 0 = stages 0 and 3 (embedding, layer 0, layer 3, norm, head, MTP),
    rank 1 = stages 1 and 2 (layers 1-2): the two ranks together hold the model exactly once."""
    from dsv3.model.transformer import DeepSeekV3

    cfgs = {"1f1b": _cfg(tiny_shards, tmp_path, "parallel.pp=2", "parallel.schedule=1f1b"),
            "dualpipev": _cfg(tiny_shards, tmp_path, "parallel.pp=2", "parallel.schedule=dualpipev",
                              "model.num_hidden_layers=4")}
    spawn(_memory_worker, 2, {k: c.model_dump(mode="json") for k, c in cfgs.items()}, str(tmp_path))
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]

    def nbytes(model, *prefixes):
        return sum(p.numel() * 4 for n, p in model.named_parameters() if n.startswith(prefixes))

    m = DeepSeekV3(cfgs["1f1b"].model)
    whole = nbytes(m, "")
    emb, tail = nbytes(m, "embed_tokens."), nbytes(m, "norm.", "lm_head.", "mtp.")
    want = [emb + nbytes(m, "layers.0.", "layers.1."), nbytes(m, "layers.2.") + tail + emb]
    for r in range(2):
        g = got[r]["1f1b"]
        assert g["whole"] == whole and g["held"] == g["counted"] == want[r], (r, g["held"], want[r])
    names = [n for n, _ in m.named_parameters()]
    tail_names = {n for n in names if n.startswith(("layers.2.", "norm.", "lm_head.", "mtp."))}
    assert set(got[0]["1f1b"]["freed"]) == tail_names
    assert set(got[1]["1f1b"]["freed"]) == {n for n in names if n.startswith(("layers.0.", "layers.1."))}
    assert got[0]["1f1b"]["held"] + got[1]["1f1b"]["held"] == whole + emb  # only the embedding is twice

    m = DeepSeekV3(cfgs["dualpipev"].model)
    whole = nbytes(m, "")
    want = [nbytes(m, "embed_tokens.", "layers.0.", "layers.3.", "norm.", "lm_head.", "mtp."),
            nbytes(m, "layers.1.", "layers.2.")]
    for r in range(2):
        g = got[r]["dualpipev"]
        assert g["whole"] == whole and g["held"] == g["counted"] == want[r], (r, g["held"], want[r])
    assert want[0] + want[1] == whole and max(want) < whole


def test_data_parallel_pipelines_match_plain_loop(tiny_shards, tmp_path):
    """dp=2 × pp=2 (two 1F1B pipelines on 4 gloo ranks, each reading its half of the global batch)
    gives the single-process run's losses and weights."""
    train(_cfg(tiny_shards, tmp_path / "ref"), track=False)
    cfg = _cfg(tiny_shards, tmp_path / "pp", "parallel.pp=2", "parallel.dp=2", "parallel.schedule=1f1b",
               "parallel.num_chunks=2")
    spawn(_worker, 4, cfg.model_dump(mode="json"))
    _assert_matches(tmp_path / "pp", tmp_path / "ref", val=False)  # dp=2 evaluates other windows than dp=1


@pytest.mark.slow
def test_dualpipe_on_ray_two_workers(tiny_shards, tmp_path, mlflow_uri):
    import ray
    from mlflow.tracking import MlflowClient

    from dsv3 import tracking
    from dsv3.cluster import ray_init
    from dsv3.train.launcher import run_training

    train(_cfg(tiny_shards, tmp_path / "ref"), track=False)
    ray.shutdown()
    ray_init(num_cpus=3)
    try:
        res = run_training(_cfg(tiny_shards, tmp_path / "pp", "parallel.pp=2", "parallel.schedule=dualpipe",
                                "train.plots=true"), progress=False)
    finally:
        ray.shutdown()
    _assert_matches(tmp_path / "pp", tmp_path / "ref")
    opt = torch.load(Path(res["checkpoint"]) / "optimizer.pt", weights_only=True)
    n_params = sum(len(g["params"]) for g in opt["param_groups"])
    assert len(opt["state"]) == n_params  # AdamW state assembled from both pipeline ranks
    m = tracking.run_info(res["run_id"]).data.metrics
    for k in ("pipeline/bubble_fraction", "pipeline/bubble_fraction/rank_0", "pipeline/bubble_fraction/rank_1",
              "pipeline/analytic_bubble_s/dualpipe", "pipeline/analytic_bubble_s/1f1b",
              "pipeline/analytic_bubble_fraction"):
        assert k in m, k
    assert 0.0 <= m["pipeline/bubble_fraction/rank_1"] < 1.0
    assert len(tracking.metric_history(res["run_id"], "pipeline/bubble_fraction")) == STEPS
    arts = {a.path for a in MlflowClient(tracking.tracking_uri()).list_artifacts(res["run_id"], "plots")}
    assert "plots/pipeline_gantt.png" in arts


def _resume_worker(rank, world, cfg_dict, resume):
    train(RunConfig.from_dict(cfg_dict), resume=resume, track=False)


def test_pipeline_resume_is_bitwise(tiny_shards, tmp_path):
    """A checkpoint of a pipeline run (whole model + AdamW state assembled from the stage owners)
    resumes to the same losses, bitwise."""
    import shutil

    ov = ("parallel.pp=2", "train.steps=4", "train.ckpt_every=2", "train.eval_every=4", "train.keep_last=3")
    spawn(_resume_worker, 2, _cfg(tiny_shards, tmp_path / "a", *ov).model_dump(mode="json"), False)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "step_00000004")
    spawn(_resume_worker, 2, _cfg(tiny_shards, tmp_path / "b", *ov).model_dump(mode="json"), True)
    a, b = _records(tmp_path / "a"), _records(tmp_path / "b")
    assert len(a) == 4 and [r["train/loss"] for r in a] == [r["train/loss"] for r in b]


def _ep_worker(rank, world, cfg_dict, out):
    """Train, then report what this rank holds after the loop's build (experts sharded, stages freed)."""
    from dsv3.train.expert_step import ExpertStep
    from dsv3.train.step import build_model
    from dsv3.train.pipeline_step import PipelineStep

    cfg = RunConfig.from_dict(cfg_dict)
    train(cfg, track=False)
    model = build_model(cfg, torch.device("cpu"))
    ep = ExpertStep(model, cfg)
    pipe = PipelineStep(model, cfg, ep=ep)
    held = {ep.whole_name(n): list(p.shape) for n, p in model.named_parameters() if p.untyped_storage().nbytes()}
    Path(out, f"ep_rank{rank}.json").write_text(json.dumps(
        {"held": held, "bytes": sum(p.untyped_storage().nbytes() for p in model.parameters()),
         "n_params": pipe.n_params, "ranges": [list(m.local_range) for m in model.moe_layers()]}))


_TAIL = ("norm.", "lm_head.", "mtp.", "embed_tokens.")  # the last stage (MTP reads the embedding)
# schedule, layers, dp, batch, num_chunks, parameter-name prefixes held per stage position, weight atol.
# atol 1e-5 with 4 chunks of 1 row: one embedding element (token 341) with a near-zero gradient, where
# AdamW's m/sqrt(v) amplifies rounding, ends ~1e-6 off the plain run already without ep (DualPipeV dp=2 ep=1)
EP_RUNS = [
    ("1f1b", 3, 2, 4, 2, [("embed_tokens.", "layers.0.", "layers.1."), ("layers.2.", *_TAIL)], 1e-6),
    pytest.param("1f1b", 3, 4, 8, 2, [("embed_tokens.", "layers.0.", "layers.1."), ("layers.2.", *_TAIL)], 1e-6,
                 marks=pytest.mark.slow),
    pytest.param("dualpipev", 4, 2, 8, 4, [("embed_tokens.", "layers.0.", "layers.3.", *_TAIL),
                                           ("layers.1.", "layers.2.")], 1e-5, marks=pytest.mark.slow),
    pytest.param("dualpipe", 3, 2, 8, 4, [("",), ("",)], 1e-5, marks=pytest.mark.slow),  # pp=2: ranks hold both stages
]


@pytest.mark.parametrize("schedule,layers,dp,batch,chunks,stage,atol", EP_RUNS)
def test_expert_parallel_pipelines_match_plain_loop(tiny_shards, tmp_path, schedule, layers, dp, batch, chunks,
                                                    stage, atol):
    """dp=2 × pp=2 × ep=2 on 4 gloo ranks (two 1F1B pipelines; at each stage position the two pipelines'
    ranks form the EP group, each holding 4 of the 8 routed experts of its stage's MoE layers) gives the
    single-process run's losses, grad norms and weights, through a NaN step rolled back to the step-2
    checkpoint (PipelineStep.load with expert slices); validation through the stages equals the plain model
    on the same windows; the checkpoint loads strictly into a plain DeepSeekV3 with the plain AdamW state and
    EMA; each rank holds exactly its stage's parameters, of the MoE experts only its slice.
    slow: dp=4 (8 ranks): two EP groups per stage position, so expert grads are also averaged over the
    replica group (pipelines d and d+2 hold the same slice); DualPipeV and DualPipe (both directions,
    two stages per rank) with dp=2 × pp=2 × ep=2."""
    import re

    from dsv3.model.transformer import DeepSeekV3
    from dsv3.train import checkpoint as ckpt
    from dsv3.train.stream import PackedStream

    ov = ("model.aux_loss_alpha=0.01", f"train.batch_size={batch}", f"model.num_hidden_layers={layers}", *BAD)
    train(_cfg(tiny_shards, tmp_path / "ref", *ov), track=False)
    cfg = _cfg(tiny_shards, tmp_path / "pp", *ov, "parallel.pp=2", f"parallel.dp={dp}", "parallel.ep=2",
               f"parallel.schedule={schedule}", f"parallel.num_chunks={chunks}")
    spawn(_ep_worker, 2 * dp, cfg.model_dump(mode="json"), str(tmp_path))
    _assert_matches(tmp_path / "pp", tmp_path / "ref", val=False, n=6, atol=atol)
    recs = _records(tmp_path / "pp")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 3, 4] and recs[-1]["train/rollbacks"] == 1
    _assert_loads_into_plain_model(cfg, tmp_path / "pp", tmp_path / "ref")

    # validation (live and EMA weights): the plain model of the reference run on the dp=2 windows
    val = PackedStream(tiny_shards, "val", cfg.train.seq_len, shuffle=False)
    got = _val(tmp_path / "pp")
    assert [r["step"] for r in got] == [2, 2, 4]  # step 2, again after the rollback, step 4
    c = ckpt.latest(tmp_path / "ref" / "checkpoints")
    model = DeepSeekV3.from_pretrained(c / "model").eval()
    ema = load_file(str(c / "ema.safetensors"))
    for key, weights in (("val/loss", None), ("val/ema_loss", ema)):
        if weights is not None:
            model.load_state_dict(weights, strict=False)
        tot = n = 0.0
        with torch.no_grad():
            for r in range(dp):
                for x in val.eval_batches(cfg.train.eval_batches, batch // dp, r, dp):
                    k = x.shape[0] * (x.shape[1] - 1)
                    tot += float(model(x, labels=x, return_mtp=False).main_loss) * k
                    n += k
        assert got[-1][key] == pytest.approx(tot / n, rel=1e-5), key

    # what each rank holds: rank = pipeline d · 2 + stage position i; EP slice j = d % 2 (experts 4j .. 4j+3)
    plain = DeepSeekV3(cfg.model)
    shapes = {n: list(p.shape) for n, p in plain.named_parameters()}
    seen = set()
    for rank in range(2 * dp):
        rep = json.loads((tmp_path / f"ep_rank{rank}.json").read_text())
        d, i = divmod(rank, 2)
        d %= 2
        def mine(n):
            m = re.search(r"\.experts\.(\d+)\.", n)
            return n.startswith(stage[i]) and (m is None or 4 * d <= int(m.group(1)) < 4 * d + 4)

        want = {n: s for n, s in shapes.items() if mine(n)}
        assert rep["held"] == want, (rank, sorted(set(rep["held"]) ^ set(want))[:6])
        assert rep["bytes"] == sum(4 * torch.Size(s).numel() for s in want.values())
        assert rep["n_params"] == sum(p.numel() for p in plain.parameters())
        assert rep["ranges"] == [[4 * d, 4 * d + 4]] * len(plain.moe_layers())
        seen |= set(rep["held"])
    assert seen == set(shapes)  # the four ranks together hold the whole model


def test_fp8_dualpipev_matches_plain_fp8_loop(tiny_shards, tmp_path):
    """train.precision=fp8 with DualPipeV (pp=2, 4 stages, 4 micro-batches; its zero-bubble B ops queue each
    FP8Linear's FP8 Wgrad for the W ops) against the single-process fp8 run. Not exact: the FP8 Wgrad
    quantizes dy and x in 128-token tiles, and a micro-batch has 32 tokens where the plain run's batch has
    128 in one tile, so the Wgrad scales (not the math) differ. Fprop (per-token tiles) does not depend on
    the batching, so step 1's losses agree to the fp32 rounding of the chunk mean (measured <= 9e-8
    relative), and its grad norm to 4e-6 (an fp32 backward is 1e-3 off the fp8 one: the FP8 GEMMs are in
    use). Later steps carry the tiny update differences: measured, relative, losses <= 2e-5, the balance
    loss 1.2e-4, grad norms 3e-4, validation 2e-5; weights: AdamW's first steps move a weight by
    ~lr·sign(g), so a near-zero gradient can differ by ~2·lr (measured 8.6e-4), and a routing bias by one
    flipped ±γ update (γ = 1e-3, sign-based: 1e-3 measured)."""
    ov = ("model.num_hidden_layers=4", "train.precision=fp8")
    train(_cfg(tiny_shards, tmp_path / "ref", *ov), track=False)
    cfg = _cfg(tiny_shards, tmp_path / "pp", *ov, "parallel.pp=2", "parallel.schedule=dualpipev")
    spawn(_worker, 2, cfg.model_dump(mode="json"))
    got, ref = _records(tmp_path / "pp"), _records(tmp_path / "ref")
    assert len(got) == len(ref) == STEPS
    for k in COMPARED:
        tol = 2e-4 if k == "train/grad_norm" else 1e-6
        assert got[0][k] == pytest.approx(ref[0][k], rel=tol), (k, got[0][k], ref[0][k])
    for g, r in zip(got[1:], ref[1:]):
        for k in COMPARED:
            tol = 1e-3 if k in ("train/grad_norm", "train/balance_loss") else 1e-4
            assert g[k] == pytest.approx(r[k], rel=tol), (g["step"], k, g[k], r[k])
    gv, rv = _val(tmp_path / "pp"), _val(tmp_path / "ref")
    assert len(gv) == len(rv) >= 1
    for g, r in zip(gv, rv):
        for k in ("val/loss", "val/ema_loss"):
            assert g[k] == pytest.approx(r[k], rel=1e-4), (g["step"], k, g[k], r[k])
    wg, wr = _weights(tmp_path / "pp"), _weights(tmp_path / "ref")
    assert wg.keys() == wr.keys()
    for k in wr:
        atol = 2.5e-3 if k.endswith("e_score_correction_bias") else 1e-3
        assert torch.allclose(wg[k], wr[k], rtol=1e-4, atol=atol), (k, float((wg[k] - wr[k]).abs().max()))
