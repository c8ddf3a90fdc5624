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


# ---- actors (owner: serve): prefill workers of dsv3.serve.pd ----------------------------------
def ray_actor(cls, *args, num_cpus: int = 1, **kwargs):
    """Start `cls(*args, **kwargs)` as a Ray actor (local Ray started if needed); returns its handle."""
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


# ---- training (owner: train) --------------------------------------------------------------
# Ray Train runs `dsv3.train.loop.train` on every worker; TorchTrainer sets up the
# torch.distributed group (gloo on CPU, NCCL on GPU). Fault tolerance: FailureConfig
# restarts the whole worker group; the restarted workers find this launch's marker in the
# run folder and resume from the latest valid checkpoint (their own atomic checkpoints,
# not Ray's storage, so a single-process run and a Ray run resume the same way).
# Progress: rank 0 appends its lines to <out_dir>/train.log, which the driver tails.


def _train_worker(config: dict) -> None:
    import torch.distributed as dist

    from dsv3.config import RunConfig
    from dsv3.train.loop import train

    cfg = RunConfig.from_dict(config["cfg"])
    out = Path(cfg.train.out_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    box = [False]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        marker = out / ".launch"
        box[0] = marker.is_file() and marker.read_text() == config["launch_id"]
        marker.write_text(config["launch_id"])
    if dist.is_initialized():
        dist.broadcast_object_list(box, src=0)
    restarted = bool(box[0])
    if restarted and rank == 0:
        print(f"[{config['stage']}] worker group restarted: resuming from the latest checkpoint", flush=True)
    train(cfg, resume=config["resume"] or restarted, parent_run_id=config.get("parent_run_id"),
          stage=config["stage"], run_name=config.get("run_name"), tags=config.get("tags"))


def run_training(cfg, num_workers: int | None = None, use_gpu: bool | None = None, resume: bool = False,
                 parent_run_id: str | None = None, stage: str = "pretrain", run_name: str | None = None,
                 tags: dict | None = None, address: str | None = None, progress: bool = True,
                 placement_strategy: str = "PACK") -> dict:
    """Run `dsv3.train.loop.train` on Ray Train with dp × pp workers (`parallel.dp`, `parallel.pp`: data-
    and pipeline-parallel ranks, §3.2.1; the loop builds the pipeline over the workers' process group;
    `parallel.ep`: the dp workers also shard the routed experts, §3.2.2); returns its result.json."""
    import json
    import threading
    import time
    import uuid

    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if use_gpu is None:  # parallel.use_gpu, else whether CUDA is visible here
        import torch

        use_gpu = cfg.parallel.use_gpu if cfg.parallel.use_gpu is not None else torch.cuda.is_available()
    n = int(num_workers or (cfg.parallel.dp * cfg.parallel.pp) or 1)
    if cfg.parallel.pp > 1:
        from dsv3.train.pipeline_step import check_config

        check_config(cfg, n)  # fail before starting Ray (pp not dividing the workers, odd DualPipe, ...)
    if cfg.parallel.ep > 1:
        from dsv3.train.expert_step import check_config as check_ep

        check_ep(cfg, n)  # ep not dividing dp or the experts, workers != dp × pp
    if cfg.train.threads is None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
            update={"threads": max(1, (os.cpu_count() or 1) // n)})})
    ray_init(address, num_cpus=None if address else max(os.cpu_count() or 1, n + 1))
    from dsv3.train.loop import shard_dir, tokenizer_dir

    out = Path(cfg.train.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    upd = {"out_dir": str(out), "shards": str(Path(shard_dir(cfg)).resolve())}  # workers' cwd differs
    if tokenizer_dir(cfg):
        upd["tokenizer"] = str(Path(tokenizer_dir(cfg)).resolve())
    if cfg.train.init_from and Path(cfg.train.init_from).exists():
        upd["init_from"] = str(Path(cfg.train.init_from).resolve())
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=upd)})
    env = {k: os.environ[k] for k in ("MLFLOW_TRACKING_URI", "OMP_NUM_THREADS") if k in os.environ}
    if "MLFLOW_TRACKING_URI" not in env:
        env["MLFLOW_TRACKING_URI"] = "sqlite:///" + str(Path("mlruns.db").resolve())
    config = {"cfg": cfg.model_dump(mode="json"), "resume": resume, "launch_id": uuid.uuid4().hex,
              "parent_run_id": parent_run_id, "stage": stage, "run_name": run_name, "tags": tags}
    log_path = out / "train.log"
    log_path.write_text("") if not resume else log_path.touch()
    trainer = TorchTrainer(
        _with_env(env), train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=n, use_gpu=use_gpu, resources_per_worker={"CPU": 1},
                                     placement_strategy=placement_strategy),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=f"{cfg.name}-{stage}-{config['launch_id'][:8]}", storage_path=str(out / "ray"),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures)))
    stop = threading.Event()
    tail = threading.Thread(target=_tail, args=(log_path, stop), daemon=True)
    if progress:
        tail.start()
    try:
        trainer.fit()
    finally:
        time.sleep(0.2)
        stop.set()
        if progress:
            tail.join(timeout=2)
    return json.loads((out / "result.json").read_text())


def _with_env(env: dict):
    def fn(config):
        os.environ.update(env)
        _train_worker(config)

    return fn


def _tail(path: Path, stop) -> None:
    import time

    pos = 0
    while True:
        done = stop.is_set()
        if path.exists():
            with open(path) as f:
                f.seek(pos)
                chunk = f.read()
                pos = f.tell()
            if chunk:
                print(chunk, end="", flush=True)
        if done:
            return
        time.sleep(0.5)
