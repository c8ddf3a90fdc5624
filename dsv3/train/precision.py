"""One object for the numeric precision of a run: `Precision("fp32" | "bf16" | "fp8")` (§3.3).

It owns the three things a precision decides, so no caller tests the string itself:
- `prepare(model)`: the model conversion. fp8 swaps the Linear layers for `dsv3.fp8.FP8Linear` in
  place (FP8 Fprop / Dgrad / Wgrad with fine-grained scaling, §3.3.1-3.3.2); the embedding, the
  output head, the MoE gate and the norms keep higher precision (`dsv3.fp8.DEFAULT_SKIP`) and the
  attention core is not a Linear. fp32 and bf16 leave the model as it is. Parameter names and
  tensors do not change, so checkpoints are the same either way.
- `autocast(device)`: the context every forward runs in. fp32: none; bf16 and fp8: autocast to
  bf16 (the non-FP8 GEMMs and activations in bf16, §3.3.1).
- `compute_dtype`: the dtype the GEMMs run in outside FP8 (fp32 or bf16), e.g. for the matmul peak
  that MFU is measured against.
Master weights, gradients and optimizer states stay fp32 in every mode (§3.3.1). The object is a
frozen dataclass: equal names compare equal, and it pickles (Ray workers, spawned ranks).
Used alike by pretraining and extension (`train.precision`), post-training and evaluation.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import nn

from dsv3.fp8 import convert_to_fp8

PrecisionName = Literal["fp32", "bf16", "fp8"]


@dataclass(frozen=True)
class Precision:
    name: PrecisionName = "fp32"

    def __post_init__(self):
        if self.name not in get_args(PrecisionName):
            raise ValueError(f"precision: {self.name!r} is not one of {', '.join(get_args(PrecisionName))}")

    @classmethod
    def of(cls, value: "Precision | str | None") -> "Precision":
        """A Precision from a name, None (fp32) or a Precision (returned as is)."""
        if isinstance(value, Precision):
            return value
        return cls(value or "fp32")

    @property
    def compute_dtype(self) -> torch.dtype:
        return torch.float32 if self.name == "fp32" else torch.bfloat16

    def autocast(self, device: torch.device | str = "cpu"):
        """The forward context: nothing for fp32, bf16 autocast on `device`'s type otherwise."""
        if self.name == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)

    def prepare(self, model: nn.Module) -> nn.Module:
        """Convert `model` in place for this precision (fp8: FP8 Linears) and return it."""
        if self.name == "fp8":
            convert_to_fp8(model)
        return model

    def __str__(self) -> str:
        return self.name
