"""Fine-grained FP8 (E4M3) quantization, exact PyTorch emulation (DeepSeek-V3 §3.3.1-3.3.2).

Design choices
- Format: E4M3 (`torch.float8_e4m3fn`, max finite 448) for every GEMM input, activations,
  weights and gradients alike (§3.3.2 "we adopt the E4M3 format on all tensors").
- Granularity (§3.3.2, Fig. 7a): activations are scaled per 1x128 *tile* (one token x 128
  channels along the last dim), weights per 128x128 *block* (128 output x 128 input
  channels). The scale is online: ``scale = amax / 448`` over the tile/block; the stored
  FP8 value is ``round_to_nearest_even(x / scale)`` saturated to [-448, 448], and
  ``x ~= fp8.float() * scale``. Scales are FP32 (the paper also studies power-of-two
  scales; we keep exact FP32 ones, like DeepSeek's released ``weight_scale_inv``).
- amax is clamped to ``AMAX_EPS = 1e-4`` from below before dividing. An all-zero tile thus
  gets the finite scale 1e-4/448 and quantizes to exact zeros (no 0/0 NaN). 1e-4 is the
  value DeepSeek's inference kernels use; it only changes tiles whose largest |x| is
  below 1e-4, which for such tiles costs a little dynamic range at the subnormal end
  (values below ~2^-9 * 1e-4/448 flush to zero) - irrelevant for training numerics.
- Dims that are not a multiple of the block are handled as *partial tiles*: internally
  the tensor is zero-padded to the block multiple (zeros never change an amax), the
  padding is dropped again, so the FP8 tensor always has the input's shape and the scale
  has ``ceil(dim / block)`` entries along each blocked dim.
- ``weight_dequant(w_fp8, scale_inv)`` doubles as the loader for DeepSeek's released FP8
  checkpoints: their ``weight_scale_inv`` is exactly our per-block scale, shape
  ``[ceil(out/128), ceil(in/128)]``, and ``w = fp8.float() * scale_inv`` per block.
"""

from __future__ import annotations

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_EPS = 1e-4
BLOCK = 128

__all__ = ["FP8_DTYPE", "FP8_MAX", "AMAX_EPS", "BLOCK", "act_quant", "act_dequant",
           "weight_quant", "weight_dequant", "expand_block_scale", "cdiv"]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pad_last(x: torch.Tensor, block: int) -> torch.Tensor:
    k = x.shape[-1]
    pad = cdiv(k, block) * block - k
    return torch.nn.functional.pad(x, (0, pad)) if pad else x


def _to_fp8(y: torch.Tensor) -> torch.Tensor:
    # torch's cast is round-to-nearest-even but not saturating: clamp first.
    return y.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def act_quant(x: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize along the last dim in 1 x `block` tiles.

    Returns ``(x_fp8, scale)``: ``x_fp8`` has x's shape (float8_e4m3fn), ``scale`` is FP32
    with shape ``x.shape[:-1] + (ceil(K / block),)``.
    """
    k = x.shape[-1]
    xp = _pad_last(x.float(), block)
    tiles = xp.unflatten(-1, (-1, block))  # [..., nb, block]
    amax = tiles.abs().amax(dim=-1).clamp(min=AMAX_EPS)
    scale = amax / FP8_MAX
    q = _to_fp8(tiles / scale.unsqueeze(-1)).flatten(-2)[..., :k]
    return q.contiguous(), scale


def act_dequant(x_fp8: torch.Tensor, scale: torch.Tensor, block: int = BLOCK,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `act_quant`: ``x_fp8.float() * scale`` per 1 x `block` tile."""
    k = x_fp8.shape[-1]
    if scale.shape[-1] != cdiv(k, block) or scale.shape[:-1] != x_fp8.shape[:-1]:
        raise ValueError(f"act_dequant: scale shape {tuple(scale.shape)} does not match "
                         f"{tuple(x_fp8.shape)} with block {block}")
    tiles = _pad_last(x_fp8.float(), block).unflatten(-1, (-1, block))
    return (tiles * scale.float().unsqueeze(-1)).flatten(-2)[..., :k].to(dtype)


def weight_quant(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a 2-D weight [N, K] in `block` x `block` blocks.

    Returns ``(w_fp8 [N, K], scale [ceil(N/block), ceil(K/block)] fp32)``.
    """
    if w.dim() != 2:
        raise ValueError(f"weight_quant expects a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    nb, kb = cdiv(n, block), cdiv(k, block)
    wp = w.float()
    if (nb * block, kb * block) != (n, k):
        wp = torch.nn.functional.pad(wp, (0, kb * block - k, 0, nb * block - n))
    blocks = wp.view(nb, block, kb, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=AMAX_EPS)
    scale = amax / FP8_MAX
    q = _to_fp8(blocks / scale[:, None, :, None]).view(nb * block, kb * block)[:n, :k]
    return q.contiguous(), scale


def expand_block_scale(scale: torch.Tensor, shape: tuple[int, int], block: int = BLOCK) -> torch.Tensor:
    """Per-element view of a per-block scale: [nb, kb] -> [N, K]."""
    n, k = shape
    if tuple(scale.shape) != (cdiv(n, block), cdiv(k, block)):
        raise ValueError(f"block scale shape {tuple(scale.shape)} does not match weight {tuple(shape)} "
                         f"with block {block} (expected {(cdiv(n, block), cdiv(k, block))})")
    s = scale.float().repeat_interleave(block, 0).repeat_interleave(block, 1)
    return s[:n, :k]


def weight_dequant(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int = BLOCK,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``w = w_fp8.float() * scale_inv`` per `block` x `block` block (any N, K).

    Works for our `weight_quant` output and for DeepSeek's released FP8 checkpoints
    (``weight`` + ``weight_scale_inv`` of shape [ceil(out/128), ceil(in/128)]).
    """
    if w_fp8.dim() != 2:
        raise ValueError(f"weight_dequant expects a 2-D weight, got shape {tuple(w_fp8.shape)}")
    s = expand_block_scale(scale_inv, tuple(w_fp8.shape), block)
    return (w_fp8.float() * s).to(dtype)
