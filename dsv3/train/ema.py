"""Exponential moving average of the weights, kept in CPU memory (DeepSeek-V3 §3.2.3,
"Exponential Moving Average in CPU").

Design choices
- The EMA lives in CPU memory (fp32), so it costs no accelerator memory.
- Off the critical path: after an optimizer step the main thread only *copies* the
  parameters into a CPU snapshot buffer (non-blocking from GPU), then a background
  thread folds the snapshot into the EMA (`ema = ema + (1-decay)(snap - ema)`) while the
  next step runs. Before the next copy the thread is joined, so the snapshot is never
  overwritten while in use and the result is independent of timing (deterministic).
- `swap_into(model)` temporarily loads the EMA weights to evaluate them on validation.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn


class CpuEMA:
    def __init__(self, model: nn.Module, decay: float = 0.99):
        self.decay = decay
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        self.ema = [params[n].detach().to("cpu", torch.float32, copy=True) for n in self.names]
        pin = torch.cuda.is_available() and params[self.names[0]].is_cuda
        self.snap = [torch.empty_like(avg, pin_memory=pin) for avg in self.ema]
        self.updates = 0
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def _fold(self) -> None:
        try:
            torch._foreach_lerp_(self.ema, self.snap, 1.0 - self.decay)
        except BaseException as e:  # surfaced by wait()
            self._error = e

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.wait()
        params = dict(model.named_parameters())
        for s, n in zip(self.snap, self.names):
            s.copy_(params[n].detach(), non_blocking=True)
        if params[self.names[0]].is_cuda:
            torch.cuda.current_stream().synchronize()
        self.updates += 1
        self._thread = threading.Thread(target=self._fold, daemon=True)
        self._thread.start()

    def wait(self) -> None:
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            e, self._error = self._error, None
            raise e

    def state_dict(self) -> dict[str, torch.Tensor]:
        self.wait()
        return dict(zip(self.names, self.ema))

    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        self.wait()
        for t, n in zip(self.ema, self.names):
            t.copy_(sd[n])

    @contextlib.contextmanager
    @torch.no_grad()
    def swap_into(self, model: nn.Module):
        """Evaluate with EMA weights inside the block; the live weights come back after."""
        self.wait()
        params = dict(model.named_parameters())
        saved = [params[n].detach().clone() for n in self.names]
        for t, n in zip(self.ema, self.names):
            params[n].copy_(t)
        try:
            yield model
        finally:
            for s, n in zip(saved, self.names):
                params[n].copy_(s)
