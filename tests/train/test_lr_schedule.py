"""Schedules (§4.2) and AdamW parameter groups."""

import pytest
import torch

from dsv3.model.config import ModelConfig
from dsv3.train.config import TrainConfig
from dsv3.train.optim import make_optimizer, param_groups
from dsv3.train.lr_schedule import Schedules, lr_at, make_plan


def test_lr_shape_follows_paper():
    kw = dict(peak=2.2e-4, warmup=0.05, constant_until=0.676, decay_until=0.966, decay_ratio=0.1,
              tail_switch=0.989, tail_ratio=0.033)
    assert lr_at(0.025, **kw) == pytest.approx(1.1e-4)  # linear warmup
    assert lr_at(0.3, **kw) == 2.2e-4  # constant
    mid = lr_at((0.676 + 0.966) / 2, **kw)
    assert mid == pytest.approx((2.2e-4 + 2.2e-5) / 2)  # cosine midpoint
    assert lr_at(0.966, **kw) == pytest.approx(2.2e-5)
    assert lr_at(0.98, **kw) == pytest.approx(2.2e-5)
    assert lr_at(1.0, **kw) == pytest.approx(7.26e-6)
    xs = [lr_at(f / 100, **kw) for f in range(68, 97)]
    assert all(a >= b for a, b in zip(xs, xs[1:]))


def test_batch_ramp_and_token_fractions():
    p = make_plan(steps=20, batch_size=16, seq_len=8, ramp_start=4, ramp_frac=0.3, granule=2)
    assert p.batches[0] == 4 and p.batches[-1] == 16
    assert all(b % 2 == 0 for b in p.batches)
    assert all(a <= b for a, b in zip(p.batches, p.batches[1:]))
    assert p.total_tokens == sum(p.batches) * 8 and p.frac(19) == 1.0
    with pytest.raises(ValueError):
        make_plan(4, 5, 8, granule=2)


def test_mtp_and_bias_switch():
    t = TrainConfig(steps=100, batch_size=4, warmup_frac=0.0)
    s = Schedules(t, ModelConfig.preset("tiny"), world=1)
    assert s.mtp_weight(0) == 0.3 and s.mtp_weight(99) == 0.1
    assert s.bias_gamma(0) == 1e-3 and s.bias_gamma(99) == 0.0
    assert s.micro_batches(0) == (4, 1)
    s2 = Schedules(TrainConfig(steps=10, batch_size=8, micro_batch_size=2), ModelConfig.preset("tiny"), world=2)
    assert s2.micro_batches(0) == (2, 2)


def test_param_groups_no_decay_on_norms_biases_1d():
    from dsv3.model.transformer import DeepSeekV3

    m = DeepSeekV3(ModelConfig.preset("tiny"))
    m.extra = torch.nn.Linear(4, 4, bias=True)
    names = {id(p): n for n, p in m.named_parameters()}
    decay, no = param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no["weight_decay"] == 0.0
    nd = {names[id(p)] for p in no["params"]}
    assert any("norm" in n for n in nd) and "extra.bias" in nd
    assert all(p.ndim >= 2 for p in decay["params"])
    assert all("norm" not in names[id(p)] for p in decay["params"])
    opt = make_optimizer(m, TrainConfig())
    assert opt.defaults["betas"] == (0.9, 0.95)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(m.parameters()))
