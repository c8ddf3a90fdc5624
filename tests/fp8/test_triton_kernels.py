"""Triton kernels vs the exact emulation: on CPU under TRITON_INTERPRET=1 (set by this
directory's conftest.py before triton is imported), on CUDA for real."""

import importlib
import os

import pytest
import torch

pytest.importorskip("triton")

from dsv3.fp8.gemm import fp8_gemm  # noqa: E402
from dsv3.fp8.quant import act_quant, weight_quant  # noqa: E402

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tk():
    mod = importlib.import_module("dsv3.fp8.triton_kernels")
    if not CUDA and type(mod._round_e4m3).__name__ != "InterpretedFunction":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (see tests/fp8/conftest.py); "
                    f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')!r}")
    return mod


DEV = "cuda" if CUDA else "cpu"


def _x(m, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.logspace(-2, 2, m).unsqueeze(1)
    return x


@pytest.mark.parametrize("m,k", [(4, 256), (3, 200)])
def test_act_quant_kernel_matches_emulation(tk, m, k):
    x = _x(m, k)
    x[0, :128] = 0.0  # all-zero tile: clamped amax
    x[1, 5] = 1e-30  # tiny values: the subnormal end of E4M3
    q, s = tk.act_quant_triton(x.to(DEV))
    q_ref, s_ref = act_quant(x)
    torch.testing.assert_close(s.cpu(), s_ref, rtol=0 if not CUDA else 1e-6, atol=0)
    if CUDA:  # fp32 division on the GPU may differ by an ulp: allow one E4M3 step
        assert ((q.cpu().float() - q_ref.float()).abs() <= q_ref.float().abs() / 8 + 2 ** -9).all()
    else:  # explicit rounding makes the interpreter bit-exact
        assert torch.equal(q.cpu().float(), q_ref.float())


def test_weight_quant_kernel_matches_emulation(tk):
    w = _x(200, 300, seed=1) * 0.01
    q, s = tk.weight_quant_triton(w.to(DEV))
    q_ref, s_ref = weight_quant(w)
    assert s.shape == (2, 3)
    torch.testing.assert_close(s.cpu(), s_ref, rtol=0 if not CUDA else 1e-6, atol=0)
    if CUDA:
        assert ((q.cpu().float() - q_ref.float()).abs() <= q_ref.float().abs() / 8 + 2 ** -9).all()
    else:
        assert torch.equal(q.cpu().float(), q_ref.float())


@pytest.mark.parametrize("b_kind", ["block", "row"])
def test_gemm_kernel_matches_emulation(tk, b_kind):
    aq, sa = act_quant(_x(48, 256, seed=2))
    w = _x(80, 256, seed=3)
    bq, sb = weight_quant(w) if b_kind == "block" else act_quant(w)
    c_ref = fp8_gemm(aq, sa, bq, sb, backend="emulate")
    c = tk.fp8_gemm_triton(aq.to(DEV), sa.to(DEV), bq.to(DEV), sb.to(DEV), block_m=32, block_n=32)
    assert c.shape == (48, 80)
    # the 128-deep partial product is fp32 in Triton (exact in the emulation)
    torch.testing.assert_close(c.cpu(), c_ref, rtol=1e-5, atol=1e-6 * c_ref.abs().max().item())


def test_fp8_linear_triton_backend_matches_emulation(tk):
    from dsv3.fp8.linear import FP8Linear

    torch.manual_seed(0)
    lin_e = FP8Linear(160, 136, backend="emulate")
    lin_t = FP8Linear(160, 136, backend="triton").to(DEV)
    lin_t.load_state_dict(lin_e.state_dict())
    x = torch.randn(20, 160)
    xe, xt = x.clone().requires_grad_(), x.to(DEV).requires_grad_()
    ye, yt = lin_e(xe), lin_t(xt)
    g = torch.randn_like(ye)
    ye.backward(g)
    yt.backward(g.to(DEV))
    tol = dict(rtol=2e-2, atol=2e-2) if CUDA else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(yt.detach().cpu(), ye.detach(), **tol)
    torch.testing.assert_close(xt.grad.cpu(), xe.grad, **tol)
    torch.testing.assert_close(lin_t.weight.grad.cpu(), lin_e.weight.grad, **tol)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_gpu_gemm_large(tk):
    aq, sa = act_quant(_x(1024, 2048, seed=4).cuda())
    bq, sb = weight_quant(_x(768, 2048, seed=5).cuda() * 0.01)
    c = fp8_gemm(aq, sa, bq, sb)  # auto -> triton on CUDA
    c_ref = fp8_gemm(aq, sa, bq, sb, backend="emulate")
    torch.testing.assert_close(c, c_ref, rtol=1e-4, atol=1e-4 * c_ref.abs().max().item())
