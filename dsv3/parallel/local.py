"""Run a function on N local torch.distributed ranks (gloo on CPU) — for tests, benchmarks and the
2-core laptop path; a cluster launcher (Ray, torchrun) initialises the process group itself."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank, world, init_file, backend, fn, args):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fn(rank, world, *args)
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args, backend: str = "gloo") -> None:
    """fn(rank, world, *args) in `world` processes joined by a file:// rendezvous; a rank's exception
    is raised here. fn must be importable (a module-level function)."""
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_entry, args=(world, os.path.join(d, "init"), backend, fn, args), nprocs=world, join=True)
