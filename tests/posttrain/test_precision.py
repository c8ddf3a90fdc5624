"""Post-training honours a precision (dsv3.train.precision, §3.3): SFT, the reward model, GRPO and token-level
distillation convert the trained model (fp8: FP8 Linears) and run their forwards in its autocast, so their
losses are the ones of that precision (bf16 differs from fp32); fp32 stays the default."""

import math

import pytest
import torch

from dsv3.fp8 import FP8Linear
from dsv3.posttrain.config import DistillConfig, GRPOConfig, RewardConfig, SFTConfig
from dsv3.posttrain.grpo import arithmetic_task, train_grpo
from dsv3.posttrain.rewards import (MathReward, ModelReward, RewardModel, pairwise_accuracy, preference_pairs,
                                    train_reward_model)
from dsv3.posttrain.sft import encode_records, make_batches, sft_val_loss, train_sft
from dsv3.train.precision import Precision

from .conftest import tiny_model


def _val(tok, recs):
    return make_batches(encode_records(tok, recs, 64), 8, tok.pad_token_id, shuffle=False)


def _fp8_linears(model) -> int:
    return sum(isinstance(m, FP8Linear) for m in model.modules())


@pytest.mark.parametrize("name", ["bf16", "fp8"])
def test_sft_trains_in_the_precision(tok, name):
    recs = arithmetic_task(40, seed=2, max_operand=4)
    cfg = SFTConfig(max_steps=2, epochs=1, batch_size=8, seq_len=64, warmup_steps=0)
    before = {p: sft_val_loss(Precision(p).prepare(tiny_model(tok)), _val(tok, recs[32:]), p) for p in ("fp32", name)}
    assert before["fp32"] != before[name]
    model = tiny_model(tok)
    res = train_sft(model, tok, recs[:32], recs[32:], cfg, log=lambda *a: None, precision=name)
    assert res["val/loss_before"] == before[name] and math.isfinite(res["val/loss"]) and res["steps"] == 2
    assert (_fp8_linears(model) > 0) == (name == "fp8")
    default = train_sft(tiny_model(tok), tok, recs[:32], recs[32:], cfg, log=lambda *a: None)
    assert default["val/loss_before"] == before["fp32"]


def test_reward_model_scores_in_the_precision(tok):
    pairs = preference_pairs(arithmetic_task(40, seed=0, max_operand=4), seed=0)
    rm = RewardModel(tiny_model(tok, seed=1))
    res = train_reward_model(rm, tok, pairs, RewardConfig(rm_epochs=1, rm_lr=1e-3, rm_val_fraction=0.25),
                             precision="fp8")
    assert _fp8_linears(rm.backbone) > 0 and not isinstance(rm.head, FP8Linear) and math.isfinite(res["train/loss"])
    val = pairs[: res["n_val"]]
    assert pairwise_accuracy(rm, tok, val, precision="fp8") == res["val/pair_acc"]
    probs = arithmetic_task(4, seed=9)
    resp = [p["response"] for p in probs]
    scores = {p: ModelReward(rm, tok, precision=p)(probs, resp) for p in ("fp32", "bf16")}
    assert scores["bf16"] != scores["fp32"] and scores["bf16"] == pytest.approx(scores["fp32"], abs=0.05)


def test_grpo_and_distillation_convert_and_autocast(tok):
    policy = tiny_model(tok)
    hist = train_grpo(policy, tok, arithmetic_task(20, max_operand=3), MathReward(),
                      GRPOConfig(steps=1, prompts_per_step=2, group_size=2, max_new_tokens=4), precision="fp8")
    assert _fp8_linears(policy) > 0 and math.isfinite(hist[0]["grpo/loss"])
    assert hist[0]["grpo/kl_start"] < 1e-6  # the reference is the converted policy itself
    recs = arithmetic_task(24, seed=4, max_operand=4)
    from dsv3.posttrain.distill import distill_token

    student, teacher = tiny_model(tok, seed=7), tiny_model(tok, seed=8).eval()
    want = sft_val_loss(tiny_model(tok, seed=7), _val(tok, recs[16:]), "bf16")
    res = distill_token(student, teacher, tok, recs[:16], recs[16:], DistillConfig(steps=1, batch_size=8),
                        log=lambda *a: None, seq_len=64, precision="bf16")
    assert res["val/loss_before"] == want != sft_val_loss(tiny_model(tok, seed=7), _val(tok, recs[16:]))
    assert math.isfinite(res["val/loss"]) and _fp8_linears(student) == 0
    with torch.no_grad():
        assert all(p.dtype == torch.float32 for p in student.parameters())  # fp32 master weights
