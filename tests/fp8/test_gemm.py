"""Emulated block-scaled FP8 GEMM vs a float64 reference of the dequantized operands."""

import pytest
import torch

from dsv3.fp8.gemm import fp8_gemm, resolve_backend
from dsv3.fp8.quant import FP8_DTYPE, act_dequant, act_quant, cdiv, weight_dequant, weight_quant


def _operands(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, m).unsqueeze(1)
    w = torch.randn(n, k, generator=g) * 0.05
    return act_quant(a), weight_quant(w)


def _fp32_bound(a_deq, b_deq, k):
    # K/128 promotions + scaling: each FP32 rounding is relative 2^-24 of |A| |B|^T
    mag = a_deq.abs().double() @ b_deq.abs().double().T
    return (cdiv(k, 128) + 3) * 2.0 ** -24 * mag


@pytest.mark.parametrize("m,n,k", [(64, 96, 384), (33, 200, 300), (5, 7, 64)])
def test_emulated_gemm_matches_float64_reference(m, n, k):
    (aq, sa), (bq, sb) = _operands(m, n, k)
    c = fp8_gemm(aq, sa, bq, sb, backend="emulate")
    ad, bd = act_dequant(aq, sa), weight_dequant(bq, sb)
    ref = ad.double() @ bd.double().T
    assert c.dtype == torch.float32 and c.shape == (m, n)
    assert torch.all((c.double() - ref).abs() <= _fp32_bound(ad, bd, k))


def test_single_group_power_of_two_scales_is_bit_exact():
    # one K group, power-of-two scales: every step but the final fp32 rounding is exact
    g = torch.Generator().manual_seed(5)
    aq = (torch.randn(16, 128, generator=g) * 60).clamp(-448, 448).to(FP8_DTYPE)
    bq = (torch.randn(24, 128, generator=g) * 60).clamp(-448, 448).to(FP8_DTYPE)
    sa = 2.0 ** torch.randint(-12, 4, (16, 1), generator=g).float()
    sb = 2.0 ** torch.randint(-12, 4, (1, 1), generator=g).float()
    c = fp8_gemm(aq, sa, bq, sb, backend="emulate")
    ref = (aq.double() * sa.double()) @ (bq.double() * sb.double()).T
    assert torch.equal(c, ref.float())


def test_row_tile_scaled_b_operand():
    # Wgrad form: both operands scaled per 1x128 tile
    g = torch.Generator().manual_seed(2)
    a = torch.randn(40, 260, generator=g)
    b = torch.randn(150, 260, generator=g) * torch.logspace(-3, 1, 150).unsqueeze(1)
    (aq, sa), (bq, sb) = act_quant(a), act_quant(b)
    assert sb.shape == (150, 3)
    c = fp8_gemm(aq, sa, bq, sb)
    ad, bd = act_dequant(aq, sa), act_dequant(bq, sb)
    ref = ad.double() @ bd.double().T
    assert torch.all((c.double() - ref).abs() <= _fp32_bound(ad, bd, 260))
    # and it is the FP8 approximation of the real product
    rel = ((c.double() - a.double() @ b.double().T).norm() / (a.double() @ b.double().T).norm()).item()
    assert 1e-3 < rel < 0.06


def test_leading_dims_dtype_and_errors():
    (aq, sa), (bq, sb) = _operands(12, 20, 256)
    c3 = fp8_gemm(aq.view(3, 4, 256), sa.view(3, 4, 2), bq, sb, out_dtype=torch.bfloat16)
    assert c3.shape == (3, 4, 20) and c3.dtype == torch.bfloat16
    assert torch.equal(c3.view(12, 20), fp8_gemm(aq, sa, bq, sb).bfloat16())
    nc = lambda t: t.t().contiguous().t()  # noqa: E731  same values, column-major strides
    assert torch.equal(fp8_gemm(nc(aq), sa, nc(bq), sb), fp8_gemm(aq, sa, bq, sb))
    with pytest.raises(ValueError):
        fp8_gemm(aq, sa, bq[:, :128], sb[:, :1])
    with pytest.raises(ValueError):
        fp8_gemm(aq, sa[:, :1], bq, sb)
    with pytest.raises(ValueError):
        fp8_gemm(aq, sa, bq, torch.ones(3, 2))


def test_backend_resolution(monkeypatch):
    t = torch.zeros(1)
    monkeypatch.delenv("DSV3_FP8_BACKEND", raising=False)
    assert resolve_backend(t) == "emulate"
    assert resolve_backend(t, "triton") == "triton"
    monkeypatch.setenv("DSV3_FP8_BACKEND", "triton")
    assert resolve_backend(t) == "triton"
    with pytest.raises(ValueError):
        resolve_backend(t, "cublas")
