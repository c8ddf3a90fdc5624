"""benchmarks/v3_scale.py, the paper-scale calculation (§3.1-3.3): its bubble figures meet Table 2 at the
paper's PP=16, and its per-rank accounting conserves the model's own parameter count. The v3 model is not
built here (that takes a minute on the meta device): the accounting is checked on the `small` preset."""

import importlib.util
from pathlib import Path

import pytest

from dsv3.model.config import ModelConfig

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "v3_scale.py"


@pytest.fixture(scope="module")
def v3s():
    spec = importlib.util.spec_from_file_location("v3_scale", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("chunks", [32, 120])  # DualPipe's minimum 2*PP, and the script's default
@pytest.mark.parametrize("u,fb", [(1.0, 3.0), (1.0, 2.5), (0.5, 1.0), (2.0, 4.4)])
def test_simulated_bubbles_meet_table2_at_pp16(v3s, chunks, u, fb):
    """F = B(input) = W = u, F&B between the full backward (2u) and no overlap gain (3u): Table 2's 1F1B
    bubble on every rank, its DualPipe bubble on the worst rank (the others wait less)."""
    rows, an = v3s.bubbles(16, chunks, u, u, u, fb)
    r = {row["kind"]: row for row in rows}
    assert r["1f1b"]["max"] == pytest.approx(an["1f1b"]) and r["1f1b"]["mean"] == pytest.approx(an["1f1b"])
    assert an["1f1b"] == pytest.approx(15 * 3 * u)  # (PP-1)(F+B), B the full backward
    assert r["dualpipe"]["max"] == pytest.approx(an["dualpipe"])
    assert an["dualpipe"] == pytest.approx(7 * (fb + 2 * u - 3 * u))  # (PP/2-1)(F&B+B-3W)
    assert r["dualpipe"]["mean"] <= r["dualpipe"]["max"] < an["zb1p"] < an["1f1b"]


def _routed_expert_params(cfg: ModelConfig) -> int:
    moe_layers = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers))
    return moe_layers * cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size


@pytest.mark.parametrize("pp,ep,dp", [(2, 4, 8), (4, 16, 32), (6, 2, 2)])
def test_per_rank_accounting_conserves_the_model(v3s, pp, ep, dp):
    cfg = ModelConfig.preset("small")
    whole = cfg.num_params(include_mtp=True)  # the shape accounting, MTP included (it trains)
    experts = _routed_expert_params(cfg)
    res = v3s.calculate(cfg, pp, ep, dp)
    assert sum(s["params"] for s in res["table"]) == whole + cfg.vocab_size * cfg.hidden_size  # embed in 2 stages
    dual, one = res["ranks"], res["one_f"]
    # DualPipe: every stage on two ranks; a rank's two stages share the embedding (counted once per rank)
    assert sum(r["total"] for r in dual) == 2 * (whole - experts + experts // ep)
    assert sum(r["expert"] for r in dual) == 2 * experts // ep
    # 1F1B: one stage per rank; the embedding lives on the first and the last (MTP) stage
    assert sum(r["total"] for r in one) == whole - experts + experts // ep + cfg.vocab_size * cfg.hidden_size
    # ZeRO-1: over the dp ranks of one stage position, the master weights add up to the rank's stages once
    # (expert slices: EP ranks x their DP/EP replicas), so over the pipeline to the model twice (DualPipe)
    master = sum(dp * m["fp32 master"] for m in res["mem"])
    assert master == pytest.approx(4 * 2 * whole, rel=1e-12)
    assert all(0 < r["fp8"] < r["total"] for r in dual)  # FP8 GEMMs, not the embedding / head / gate / norms


def test_paper_layout_passes_dsv3_checks(v3s):
    P = v3s.PAPER
    dp = P["gpus"] // P["pp"]
    rc = v3s.layout_config(P["pp"], P["ep"], dp, P["batch"] // dp, P["gpus_per_node"], P["max_nodes"],
                           P["batch"], P["seq_len"])
    assert v3s._check(rc, P["gpus"]) == "accepted"
    assert v3s._check(rc, P["gpus"] // 2).startswith("refused: parallel.dp")  # 1,024 ranks cannot hold it
