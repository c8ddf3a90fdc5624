"""Ray launcher: the one module of dsv3 that imports ray.

`ray_init(address=None, num_cpus=None)` connects to a cluster (`address`: "auto",
"ray://host:port", ...) or starts a local one; workers get this checkout on PYTHONPATH
so task functions defined in dsv3 are importable without installing the package.
`ray_map(fn, items, workers)` runs `fn` on each item as Ray tasks with at most `workers`
in flight and returns results in input order (so outputs equal the in-process `map`).
Training launch helpers live below (owner: train).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = str(Path(__file__).resolve().parent.parent)


def ray_init(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    pp = os.pathsep.join(x for x in (ROOT, os.environ.get("PYTHONPATH")) if x)
    kw: dict[str, Any] = {"runtime_env": {"env_vars": {"PYTHONPATH": pp}}, "ignore_reinit_error": True,
                          "log_to_driver": False}
    if address is None:
        kw.update(num_cpus=num_cpus, include_dashboard=False)
    ray.init(address=address, **kw)


def ray_map(fn: Callable, items: Iterable, workers: int) -> list:
    import ray

    if not ray.is_initialized():
        ray_init(num_cpus=workers)
    remote = ray.remote(num_cpus=1)(fn)
    items = list(items)
    refs, out_refs = [], []
    for it in items:
        if len(refs) >= max(1, workers):
            ray.wait(refs, num_returns=1)
            refs = [r for r in refs if not _ready(ray, r)]
        r = remote.remote(it)
        refs.append(r)
        out_refs.append(r)
    return ray.get(out_refs)


def _ready(ray, ref) -> bool:
    done, _ = ray.wait([ref], timeout=0)
    return bool(done)


def ray_shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
