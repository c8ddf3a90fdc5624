"""The training launcher: `train()` (loop.py) on Ray Train workers, one per rank (§3.2).

Design choices
- `run_training(cfg)` starts dp × pp workers (`parallel.dp`, `parallel.pp`; `parallel.ep` shards the
  experts over the dp workers); Ray Train's TorchTrainer sets up the torch.distributed group (gloo on
  CPU, NCCL on GPU), and every worker runs the same loop, which builds its layout's TrainStep.
- The layout is checked before Ray starts (`layout.check_layout`: ConfigError naming the key).
- Workers' threads default to cpu_count / workers; they get the driver's MLFLOW_TRACKING_URI (a local
  SQLite store by default) and its AWS_* settings. The result is rank 0's return value
  (`Result.return_value`), never a file the driver reads. Rank 0's MLflow run is tagged `ray_workers`
  (each rank's Ray node and working directory), so where a run's ranks ran is on record.
- Two modes, chosen by `train.storage_uri` / $DSV3_CHECKPOINT_URI (storage.py, infra/ray.md):
  * no storage URI (the laptop default): one filesystem. Paths are made absolute for the workers,
    checkpoints live in `<out_dir>/checkpoints`, rank 0's train.log is tailed by the driver.
  * a storage URI (no shared filesystem): the driver uploads its local inputs (shards by data digest,
    tokenizer / `init_from` by content) and hands the workers URIs; `out_dir` stays relative, so each
    worker's files live in its own node's Ray Train working directory; checkpoints, metrics.jsonl,
    the final model and the launch marker live in `<storage_uri>/<out_dir>`; Ray Train's own run
    state goes to `<storage_uri>/ray`; progress lines reach the driver through a Ray queue. The
    tracking URI must be a server (a SQLite file is one machine's).
- Fault tolerance: FailureConfig restarts the whole worker group; the restarted workers find this
  launch's marker (`.launch` in out_dir, or `launch.json` in storage) and resume from the latest valid
  checkpoint, local or downloaded from storage, so one process and a Ray run resume the same way. A
  restarted group drops `train.debug_kill_rank_at_step` (tests: kill once).
- A cluster connection (`address` / $RAY_ADDRESS) made by `run_training` is closed when it returns: a
  driver still connected when the head restarts is ended by Ray (exit status 1, no message), so a
  long-lived process (flow worker, notebook) connects afresh for each run (tests/faults/test_ray_head.py).
  A local instance, or a connection the caller made, is left as it is.
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
from dsv3.errors import ConfigError
from dsv3.parallel import collectives
from dsv3.train import storage
from dsv3.train.layout import check_layout
from dsv3.train.loop import shard_dir, tokenizer_dir, train

PLACEMENT_TAG = "ray_workers"  # MLflow run tag: JSON list of {rank, node_id, cwd}
FORWARD_ENV = ("MLFLOW_TRACKING_URI", "OMP_NUM_THREADS", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
               "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3",
               "MLFLOW_S3_ENDPOINT_URL")


def _train_worker(config: dict) -> dict | None:
    from dsv3.config import RunConfig

    cfg = RunConfig.from_dict(config["cfg"])
    rank, world = collectives.world()
    if config["storage"]:
        cfg = _on_this_node(cfg)
    else:
        os.environ.pop(storage.ENV, None)  # the driver chose one filesystem; a node's env does not override it
    out = Path(cfg.train.out_dir).resolve()
    marks = storage.checkpoints(cfg, out, rank, world)
    marker = {"launch_id": config["launch_id"], "attempt": 1}
    if rank == 0:
        seen = marks.read_marker()
        if seen and seen.get("launch_id") == config["launch_id"]:
            marker["attempt"] = int(seen.get("attempt", 1)) + 1
        marks.write_marker(marker)
    attempt = collectives.broadcast_object(marker["attempt"])
    workers = _placement(rank, world)
    forward = _forward_log(out / "train.log", config.get("log_queue")) if rank == 0 else None
    if attempt > 1:
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"debug_kill_rank_at_step": None})})
        if rank == 0:
            line = f"[{config['stage']}] worker group restarted (attempt {attempt}): resuming from the latest checkpoint"
            print(line, flush=True)
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "train.log", "a") as f:
                f.write(line + "\n")
    tags = {**(config.get("tags") or {}), PLACEMENT_TAG: json.dumps(workers)}  # where the ranks ran, for the record
    try:
        res = train(cfg, resume=config["resume"] or attempt > 1, parent_run_id=config.get("parent_run_id"),
                    stage=config["stage"], run_name=config.get("run_name"), tags=tags)
    finally:
        if forward is not None:
            forward()
    return {**res.to_json(), "attempt": attempt, "workers": workers} if rank == 0 else None


def _placement(rank: int, world: int) -> list[dict]:
    """Where each rank runs: its Ray node and working directory (in the result, for the record)."""
    import ray

    me = {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(), "cwd": os.getcwd()}
    if world == 1:
        return [me]
    import torch.distributed as dist

    everyone = [None] * world
    dist.all_gather_object(everyone, me)
    return everyone


def _on_this_node(cfg):
    """Storage mode, on a worker: a node-local cache (beside Ray Train's per-run working directories,
    which are in the node's own Ray temp dir) and `init_from` fetched from storage and verified."""
    if not os.environ.get("DSV3_CACHE_DIR"):
        os.environ["DSV3_CACHE_DIR"] = str(Path.cwd().parent / "dsv3-cache")
    init = cfg.train.init_from
    if init and storage.is_remote(init):
        cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"init_from": storage.local_dir(init)})})
    return cfg


