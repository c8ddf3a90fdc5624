"""The collectives the training layouts share (§3.2: data, pipeline and expert parallelism).

Every data-parallel layout in dsv3.train (plain, expert-parallel, pipeline-parallel) needs the same
few operations on different sets of parameters and process groups; they are written once here:
- `all_reduce_flat(tensors, divisor, group)` / `mean_grads_(params, divisor, group)`: tensors
  (gradients) flattened into one buffer, summed over `group` with one all-reduce, divided by
  `divisor`, copied back (DDP's arithmetic: sum / replicas, after backward; the overlapped version
  for plain data parallelism is dsv3.parallel.grad_buckets). A parameter without a gradient
  contributes zeros (MoE leaves experts unused on some ranks, so every rank must still send a buffer
  of the same layout). The division follows the sum, in every layout.
- `all_reduce_mean(t, divisor, group, device)`: the same for a small tensor of statistics (loss
  parts), on the model's device (NCCL reduces CUDA tensors only), returned on the CPU.
- `grad_sq_norm(params)` + `clip_grads_(params, max_norm, sq_norm)`: global-norm clipping when the
  parameters are spread over ranks. Each layout sums the squared norms of the gradients it owns
  in float64 (each parameter counted once over the world), all-reduces them over its groups, and
  `clip_grads_` applies `torch.nn.utils.clip_grad_norm_`'s rule (coef = max / (norm + 1e-6), only
  when < 1) to its local gradients. A non-finite norm makes the coefficient NaN (the loop skips
  such a step and drops the gradients).
- `gather_union(mine, group)`: state dicts gathered to global rank 0 and merged (the whole model
  from its shards) and `assemble_whole_model(model, weights)`: a CPU model of `model`'s class and
  config built on the meta device and filled with the whole state dict (no second initialisation).
- `broadcast_object(obj)`: rank 0's picklable value on every rank (a checkpoint path to roll back to).
Nothing here knows about pipelines or experts: callers pass the parameters and groups.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn


def world() -> tuple[int, int]:
    """(rank, world size) of the default group; (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_flat(tensors: list[torch.Tensor], divisor: int = 1, group=None,
                    reduce: bool = True) -> list[torch.Tensor]:
    """(sum over `group` of each tensor) / divisor with one all-reduce of one flat buffer: new tensors
    of the inputs' shapes. group None: the world; reduce=False: this rank alone (only the division)."""
    flat = torch._utils._flatten_dense_tensors(tensors)
    if reduce:
        dist.all_reduce(flat, group=group)
    if divisor != 1:
        flat /= divisor
    return list(torch._utils._unflatten_dense_tensors(flat, tensors))


@torch.no_grad()
def mean_grads_(params: list[torch.Tensor], divisor: int, group=None, reduce: bool = True) -> None:
    """grad = (sum of grad over `group`) / divisor, in place (`all_reduce_flat`); a missing grad is zeros."""
    if not params:
        return
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    for grad, reduced in zip(grads, all_reduce_flat(grads, divisor, group, reduce)):
        grad.copy_(reduced)


def all_reduce_mean(t: torch.Tensor, divisor: int, group=None, device=None) -> torch.Tensor:
    """(sum of `t` over `group`) / divisor, reduced on `device` (the model's), returned on the CPU."""
    on_device = t.to(device, copy=True)
    dist.all_reduce(on_device, group=group)
    on_device /= divisor
    return on_device.cpu()


def all_reduce_sum(t: torch.Tensor, group=None, device=None) -> torch.Tensor:
    """Sum of `t` over `group`, reduced on `device`, returned on the CPU."""
    on_device = t.to(device, copy=True)
    dist.all_reduce(on_device, group=group)
    return on_device.cpu()


def grad_sq_norm(params, device=None) -> torch.Tensor:
    """Sum of the squared gradient entries of `params`, in float64 (a scalar tensor on `device`)."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for p in params:
        if p.grad is not None:
            total = total + p.grad.double().pow(2).sum()
    return total


@torch.no_grad()
def clip_grads_(params, max_norm: float, sq_norm: torch.Tensor) -> float:
    """Clip the local gradients of `params` to the global norm sqrt(sq_norm); returns the norm."""
    norm = float(sq_norm.sqrt())
    coef = max_norm / (norm + 1e-6) if math.isfinite(norm) else float("nan")
    if coef < 1.0 or not math.isfinite(coef):
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
    return norm


def gather_union(mine: dict[str, dict], group=None) -> dict[str, dict] | None:
    """On global rank 0: {key: the union over `group`'s ranks of their mine[key]} (rank order: later
    ranks' entries win); None on the other ranks. A collective over `group`, which holds rank 0."""
    rank = dist.get_rank()
    out = [None] * dist.get_world_size(group) if rank == 0 else None
    dist.gather_object(mine, out, dst=0, group=group)
    if rank != 0:
        return None
    merged: dict[str, dict] = {k: {} for k in mine}
    for part in out:
        for k, v in part.items():
            merged[k].update(v)
    return merged


def assemble_whole_model(model: nn.Module, weights: dict[str, torch.Tensor]) -> nn.Module:
    """A CPU model of `model`'s class and config holding `weights` (its whole state dict, strict)."""
    with torch.device("meta"):
        whole = type(model)(model.config)
    whole.to_empty(device="cpu")
    whole.load_state_dict(weights)
    return whole


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` on every rank (unchanged without torch.distributed)."""
    if world()[1] == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
