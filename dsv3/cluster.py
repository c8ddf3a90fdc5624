"""Ray on a laptop or a cluster: the general helpers every package uses (data curation, GRPO rollouts,
the training launcher). A ground-floor module: it imports only Ray and the standard library.

`ray_init(address=None, num_cpus=None)` connects to a cluster (`address`: "auto", "ray://host:port",
...; default `$RAY_ADDRESS`) or starts a fresh local one; workers get this checkout on PYTHONPATH so
task functions defined in dsv3 are importable without installing the package.
`ray_map(fn, items, workers)` runs `fn` on each item as Ray tasks with at most `workers` in flight and
returns results in input order (so outputs equal the in-process `map`); `ray_imap` is its lazy form
(consumes `items` as tasks finish, yields results in order, at most `window` tasks in flight: the
caller holds a bounded number of items and results, never all of them). `ray_actor`, `ray_ready`,
`ray_get`, `ray_kill` hold long-lived actors (the serving path's prefill workers). `ray_shutdown()`
stops the local instance. The training launcher (Ray Train) is dsv3/train/launcher.py.
"""

from __future__ import annotations

import os
from collections import deque
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

ROOT = str(Path(__file__).resolve().parent.parent)


def ray_init(address: str | None = None, num_cpus: int | None = None) -> None:
    import ray

    if ray.is_initialized():
        return
    pythonpath = os.pathsep.join(x for x in (ROOT, os.environ.get("PYTHONPATH")) if x)
    kw: dict[str, Any] = {"runtime_env": {"env_vars": {"PYTHONPATH": pythonpath}}, "ignore_reinit_error": True,
                          "log_to_driver": False}
    if address is None:  # $RAY_ADDRESS selects a cluster by configuration (infra/ray.md)
        address = os.environ.get("RAY_ADDRESS") or None
    if address is None:  # "local": always a fresh local instance, never someone else's running cluster
        kw.update(num_cpus=num_cpus, include_dashboard=False)
        address = "local"
    ray.init(address=address, **kw)


def ray_map(fn: Callable, items: Iterable, workers: int) -> list:
    import ray

    if not ray.is_initialized():
        ray_init(num_cpus=workers)
    remote = ray.remote(num_cpus=1)(fn)
    items = list(items)
    in_flight, out_refs = [], []
    for item in items:
        if len(in_flight) >= max(1, workers):
            ray.wait(in_flight, num_returns=1)
            in_flight = [r for r in in_flight if not _ready(ray, r)]
        ref = remote.remote(item)
        in_flight.append(ref)
        out_refs.append(ref)
    return ray.get(out_refs)


def ray_imap(fn: Callable, items: Iterable, workers: int, window: int | None = None) -> Iterator:
    """Lazy, ordered `ray_map`: at most `window` (default 2 * workers) tasks in flight."""
    import ray

    if not ray.is_initialized():
        ray_init(num_cpus=workers)
    remote = ray.remote(num_cpus=1)(fn)
    window = max(1, window or 2 * max(1, workers))
    pending: deque = deque()
    for item in items:
        pending.append(remote.remote(item))
        if len(pending) >= window:
            yield ray.get(pending.popleft())
    while pending:
        yield ray.get(pending.popleft())


def _ready(ray, ref) -> bool:
    done, _ = ray.wait([ref], timeout=0)
    return bool(done)


def ray_shutdown() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


# ---- actors: long-lived workers (the serving path's prefill workers, dsv3.serve.pd) -------------
def ray_actor(cls, *args, num_cpus: int = 1, **kwargs):
    """Start `cls(*args, **kwargs)` as a Ray actor (a local Ray started if none); returns its handle."""
    import ray

    if not ray.is_initialized():
        ray_init()
    return ray.remote(num_cpus=num_cpus)(cls).remote(*args, **kwargs)


def ray_ready(refs: list, timeout: float | None = None) -> list:
    """The refs among `refs` that are done, waiting up to `timeout` s for the first."""
    import ray

    if not refs:
        return []
    done, _ = ray.wait(list(refs), num_returns=1, timeout=timeout)
    return done


def ray_get(ref):
    import ray

    return ray.get(ref)


def ray_kill(actor) -> None:
    import ray

    ray.kill(actor)