def _worker_config(cfg, n_workers: int):
    """`cfg` as the workers need it on one filesystem: threads per worker, absolute paths (their cwd differs)."""
    cfg = _threads(cfg, n_workers)
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


def _threads(cfg, n_workers: int):
    if cfg.train.threads is not None:
        return cfg
    return cfg.model_copy(update={"train": cfg.train.model_copy(
        update={"threads": max(1, (os.cpu_count() or 1) // n_workers)})})


def _storage_config(cfg, base: str, n_workers: int, env: dict):
    """`cfg` as the workers need it without a shared filesystem: every input a storage URI (local ones
    uploaded by the driver, content-addressed), out_dir the relative run key, the storage URI pinned."""
    uri = cfg.tracking.tracking_uri or env.get("MLFLOW_TRACKING_URI") or ""
    if "://" not in uri or uri.startswith(("sqlite:", "file:")):
        raise ConfigError(f"MLFLOW_TRACKING_URI: {uri or '(unset: a local SQLite file)'} is on one machine; with "
                          f"train.storage_uri / ${storage.ENV} ({base}) workers on other nodes need a tracking "
                          "server (http://...; `make stack-up` exports one)")
    cfg = _threads(cfg, n_workers)
    tcfg = cfg.train
    shards = tcfg.shards or str(Path(cfg.data.out_dir) / "shards")
    update = {"storage_uri": base, "out_dir": storage.run_key(tcfg.out_dir),
              "shards": shards if storage.is_remote(shards) else storage.push_shards(shards, base)}
    tok = tcfg.tokenizer or str(Path(cfg.data.out_dir) / "tokenizer")
    if not storage.is_remote(tok):
        tok = _push_input(tok, base) if Path(tok).is_dir() else None
    update["tokenizer"] = tok
    init = tcfg.init_from
    if init and not storage.is_remote(init) and Path(init).exists():
        update["init_from"] = _push_input(init, base)
    return cfg.model_copy(update={"train": tcfg.model_copy(update=update)})


def _push_input(local: str, base: str) -> str:
    """A local input directory uploaded once, under the hash of its contents."""
    import hashlib

    files = storage.sha256_files(Path(local))
    key = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:32]
    uri = f"{base}/inputs/{key}"
    if not storage.complete(uri):
        storage.push_dir(local, uri)
    return uri


def run_training(cfg, num_workers: int | None = None, use_gpu: bool | None = None, resume: bool = False,
                 parent_run_id: str | None = None, stage: str = "pretrain", run_name: str | None = None,
                 tags: dict | None = None, address: str | None = None, progress: bool = True,
                 placement_strategy: str = "PACK", on_output=None) -> dict:
    """Run `dsv3.train.loop.train` on Ray Train with dp × pp workers (`parallel.dp`, `parallel.pp`: data-
    and pipeline-parallel ranks, §3.2.1; the loop builds the pipeline over the workers' process group;
    `parallel.ep`: the dp workers also shard the routed experts, §3.2.2); returns rank 0's result
    (result.json's fields, plus `attempt`: how many times the worker group started, and `workers`: each
    rank's Ray node and working directory). Rank 0's train.log lines are printed as they come and, when
    given, passed to `on_output(text)` (e.g. `run_log.progress_sink`: a progress bar in either mode)."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if use_gpu is None:  # parallel.use_gpu, else whether CUDA is visible here
        import torch

        use_gpu = cfg.parallel.use_gpu if cfg.parallel.use_gpu is not None else torch.cuda.is_available()
    n = n_workers(cfg, num_workers)
    check_layout(cfg, n)  # fail before starting Ray (pp not dividing the workers, odd DualPipe, ep, ...)
    env = {k: os.environ[k] for k in FORWARD_ENV if k in os.environ}
    base = storage.base_uri(cfg)
    if base:
        cfg = _storage_config(cfg, base, n, env)
        storage_path, storage_fs = storage.ray_storage(base)
    else:
        cfg = _worker_config(cfg, n)
        env.setdefault("MLFLOW_TRACKING_URI", "sqlite:///" + str(Path("mlruns.db").resolve()))
        storage_path, storage_fs = str(Path(cfg.train.out_dir) / "ray"), None
    import ray

    connected_here = not ray.is_initialized()
    start_ray(cfg, n, address)
    config = {"cfg": cfg.model_dump(mode="json"), "resume": resume, "launch_id": uuid.uuid4().hex,
              "parent_run_id": parent_run_id, "stage": stage, "run_name": run_name, "tags": tags,
              "storage": base}
    emit = _emitter(on_output)
    follow, queue = _follow_queue(config, emit) if base else \
        (_follow_file(Path(cfg.train.out_dir) / "train.log", resume, emit), None)
    trainer = TorchTrainer(
        _with_env(env), train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=n, use_gpu=use_gpu, resources_per_worker={"CPU": 1},
                                     placement_strategy=placement_strategy),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=RunConfig(name=f"{cfg.name}-{stage}-{config['launch_id'][:8]}", storage_path=storage_path,
                             storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures)))
    stop = threading.Event()
    tail = threading.Thread(target=follow, args=(stop,), daemon=True)
    if progress:
        tail.start()
    try:
        result = trainer.fit()
    finally:
        time.sleep(0.2)
        stop.set()
        if progress:
            tail.join(timeout=5)
        if queue is not None:
            queue.shutdown()
        if connected_here and (address or os.environ.get("RAY_ADDRESS")):
            ray.shutdown()  # the head may restart before the next run: see the module docstring
    if getattr(result, "return_value", None) is None and not base:  # Ray Train v1 (RAY_TRAIN_V2_ENABLED=0)
        return json.loads((Path(cfg.train.out_dir) / "result.json").read_text())
    return result.return_value


def _with_env(env: dict):
    def fn(config):
        os.environ.update(env)
        return _train_worker(config)

    return fn


# ---------------------------------------------------------------------------- progress lines
def _emitter(on_output):
    def emit(chunk: str) -> None:
        print(chunk, end="", flush=True)
        if on_output is not None:
            on_output(chunk)

    return emit


def _tail(path: Path, start: int, emit, every: float):
    """`follow(stop)`: pass what is appended to `path` (from byte `start`) to `emit` every `every` s,
    until `stop` is set (then once more, so the last lines are not lost)."""
    def follow(stop) -> None:
        pos = start
        while True:
            done = stop.is_set()
            if path.exists():
                with open(path) as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos = f.tell()
                if chunk:
                    emit(chunk)
            if done:
                return
            time.sleep(every)

    return follow


def _follow_file(path: Path, resume: bool, emit):
    """One filesystem: the driver tails rank 0's train.log."""
    path.write_text("") if not resume else path.touch()
    return _tail(path, 0, emit, every=0.5)


def _follow_queue(config: dict, emit):
    """No shared filesystem: rank 0 puts its new train.log lines on a Ray queue the driver prints."""
    from ray.util.queue import Empty, Queue

    queue = Queue(maxsize=10_000, actor_options={"num_cpus": 0})
    config["log_queue"] = queue

    def follow(stop) -> None:
        while True:
            done = stop.is_set()
            try:
                while True:
                    emit(queue.get(timeout=0.5))
            except Empty:
                pass
            if done:
                return

    return follow, queue


def _forward_log(path: Path, queue):
    """Rank 0 (storage mode): a thread sending what is appended to its train.log to the driver's queue;
    returns the function that flushes and stops it."""
    if queue is None:
        return None
    stop = threading.Event()
    start = path.stat().st_size if path.exists() else 0

    def send(chunk: str) -> None:
        try:
            queue.put(chunk, timeout=5)
        except Exception:  # noqa: BLE001 - the driver went away: progress is best effort
            pass

    run = _tail(path, start, send, every=0.3)
    t = threading.Thread(target=run, args=(stop,), daemon=True)
    t.start()

    def finish() -> None:
        stop.set()
        t.join(timeout=10)

    return finish
