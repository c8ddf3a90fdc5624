"""Triton kernels for fine-grained FP8 (DeepSeek-V3 §3.3.1-3.3.2): the CUDA back end.

Three kernels, each matching the exact PyTorch emulation in `quant.py` / `gemm.py`:
- `act_quant_triton(x)`: one program per (row, 128-column tile); amax over the tile,
  clamped to AMAX_EPS, scale = amax / 448, y = x / scale -> E4M3.
- `weight_quant_triton(w)`: one program per 128x128 block, same recipe.
- `fp8_gemm_triton(a, sa, b, sb)`: C = A @ B^T with A [M, K] scaled per 1x128 tile and
  B [N, K] scaled per 128x128 block (or per 1x128 tile, for the Wgrad GEMM whose operands
  are both activations/gradients). BLOCK_K equals the 128 quantization group, so every
  `tl.dot` covers exactly one scaling group: the FP8 tensor-core partial result of 128
  products is dequantized with ``sa * sb`` and added to an FP32 register accumulator.
  This is the paper's "promotion to CUDA cores every N_C = 128 elements" (§3.3.2,
  Fig. 7b), which bounds the error of Hopper's limited-precision FP8 accumulation.

Rounding. The float -> fp8 cast of the Triton *interpreter* (TRITON_INTERPRET=1, used to
test these kernels on CPU) does not round to nearest. `_round_e4m3` therefore rounds
explicitly to the E4M3 grid (round-half-to-even, with saturation to ±448) before the cast,
so the cast itself is exact on every back end and the kernels reproduce the emulation
bit for bit in the interpreter. On a GPU this costs a few integer/FP ops per element.

TRITON_INTERPRET is read when the kernels are *decorated*, so set it before this module
is imported (`dsv3.fp8.gemm` imports it lazily).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3.fp8.quant import AMAX_EPS, BLOCK, FP8_DTYPE, FP8_MAX, cdiv

__all__ = ["act_quant_triton", "weight_quant_triton", "fp8_gemm_triton"]


@triton.jit
def _round_e4m3(y):
    """Round fp32 to the nearest E4M3 value (ties to even), saturating at ±448."""
    y = tl.minimum(tl.maximum(y, -448.0), 448.0)
    a = tl.abs(y)
    e = (a.to(tl.int32, bitcast=True) >> 23) - 127  # unbiased exponent (a >= 0)
    e = tl.maximum(e, -6)  # E4M3 subnormals share the quantum of the smallest normal binade
    qinv = ((3 - e + 127) << 23).to(tl.float32, bitcast=True)  # 2^(3-e): exact power of two
    q = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e-3): the grid spacing
    v = a * qinv  # in [0, 16), exact
    r = (v + 12582912.0) - 12582912.0  # 1.5 * 2^23: round-half-even to an integer in fp32
    out = r * q
    return tl.where(y < 0, -out, out)


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, K, KB, eps, fmax, BLOCK_K: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    kb = tl.program_id(1)
    offs = kb * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + row * K + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), eps)
    s = amax / fmax
    y = _round_e4m3(x / s)
    tl.store(y_ptr + row * K + offs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row * KB + kb, s)


@triton.jit
def _weight_quant_kernel(w_ptr, y_ptr, s_ptr, N, K, KB, eps, fmax, BLOCK_Q: tl.constexpr):
    pn = tl.program_id(0)
    pk = tl.program_id(1)
    offs_n = (pn * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
    offs_k = pk * BLOCK_Q + tl.arange(0, BLOCK_Q)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    ptrs = offs_n[:, None] * K + offs_k[None, :]
    w = tl.load(w_ptr + ptrs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.maximum(tl.max(tl.max(tl.abs(w), axis=1), axis=0), eps)
    s = amax / fmax
    y = _round_e4m3(w / s)
    tl.store(y_ptr + ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + pn * KB + pk, s)


@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, M, N, K, KB,
                     SB_GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, KB):
        k = kb * BLOCK_K + offs_k
        k_ok = k < K
        a = tl.load(a_ptr + offs_m[:, None] * K + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + offs_n[None, :] * K + k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        sa = tl.load(sa_ptr + offs_m * KB + kb, mask=m_ok, other=0.0)
        sb = tl.load(sb_ptr + (offs_n // SB_GROUP) * KB + kb, mask=n_ok, other=0.0)
        part = tl.dot(a, b, out_dtype=tl.float32)  # one 128-deep FP8 MMA chain
        acc += part * sa[:, None] * sb[None, :]  # promotion: scale and add in FP32
    c = c_ptr + offs_m[:, None] * N + offs_n[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def act_quant_triton(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `quant.act_quant` (tiles along the last dim)."""
    if block != BLOCK:
        raise ValueError(f"the Triton kernels are built for block={BLOCK}")
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    m, k = x2.shape
    kb = cdiv(k, block)
    y = torch.empty((m, k), dtype=FP8_DTYPE, device=x.device)
    s = torch.empty((m, kb), dtype=torch.float32, device=x.device)
    if m:
        _act_quant_kernel[(m, kb)](x2, y, s, k, kb, AMAX_EPS, FP8_MAX, BLOCK_K=block)
    return y.view(shape), s.view(*shape[:-1], kb)


def weight_quant_triton(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of `quant.weight_quant` (128x128 blocks)."""
    if block != BLOCK:
        raise ValueError(f"the Triton kernels are built for block={BLOCK}")
    if w.dim() != 2:
        raise ValueError(f"weight_quant expects a 2-D weight, got shape {tuple(w.shape)}")
    w = w.contiguous()
    n, k = w.shape
    nb, kb = cdiv(n, block), cdiv(k, block)
    y = torch.empty((n, k), dtype=FP8_DTYPE, device=w.device)
    s = torch.empty((nb, kb), dtype=torch.float32, device=w.device)
    _weight_quant_kernel[(nb, kb)](w, y, s, n, k, kb, AMAX_EPS, FP8_MAX, BLOCK_Q=block)
    return y, s


def fp8_gemm_triton(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                    out_dtype: torch.dtype = torch.float32, block: int = BLOCK,
                    block_m: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """C[M, N] = (A * sa) @ (B * sb)^T with FP32 promotion every `block` of K.

    ``a`` [M, K] fp8, ``sa`` [M, ceil(K/128)]; ``b`` [N, K] fp8, ``sb`` either per block
    [ceil(N/128), ceil(K/128)] or per row tile [N, ceil(K/128)].
    """
    if block != BLOCK:
        raise ValueError(f"the Triton kernels are built for block={BLOCK}")
    m, k = a.shape
    n = b.shape[0]
    kb = cdiv(k, block)
    group = 1 if sb.shape[0] == n else block
    a, b = a.contiguous(), b.contiguous()
    sa, sb = sa.float().contiguous(), sb.float().contiguous()
    c = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if a.is_cuda:
        bm, bn = block_m or 64, block_n or 128
    else:  # interpreter: fewer, larger programs are faster
        bm, bn = block_m or 64, block_n or 64
    grid = (cdiv(m, bm), cdiv(n, bn))
    if m and n:
        _fp8_gemm_kernel[grid](a, b, c, sa, sb, m, n, k, kb, SB_GROUP=group,
                               BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=block)
    return c
