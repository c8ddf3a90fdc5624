"""Block-scaled FP8 GEMM with FP32 promotion every 128 of K (DeepSeek-V3 §3.3.2).

``fp8_gemm(a, sa, b, sb)`` computes ``C = A @ B^T`` where ``A = a.float() * sa`` per 1x128
tile along K and ``B = b.float() * sb`` per 128x128 block (the weight) or per 1x128 tile
(an activation/gradient operand, as in the Wgrad GEMM). Which one ``sb`` is, is read
from its shape: ``[ceil(N/128), kb]`` = blocks, ``[N, kb]`` = row tiles (for N = 1 the
two coincide).

Two back ends behind one interface (`backend=`, env ``DSV3_FP8_BACKEND``, else automatic):
- ``"emulate"`` (default on CPU): exact PyTorch emulation. For each 128-wide K group the
  partial product of the FP8 values is computed in float64, which is *exact*: an E4M3
  product has an 8-bit significand and magnitude in [2^-18, 2^17.6], so a sum of 128 of
  them spans < 53 bits. It is then rounded once to FP32, multiplied by ``sa`` then ``sb``
  in FP32 and added to an FP32 accumulator, group after group in K order. This is the
  ideal of the paper's scheme (MMA over N_C = 128 elements, then promotion to FP32 CUDA-
  core accumulation with the dequantization scales applied there, §3.3.2 Fig. 7b); it
  is slower than a plain matmul - the point is numerics, not speed, on CPU.
- ``"triton"`` (default for CUDA tensors): `triton_kernels.fp8_gemm_triton`, the same
  arithmetic with ``tl.dot`` on FP8 tensor cores (Hopper/Ada). On CPU it runs only under
  ``TRITON_INTERPRET=1`` (tests).
`quantize_act` / `quantize_weight` dispatch the quantizers the same way.
"""

from __future__ import annotations

import math
import os

import torch

from dsv3.fp8.quant import BLOCK, act_quant, cdiv, weight_quant

__all__ = ["fp8_gemm", "fp8_gemm_emulated", "resolve_backend", "quantize_act", "quantize_weight"]

BACKENDS = ("emulate", "triton")
_CHUNK_ELEMS = 1 << 24  # float64 partials per chunk of rows (128 MiB)


def resolve_backend(t: torch.Tensor, backend: str | None = None) -> str:
    """``backend`` if given, else $DSV3_FP8_BACKEND, else triton on CUDA and emulate on CPU."""
    b = backend or os.environ.get("DSV3_FP8_BACKEND") or ("triton" if t.is_cuda else "emulate")
    if b not in BACKENDS:
        raise ValueError(f"unknown FP8 backend {b!r}; choose one of {BACKENDS}")
    return b


def _row_scales(sb: torch.Tensor, n: int, block: int) -> torch.Tensor:
    """B's scale as one row per output column: [N, kb]."""
    if sb.shape[0] == n:
        return sb.float()
    if sb.shape[0] != cdiv(n, block):
        raise ValueError(f"b_scale has {sb.shape[0]} rows: expected {n} (row tiles) or "
                         f"{cdiv(n, block)} (128x128 blocks)")
    return sb.float().repeat_interleave(block, 0)[:n]


def _pad_k(t: torch.Tensor, pad: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, pad)) if pad else t


def fp8_gemm_emulated(a: torch.Tensor, sa: torch.Tensor, b: torch.Tensor, sb: torch.Tensor,
                      out_dtype: torch.dtype = torch.float32, block: int = BLOCK) -> torch.Tensor:
    m, k = a.shape
    n = b.shape[0]
    kb = cdiv(k, block)
    sb_rows = _row_scales(sb, n, block)
    sa = sa.float()
    pad = kb * block - k
    # [kb, block, N] float64 (zero padding of K adds exact zeros)
    b64 = _pad_k(b.to(torch.float64), pad).reshape(n, kb, block).permute(1, 2, 0)
    out = torch.empty((m, n), dtype=torch.float32, device=a.device)
    rows = max(1, _CHUNK_ELEMS // max(1, n * kb))
    for r0 in range(0, m, rows):
        a64 = _pad_k(a[r0:r0 + rows].to(torch.float64), pad)
        a64 = a64.reshape(-1, kb, block).transpose(0, 1)  # [kb, rows, block]
        part = torch.bmm(a64, b64).to(torch.float32)  # exact per 128-group, then one rounding
        acc = torch.zeros((a64.shape[1], n), dtype=torch.float32, device=a.device)
        for j in range(kb):  # promotion: scale and accumulate in FP32, in K order
            acc += part[j] * sa[r0:r0 + rows, j:j + 1] * sb_rows[None, :, j]
        out[r0:r0 + rows] = acc
    return out.to(out_dtype)


def fp8_gemm(a_fp8: torch.Tensor, a_scale: torch.Tensor, b_fp8: torch.Tensor, b_scale: torch.Tensor,
             out_dtype: torch.dtype = torch.float32, block: int = BLOCK,
             backend: str | None = None) -> torch.Tensor:
    """``C = dequant(a) @ dequant(b)^T``; ``a`` may have leading batch dims ([..., K])."""
    if a_fp8.shape[-1] != b_fp8.shape[-1]:
        raise ValueError(f"fp8_gemm: K mismatch {tuple(a_fp8.shape)} vs {tuple(b_fp8.shape)}")
    if b_fp8.dim() != 2:
        raise ValueError("fp8_gemm: b must be 2-D [N, K]")
    lead = a_fp8.shape[:-1]
    k = a_fp8.shape[-1]
    m = math.prod(lead)
    a2 = a_fp8.reshape(m, k)
    sa2 = a_scale.reshape(m, a_scale.shape[-1])
    if sa2.shape != (a2.shape[0], cdiv(k, block)):
        raise ValueError(f"a_scale shape {tuple(a_scale.shape)} does not match a {tuple(a_fp8.shape)}")
    if b_scale.shape[-1] != cdiv(k, block):
        raise ValueError(f"b_scale shape {tuple(b_scale.shape)} does not match b {tuple(b_fp8.shape)}")
    if k == 0:  # e.g. the Wgrad of an expert that received no token
        return torch.zeros(*lead, b_fp8.shape[0], dtype=out_dtype, device=a_fp8.device)
    if resolve_backend(a_fp8, backend) == "triton":
        from dsv3.fp8.triton_kernels import fp8_gemm_triton

        c = fp8_gemm_triton(a2, sa2, b_fp8, b_scale, out_dtype=out_dtype, block=block)
    else:
        c = fp8_gemm_emulated(a2, sa2, b_fp8, b_scale, out_dtype=out_dtype, block=block)
    return c.reshape(*lead, b_fp8.shape[0])


def quantize_act(x: torch.Tensor, block: int = BLOCK, backend: str | None = None):
    """1x128-tile quantization along the last dim, on the chosen back end."""
    if resolve_backend(x, backend) == "triton":
        from dsv3.fp8.triton_kernels import act_quant_triton

        return act_quant_triton(x, block)
    return act_quant(x, block)


def quantize_weight(w: torch.Tensor, block: int = BLOCK, backend: str | None = None):
    """128x128-block quantization of a 2-D weight, on the chosen back end."""
    if resolve_backend(w, backend) == "triton":
        from dsv3.fp8.triton_kernels import weight_quant_triton

        return weight_quant_triton(w, block)
    return weight_quant(w, block)
