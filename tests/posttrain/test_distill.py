import pytest
import torch

from dsv3.posttrain.config import DistillConfig
from dsv3.posttrain.distill import distill_token, kd_loss, load_teacher
from dsv3.posttrain.grpo import arithmetic_task

from .conftest import tiny_model


def test_kd_loss_zero_for_identical_logits_and_tau_squared_scaling():
    torch.manual_seed(0)
    s = torch.randn(2, 5, 11)
    lab = torch.randint(0, 11, (2, 5))
    lab[:, :2] = -100
    kl, ce = kd_loss(s, s.clone(), lab, tau=2.0)
    assert kl.abs() < 1e-6 and ce > 0
    t = torch.randn(2, 5, 11)
    k1, _ = kd_loss(s, t, lab, tau=1.0)
    k3, _ = kd_loss(s * 3, t * 3, lab, tau=3.0)  # same softened distributions: ratio τ²
    assert torch.allclose(k3, 9 * k1, rtol=1e-4)
    lab2 = lab.clone()
    lab2[:, 2:] = -100  # nothing kept -> 0
    assert kd_loss(s, t, lab2)[0] == 0


def test_token_level_distillation_moves_student_towards_teacher(sft_result, tok):
    teacher = load_teacher(sft_result["ckpt"])
    assert not any(p.requires_grad for p in teacher.parameters())
    student = tiny_model(tok, seed=7, num_hidden_layers=2)
    recs = arithmetic_task(120, seed=4, max_operand=4)
    logged = []
    res = distill_token(student, teacher, tok, recs[:100], recs[100:], DistillConfig(steps=25, lr=3e-3, temperature=2.0),
                        log=lambda d, s: logged.append(d))
    assert res["val/loss"] < 0.7 * res["val/loss_before"], res
    kls = [d["distill/kl"] for d in logged if "distill/kl" in d]
    assert sum(kls[-5:]) / 5 < 0.5 * sum(kls[:5]) / 5


def test_vocab_mismatch_is_an_error(sft_result, tok):
    teacher = load_teacher(sft_result["ckpt"])
    student = tiny_model(tok, vocab_size=len(tok) + 8)
    with pytest.raises(ValueError, match="same tokenizer"):
        distill_token(student, teacher, tok, arithmetic_task(4), [], DistillConfig(steps=1))
