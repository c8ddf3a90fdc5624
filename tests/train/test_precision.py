"""The Precision object (dsv3/train/precision.py, §3.3): names and errors, the autocast running the GEMMs in
the compute dtype, the fp8 conversion (FP8 Linears where the paper puts them, same state dict), a training
run in its precision, and context extension honouring `train.precision` (bf16) in its stages and probes."""

import pickle

import pytest
import torch
from torch import nn

from dsv3 import DeepSeekV3, ModelConfig
from dsv3.fp8 import FP8Linear
from dsv3.train.stream import PackedStream
from dsv3.train.loop import train
from dsv3.train.precision import Precision
from dsv3.train.step import build_model, evaluate
from tests.train.conftest import tiny_cfg


def test_names_and_errors():
    assert Precision.of(None) == Precision.of("fp32") == Precision()
    bf16 = Precision("bf16")
    assert Precision.of(bf16) is bf16 and str(bf16) == "bf16"
    assert pickle.loads(pickle.dumps(Precision("fp8"))) == Precision("fp8")  # travels to ranks / Ray workers
    with pytest.raises(ValueError, match="precision: 'fp16' is not one of fp32, bf16, fp8"):
        Precision("fp16")


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp8"])
def test_autocast_runs_the_gemms_in_the_compute_dtype(name):
    precision = Precision(name)
    lin, x = nn.Linear(16, 8), torch.randn(4, 16)
    with precision.autocast("cpu"):
        y = lin(x)
    assert y.dtype == precision.compute_dtype
    exact = torch.nn.functional.linear(x, lin.weight, lin.bias)
    assert torch.equal(y, exact) == (name == "fp32")  # bf16 GEMMs round, fp32 is exact
    assert torch.allclose(y.float(), exact, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp8"])
def test_prepare_converts_the_linears_for_fp8_only(name):
    torch.manual_seed(0)
    model = DeepSeekV3(ModelConfig.preset("tiny"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert Precision(name).prepare(model) is model
    fp8 = {n for n, m in model.named_modules() if isinstance(m, FP8Linear)}
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if name != "fp8":
        assert not fp8
    else:  # attention and expert projections in FP8; output head and MoE gate in higher precision (§3.3.1)
        assert "layers.0.self_attn.q_a_proj" in fp8 and "layers.2.mlp.experts.0.down_proj" in fp8
        assert "lm_head" in linears - fp8 and not any(n.endswith(".gate") for n in fp8)
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_a_run_trains_in_its_precision(tiny_shards, tmp_path):
    """Step 1's loss of a bf16 run is the bf16 forward of the initial model on step 1's batch."""
    losses = {}
    for name in ("fp32", "bf16"):
        cfg = tiny_cfg(tiny_shards, tmp_path / name, "train.steps=1", f"train.precision={name}")
        model = build_model(cfg, torch.device("cpu"))
        x = PackedStream(tiny_shards, "train", cfg.train.seq_len, seed=cfg.train.seed).rank_batch(0, 4, 0, 1)
        with Precision(name).autocast("cpu"):  # with grad: the balance loss is a training term
            losses[name] = float(model(x, labels=x).loss.detach())
        res = train(cfg, track=False)
        assert res.history[0]["train/loss"] == pytest.approx(losses[name], rel=1e-6, abs=0)
    assert losses["fp32"] != losses["bf16"]
    assert isinstance(build_model(tiny_cfg(tiny_shards, tmp_path, "train.precision=fp8"),
                                  torch.device("cpu")).layers[0].self_attn.q_a_proj, FP8Linear)


def test_extension_honours_bf16(tiny_shards, tmp_path, mlflow_uri):
    from dsv3 import tracking
    from dsv3.train.extend import extend, passkey_probe

    cfg = tiny_cfg(tiny_shards, tmp_path / "run", "train.steps=1", "train.precision=bf16",
                   "train.extend.stages=[{factor: 2, seq_len: 64, steps: 1, batch_size: 2}]",
                   "train.extend.passkey_lengths=[32, 64]", "train.extend.passkey_trials=1")
    base = train(cfg, track=False)
    res = extend(cfg, base.checkpoint)
    stage_run = tracking.run_info(res["stages"][0]["run_id"])
    assert stage_run.data.params["train.precision"] == "bf16"
    # the probes: validation at each length in bf16 (not fp32) on the base model
    _, losses = passkey_probe(cfg, cfg.model, base.model_dir)
    model = DeepSeekV3.from_pretrained(base.model_dir)
    val = PackedStream(tiny_shards, "val", 64, shuffle=False)
    assert losses[64] == evaluate(model, val, 1, 1, "bf16")[0] != evaluate(model, val, 1, 1, "fp32")[0]
    assert res["val_loss_by_length_before"][64] == round(losses[64], 4)
