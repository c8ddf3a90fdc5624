"""Deferred weight gradients for zero-bubble pipelines (§3.2.1), below fp8 and parallel.

`WeightGradStore` holds the weight-gradient closures a zero-bubble pipeline's input-grad (B) op
defers to its W op; `accumulate_grad` adds a deferred gradient as autograd would. The pipeline
schedules (dsv3.parallel.pipeline, which re-exports both under the reference DualPipe names)
drive the store; `dsv3.fp8.FP8Linear` puts its FP8 Wgrad into it. Both import it from here, so
fp8 does not depend on parallel.
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import torch


class WeightGradStore:
    """Deferred weight-gradient closures: `put` while a zero-bubble B runs, `flush` closes one chunk,
    `pop` (a W op) runs the oldest chunk's closures."""

    enabled = False
    cache: list = []
    queue: deque = deque()

    @classmethod
    def put(cls, fn: Callable) -> None:
        cls.cache.append(fn)

    @classmethod
    def flush(cls) -> None:
        cls.queue.append(cls.cache)
        cls.cache = []

    @classmethod
    def pop(cls) -> None:
        assert cls.queue, "W op with an empty WeightGradStore"
        for fn in cls.queue.popleft():
            fn()

    @classmethod
    def clear(cls) -> None:
        cls.enabled, cls.cache = False, []
        cls.queue.clear()


def accumulate_grad(p: torch.Tensor, g: torch.Tensor) -> None:
    """p.grad += g as autograd would: a grad computed under bf16 autocast is cast to the parameter's dtype
    first (autograd casts a Function's returned grads to the input's dtype; a deferred W op must too)."""
    g = g.to(p.dtype)
    if p.grad is None:
        p.grad = g
    else:
        p.grad += g
