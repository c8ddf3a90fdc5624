"""Throughput and MFU against a matmul peak measured on this machine, in this run.

MFU = achieved model FLOP/s / peak FLOP/s, with model FLOPs from `ModelConfig.flops_per_token`
(6·activated params + attention, MTP included) and the peak measured by timing a square
matmul in the run's compute dtype (`Precision.compute_dtype`), so CPU and GPU figures are
honest ratios, not against a datasheet number.
"""

from __future__ import annotations

import time

import torch


def measure_matmul_peak(dtype: torch.dtype = torch.float32, n: int = 1024, reps: int = 5,
                        device: str | torch.device = "cpu") -> float:
    """Best observed FLOP/s of an n×n×n matmul."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(reps):
        if torch.cuda.is_available() and a.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if a.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best
