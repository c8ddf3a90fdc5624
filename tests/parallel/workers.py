"""Multi-process helpers for tests/parallel: spawn gloo ranks on localhost, tiny stage models, and the
single-process sequential references the pipelines are checked against."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from dsv3.parallel.local import spawn  # noqa: F401  (re-exported for the tests)


DIM, MB = 8, 2  # hidden size, micro-batch size


def make_stages(n: int, seed: int = 0) -> list[nn.Module]:
    torch.manual_seed(seed)
    return [nn.Sequential(nn.Linear(DIM, DIM), nn.GELU(), nn.LayerNorm(DIM), nn.Linear(DIM, DIM)) for _ in range(n)]


def criterion(out, y):
    return F.mse_loss(out, y)


def data(num_chunks: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_chunks * MB, DIM, generator=g), torch.randn(num_chunks * MB, DIM, generator=g)


def reference(stages, x, y, num_chunks: int, grad: bool = True):
    """Sequential run micro-batch by micro-batch: (per-chunk losses, outputs, stage copies with grads)."""
    stages = copy.deepcopy(stages)
    losses, outs = [], []
    for xc, yc in zip(x.chunk(num_chunks), y.chunk(num_chunks)):
        h = xc
        with torch.set_grad_enabled(grad):
            for s in stages:
                h = s(h)
            loss = criterion(h, yc)
            if grad:
                loss.backward()
        losses.append(loss.detach())
        outs.append(h.detach())
    return torch.stack(losses), torch.cat(outs), stages


def grad_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """1 - 2 sum(xy) / sum(x^2 + y^2), in float64 (0 for identical tensors)."""
    a, b = a.double(), b.double()
    den = (a * a + b * b).sum()
    return 0.0 if den == 0 else float(1 - 2 * (a * b).sum() / den)


def assert_grads(mod: nn.Module, ref: nn.Module, what: str, tol: float = 1e-13) -> None:
    for (n, p), q in zip(mod.named_parameters(), ref.parameters()):
        assert p.grad is not None, f"{what}.{n}: no grad"
        d = grad_diff(p.grad, q.grad)
        assert d < tol, f"{what}.{n}: grad diff {d:.3e} >= {tol}"
