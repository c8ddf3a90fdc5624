"""Atomic checkpoints: round trip, checksums, corrupt-latest fallback, keep-last-K, EMA."""

import json
import threading

import pytest
import torch

from dsv3.model.config import ModelConfig
from dsv3.model.transformer import DeepSeekV3
from dsv3.train import checkpoint as ckpt
from dsv3.train.ema import CpuEMA
from dsv3.train.optim import make_optimizer
from dsv3.train.config import TrainConfig


def _step(m, opt):
    x = torch.randint(0, 512, (2, 16))
    m(x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()


def test_roundtrip_corrupt_fallback_and_rotation(tmp_path):
    torch.manual_seed(0)
    m = DeepSeekV3(ModelConfig.preset("tiny"))
    opt = make_optimizer(m, TrainConfig())
    ema = CpuEMA(m, 0.9)
    root = tmp_path / "ck"
    for s in (1, 2, 3):
        _step(m, opt)
        ema.update(m)
        m.moe_layers()[0].gate.e_score_correction_bias.fill_(0.01 * s)
        ckpt.save(root, s, m, opt, {"data_pos": 10 * s}, ema=ema, keep_last=2)
    (root / ".tmp-step_00000004-1").mkdir()  # a save killed mid-write
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000003", "step_00000002"]
    assert ckpt.latest(root).name == "step_00000003"
    # weights_only loadable optimizer state, safetensors elsewhere
    torch.load(root / "step_00000003" / "optimizer.pt", weights_only=True)
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    m2 = DeepSeekV3(ModelConfig.preset("tiny"))
    opt2 = make_optimizer(m2, TrainConfig())
    ema2 = CpuEMA(m2, 0.9)
    st = ckpt.load(root / "step_00000003", m2, opt2, ema2)
    assert st["data_pos"] == 30 and st["step"] == 3
    for k, v in m2.state_dict().items():
        assert torch.equal(v, ref[k]), k
    assert m2.moe_layers()[0].gate.e_score_correction_bias[0].item() == pytest.approx(0.03)
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), ema2.state_dict().values()))
    assert json.loads((root / "step_00000003" / "model" / "config.json").read_text())["model_type"] == "deepseek_v3"
    # corrupt the latest: truncate its weights -> warning, previous used
    w = next((root / "step_00000003" / "model").glob("*.safetensors"))
    w.write_bytes(w.read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert ckpt.latest(root).name == "step_00000002"


def test_ema_runs_off_thread_and_matches_formula():
    torch.manual_seed(0)
    m = torch.nn.Linear(4, 4)
    ema = CpuEMA(m, decay=0.5)
    w0 = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.add_(1.0)
    ema.update(m)
    assert ema._thread is None or isinstance(ema._thread, threading.Thread)
    sd = ema.state_dict()
    assert torch.allclose(sd["weight"], 0.5 * w0 + 0.5 * (w0 + 1))
    with ema.swap_into(m):
        assert torch.allclose(m.weight, sd["weight"])
    assert torch.allclose(m.weight, w0 + 1)
