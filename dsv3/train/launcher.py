"""The training launcher: `train()` (loop.py) on Ray Train workers, one per rank (§3.2).

Design choices
- `run_training(cfg)` starts dp × pp workers (`parallel.dp`, `parallel.pp`; `parallel.ep` shards the
  experts over the dp workers); Ray Train's TorchTrainer sets up the torch.distributed group (gloo on
  CPU, NCCL on GPU), and every worker runs the same loop, which builds its layout's TrainStep.
- The layout is checked before Ray starts (`layout.check_layout`: ConfigError naming the key).
- Workers' paths are absolute (their working directory differs), their threads default to
  cpu_count / workers, and they get the driver's MLFLOW_TRACKING_URI (a local SQLite store by default).
- Fault tolerance: FailureConfig restarts the whole worker group; the restarted workers find this
  launch's marker in the run folder and resume from the latest valid checkpoint (their own atomic
  checkpoints, not Ray's storage, so a single-process run and a Ray run resume the same way).
- Progress: rank 0 appends its lines to <out_dir>/train.log, which the driver tails.
Ray itself is started through dsv3.cluster (the general Ray helpers).
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from pathlib import Path

from dsv3.cluster import ray_init
from dsv3.parallel import collectives
from dsv3.train.layout import check_layout
from dsv3.train.loop import shard_dir, tokenizer_dir, train


def _train_worker(config: dict) -> None:
    from dsv3.config import RunConfig

    cfg = RunConfig.from_dict(config["cfg"])
    out = Path(cfg.train.out_dir)
    rank, _ = collectives.world()
    restarted = False
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        marker = out / ".launch"
        restarted = marker.is_file() and marker.read_text() == config["launch_id"]
        marker.write_text(config["launch_id"])
    restarted = bool(collectives.broadcast_object(restarted))
    if restarted and rank == 0:
        print(f"[{config['stage']}] worker group restarted: resuming from the latest checkpoint", flush=True)
    train(cfg, resume=config["resume"] or restarted, parent_run_id=config.get("parent_run_id"),
          stage=config["stage"], run_name=config.get("run_name"), tags=config.get("tags"))


def _worker_config(cfg, n_workers: int):
    """`cfg` as the workers need it: threads per worker, absolute paths (their cwd differs)."""
    if cfg.train.threads is None:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(
            update={"threads": max(1, (os.cpu_count() or 1) // n_workers)})})
    out = Path(cfg.train.out_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    update = {"out_dir": str(out), "shards": str(Path(shard_dir(cfg)).resolve())}
    if tokenizer_dir(cfg):
        update["tokenizer"] = str(Path(tokenizer_dir(cfg)).resolve())
    if cfg.train.init_from and Path(cfg.train.init_from).exists():
        update["init_from"] = str(Path(cfg.train.init_from).resolve())
    return cfg.model_copy(update={"train": cfg.train.model_copy(update=update)})


def n_workers(cfg, num_workers: int | None = None) -> int:
    return int(num_workers or (cfg.parallel.dp * cfg.parallel.pp) or 1)


def start_ray(cfg, num_workers: int | None = None, address: str | None = None) -> None:
    """Start (or connect to) Ray the way `run_training` needs it: a local instance with a CPU per
    worker and one for the driver, unless `address` / $RAY_ADDRESS names a cluster. A no-op when
    Ray is up already, so a flow can start it as its own retried step before training."""
    n = n_workers(cfg, num_workers)
    ray_init(address, num_cpus=None if address else max(os.cpu_count() or 1, n + 1))


def run_training(cfg, num_workers: int | None = None, use_gpu: bool | None = None, resume: bool = False,
                 parent_run_id: str | None = None, stage: str = "pretrain", run_name: str | None = None,
                 tags: dict | None = None, address: str | None = None, progress: bool = True,
                 placement_strategy: str = "PACK") -> dict:
    """Run `dsv3.train.loop.train` on Ray Train with dp × pp workers (`parallel.dp`, `parallel.pp`: data-
    and pipeline-parallel ranks, §3.2.1; the loop builds the pipeline over the workers' process group;
    `parallel.ep`: the dp workers also shard the routed experts, §3.2.2); returns its result.json."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if use_gpu is None:  # parallel.use_gpu, else whether CUDA is visible here
        import torch

        use_gpu = cfg.parallel.use_gpu if cfg.parallel.use_gpu is not None else torch.cuda.is_available()
    n = n_workers(cfg, num_workers)
    check_layout(cfg, n)  # fail before starting Ray (pp not dividing the workers, odd DualPipe, ep, ...)
    cfg = _worker_config(cfg, n)
    start_ray(cfg, n, address)
    out = Path(cfg.train.out_dir)
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
