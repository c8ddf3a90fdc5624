"""FP8 Linear layer and model conversion (DeepSeek-V3 §3.3.1-3.3.3, Fig. 6).

``FP8Linear`` is an ``nn.Linear`` whose three GEMMs run in FP8 (E4M3) with fine-grained
scaling, through `gemm.fp8_gemm` (emulation on CPU, Triton on CUDA):

- Fprop  ``y = x W^T``:  x per 1x128 tile along K (in-features), W per 128x128 block.
- Dgrad  ``dx = dy W``:  dy per 1x128 tile along N (out-features, the reduction dim);
  the FP8 weight of the forward pass is reused transposed (a 128x128 block grid is
  transpose-symmetric: the scales are just transposed).
- Wgrad  ``dW = dy^T x``: the reduction runs over tokens, so both operands are quantized
  in 128x1 tiles (128 tokens x 1 channel): dy^T and x^T per 1x128 tile along M.
  As in the paper, the cached FP8 activation (1x128 tiles) is dequantized and
  requantized in the transposed tiling for this GEMM.

Memory / precision (§3.3.1, §3.3.3):
- The activation is cached for backward **in FP8** (x_fp8 + its FP32 tile scales), not x.
  The FP8 weight and its block scales are cached too (the FP32 master is not re-read).
- The parameter stays the FP32 master weight; Wgrad is produced in FP32 (the weight's
  dtype); the bias (if any) is added in FP32 and its gradient is an FP32 sum of dy.
- The output (and dx) have the dtype of the input (BF16 in a BF16 model).
- Any in/out feature count works: partial 128 tiles are handled by the quantizers and
  the GEMM (no layer is skipped because of its shape).

Zero-bubble pipelines (§3.2.1, `dsv3.parallel.pipeline`): while
``WeightGradStore.enabled`` (a pipeline's input-grad B op), the backward computes Dgrad (and
the bias grad, an FP32 sum of dy) at once, quantizes dy^T for Wgrad (the same ops as above,
so the FP8 dy^T is what waits, not dy) and queues a closure that runs the rest of Wgrad
(requantize the cached FP8 activation, the FP8 GEMM) and adds dW to ``weight.grad`` in the
W op: the same values, bitwise, as the non-split backward. Otherwise (no pipeline) nothing
changes. ``split_weight_grads`` leaves FP8Linear alone (``splits_weight_grad = True``), and
``convert_to_fp8`` undoes its forward swap on a Linear split before conversion, so the
order of conversion and pipeline split does not matter. The store lives in dsv3.model.wgrad,
below both fp8 and parallel.

``convert_to_fp8(model, skip=...)`` swaps ``nn.Linear`` modules to ``FP8Linear`` in place by
changing their class: same module objects, same parameter names and tensors, no copies.
Modules whose qualified name, or the name of any enclosing module, matches a skip
pattern (fnmatch) stay as they are. The defaults keep in higher precision what the paper
keeps there (§3.3.1): embedding, output head (``lm_head``, any ``*head``), the MoE gate
(``*.gate``; note ``gate_proj`` of an expert is *not* a gate), and norms. Attention's core
(softmax(QK^T)V) is not a Linear and is never touched.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable

import torch
import torch.nn as nn

from dsv3.fp8.gemm import fp8_gemm, quantize_act, quantize_weight
from dsv3.fp8.quant import BLOCK, act_dequant

__all__ = ["FP8Linear", "fp8_linear", "convert_to_fp8", "DEFAULT_SKIP"]

DEFAULT_SKIP: tuple[str, ...] = ("*embed*", "*head", "gate", "*.gate", "*norm*")


class _FP8LinearFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, block, backend):
        with torch.autocast(x.device.type, enabled=False):  # our dtypes are explicit
            return _FP8LinearFn._fwd(ctx, x, weight, bias, block, backend)

    @staticmethod
    def backward(ctx, dy):
        with torch.autocast(dy.device.type, enabled=False):
            return _FP8LinearFn._bwd(ctx, dy)

    @staticmethod
    def _fwd(ctx, x, weight, bias, block, backend):
        in_dtype = x.dtype
        k = x.shape[-1]
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)
        xq, xs = quantize_act(x2, block, backend)
        wq, ws = quantize_weight(weight.detach(), block, backend)
        y = fp8_gemm(xq, xs, wq, ws, out_dtype=torch.float32, block=block, backend=backend)
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(xq, xs, wq, ws)
        ctx.weight = weight  # the parameter (not a copy): a deferred Wgrad adds into its .grad
        ctx.meta = (block, backend, in_dtype, lead, bias is not None, weight.dtype,
                    bias.dtype if bias is not None else None)
        return y.to(in_dtype).reshape(*lead, wq.shape[0])

    @staticmethod
    def _bwd(ctx, dy):
        xq, xs, wq, ws = ctx.saved_tensors
        block, backend, in_dtype, lead, has_bias, w_dtype, b_dtype = ctx.meta
        n, k = wq.shape
        dy2 = dy.reshape(-1, n)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # Dgrad: dy tiles along N; W^T blocks = transposed FP8 weight + transposed scales.
            dyq, dys = quantize_act(dy2, block, backend)
            dx = fp8_gemm(dyq, dys, wq.t().contiguous(), ws.t().contiguous(),
                          out_dtype=torch.float32, block=block, backend=backend)
            dx = dx.to(in_dtype).reshape(*lead, k)
        if ctx.needs_input_grad[1]:
            # Wgrad: reduction over tokens -> 128x1 tiles for dy and x (1x128 on the transposes).
            dytq, dyts = quantize_act(dy2.t().contiguous(), block, backend)

            def wgrad():
                xt = act_dequant(xq, xs, block).t().contiguous()
                xtq, xts = quantize_act(xt, block, backend)
                return fp8_gemm(dytq, dyts, xtq, xts, out_dtype=torch.float32, block=block,
                                backend=backend).to(w_dtype)

            from dsv3.model.wgrad import WeightGradStore, accumulate_grad

            if WeightGradStore.enabled:  # a zero-bubble B: Wgrad runs in the pipeline's W op
                weight = ctx.weight

                def deferred():
                    with torch.autocast(dytq.device.type, enabled=False):
                        accumulate_grad(weight, wgrad())

                WeightGradStore.put(deferred)
            else:
                dw = wgrad()
        if has_bias and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0).to(b_dtype)
        return dx, dw, db, None, None


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               block: int = BLOCK, backend: str | None = None) -> torch.Tensor:
    """Functional FP8 linear: ``x @ weight.T + bias`` with FP8 Fprop/Dgrad/Wgrad."""
    return _FP8LinearFn.apply(x, weight, bias, block, backend)


class FP8Linear(nn.Linear):
    """``nn.Linear`` with FP8 fine-grained-scaled GEMMs; FP32 master weight.

    ``fp8_backend``: None (automatic), "emulate" or "triton". ``fp8_enabled = False``
    falls back to the plain ``nn.Linear`` computation (handy for A/B checks; in a pipeline its
    weight grad is then computed in B, not deferred: same values, no zero-bubble split).
    """

    fp8_block: int = BLOCK
    fp8_backend: str | None = None
    fp8_enabled: bool = True
    splits_weight_grad = True  # defers its own Wgrad under WeightGradStore (split_weight_grads skips it)

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None,
                 dtype=None, backend: str | None = None, block: int = BLOCK):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.fp8_backend = backend
        self.fp8_block = block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fp8_enabled:
            w = self.weight.to(x.dtype)
            b = self.bias.to(x.dtype) if self.bias is not None else None
            return nn.functional.linear(x, w, b)
        return fp8_linear(x, self.weight, self.bias, self.fp8_block, self.fp8_backend)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8_block={self.fp8_block}, backend={self.fp8_backend or 'auto'}"


def _skipped(name: str, patterns: Iterable[str]) -> bool:
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    return any(fnmatch.fnmatchcase(s, pat) for pat in patterns for s in prefixes + parts)


def convert_to_fp8(model: nn.Module, skip: Iterable[str] | None = DEFAULT_SKIP, block: int = BLOCK,
                   backend: str | None = None) -> list[str]:
    """Turn every ``nn.Linear`` of `model` not matching `skip` into an ``FP8Linear`` in place.

    A pattern is matched (fnmatch, case-sensitive) against the qualified name of the
    module and of each enclosing module, and against each single name component, e.g.
    ``"*.gate"`` skips ``model.layers.3.mlp.gate`` and everything inside it, ``"*head"``
    skips ``lm_head``. Pass ``skip=()`` to convert everything. Returns the converted names.
    """
    patterns = tuple(skip or ())
    done = []
    for name, mod in model.named_modules():
        if type(mod) is not nn.Linear or not name or _skipped(name, patterns):
            continue
        if getattr(mod, "_dsv3_split", False):  # split_weight_grads ran first: FP8Linear splits itself
            del mod.forward, mod._dsv3_split
        mod.__class__ = FP8Linear
        mod.fp8_block = block
        mod.fp8_backend = backend
        done.append(name)
    return done
