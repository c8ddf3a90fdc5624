"""dsv3.fp8: FP8 fine-grained mixed precision (DeepSeek-V3 §3.3).

- `quant`: 1x128-tile / 128x128-block E4M3 quantization and dequantization (exact emulation).
- `gemm`: block-scaled FP8 GEMM with FP32 promotion every 128 of K; emulation or Triton.
- `triton_kernels`: the CUDA back end (imported lazily; needs triton).
- `linear`: `FP8Linear` (FP8 Fprop/Dgrad/Wgrad, FP8-cached activations) and `convert_to_fp8`.
- `optim`: `AdamWBF16`, AdamW with BF16 moments and FP32 master weights (§3.3.3).
"""

from dsv3.fp8.gemm import fp8_gemm, quantize_act, quantize_weight, resolve_backend
from dsv3.fp8.linear import DEFAULT_SKIP, FP8Linear, convert_to_fp8, fp8_linear
from dsv3.fp8.optim import AdamWBF16
from dsv3.fp8.quant import act_dequant, act_quant, weight_dequant, weight_quant

__all__ = ["act_quant", "act_dequant", "weight_quant", "weight_dequant", "fp8_gemm", "quantize_act",
           "quantize_weight", "resolve_backend", "FP8Linear", "fp8_linear", "convert_to_fp8",
           "DEFAULT_SKIP", "AdamWBF16"]
