"""AdamWBF16: BF16 moments, FP32 master weights, tracks torch.optim.AdamW."""

import pytest
import torch

from dsv3.fp8.optim import AdamWBF16


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(64, 32, generator=g)
    t = torch.randn(64, 16, generator=g)
    w0 = torch.randn(32, 16, generator=g) * 0.1
    return a, t, w0


def _train(opt_cls, steps=40, **kw):
    a, t, w0 = _problem()
    w = torch.nn.Parameter(w0.clone())
    b = torch.nn.Parameter(torch.zeros(16))
    opt = opt_cls([{"params": [w]}, {"params": [b], "weight_decay": 0.0}], lr=1e-2, betas=(0.9, 0.95), **kw)
    losses = []
    for _ in range(steps):
        loss = ((a @ w + b - t) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return w, b, opt, losses


def test_tracks_torch_adamw_with_bf16_states():
    w, b, opt, losses = _train(AdamWBF16, weight_decay=0.1)
    w_ref, b_ref, _, losses_ref = _train(torch.optim.AdamW, weight_decay=0.1)
    st = opt.state[w]
    assert st["exp_avg"].dtype == torch.bfloat16 and st["exp_avg_sq"].dtype == torch.bfloat16
    assert w.dtype == torch.float32 and st["step"] == 40
    assert losses[-1] < 0.5 * losses[0]
    d = ((w - w_ref).norm() / (w_ref - _problem()[2]).norm()).item()
    assert 0 < d < 0.02  # close to fp32-state AdamW, but really a different (rounded) state
    assert abs(losses[-1] - losses_ref[-1]) / losses_ref[-1] < 0.01


def test_weight_decay_is_decoupled_and_per_group():
    # zero gradient: only decay acts, p <- p * (1 - lr * wd); the no-decay group is untouched
    w = torch.nn.Parameter(torch.ones(4))
    b = torch.nn.Parameter(torch.ones(4))
    opt = AdamWBF16([{"params": [w]}, {"params": [b], "weight_decay": 0.0}], lr=0.1, weight_decay=0.5)
    w.grad, b.grad = torch.zeros(4), torch.zeros(4)
    opt.step()
    torch.testing.assert_close(w.detach(), torch.full((4,), 0.95))
    torch.testing.assert_close(b.detach(), torch.ones(4))


def test_invalid_hyperparameters():
    p = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError):
        AdamWBF16(p, betas=(1.0, 0.9))
    with pytest.raises(ValueError):
        AdamWBF16(p, lr=-1.0)
