"""Prefect flows `pretrain` (data -> pretraining on Ray Train -> YaRN context extension) and `extend`.

Thin by design: each task calls one dsv3 function and passes MLflow run ids and registry URIs on.
The flow parameter is the whole `RunConfig` (a form in the Prefect UI). MLflow: one parent run
`pipeline` with child runs `pretrain` and `extend` (whose stages are its children); the data flow
logs its own `data` run, linked by tag. Registry hand-off: pretraining registers
`<tracking.registered_model>-base`, the extension starts from that version
(`models:/dsv3-base/N`) and registers `-long` with it as `parent_model`; both get alias
`candidate`. `extend` alone (`extend_flow`, the lifecycle's extension stage) runs the YaRN stages
from a given model. Ray is started by its own retried task; a progress artifact follows
pretraining (rank 0's progress lines: its train.log in-process, the Ray launcher's `on_output` on
Ray, with or without a shared filesystem) and a link artifact opens each
stage's MLflow run.

    python -m flows.pretrain --config configs/pretrain_small.yaml [--set k=v ...] [--no-data] [--no-ray]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
from prefect import flow, task  # noqa: E402

from dsv3.config import RunConfig  # noqa: E402
from dsv3.config_base import config_error_exit  # noqa: E402
from dsv3.errors import ConfigError  # noqa: E402
from dsv3.train.report import summary  # noqa: E402
from flows.artifacts import flow_run_id, mlflow_link, progress  # noqa: E402


@task(retries=2, retry_delay_seconds=10)
def ray_start(cfg: RunConfig) -> None:
    from dsv3.train.launcher import start_ray

    start_ray(cfg)


@task
def pretrain_task(cfg: RunConfig, parent_run_id: str, use_ray: bool, tags: dict) -> dict:
    from dsv3.train.run_log import progress_sink, watch_progress

    bar = progress("pretrain-progress", f"{cfg.name}: pretraining steps")
    if use_ray:  # the launcher hands rank 0's lines on (with or without a shared filesystem)
        from dsv3.train.launcher import run_training

        res = run_training(cfg, parent_run_id=parent_run_id, stage="pretrain", tags=tags, on_output=progress_sink(bar))
    else:
        from dsv3.train.loop import train

        with watch_progress(cfg.train.out_dir, bar):
            res = train(cfg, parent_run_id=parent_run_id, stage="pretrain", tags=tags).to_json()
    mlflow_link("pretrain-run", res.get("run_id"), f"{cfg.name}: pretraining run (registers {res.get('model_uri')})")
    return res


@task
def extend_task(cfg: RunConfig, init: str, parent_run_id: str | None, use_ray: bool) -> dict:
    from dsv3.train.extend import extend

    res = extend(cfg, init, parent_run_id=parent_run_id, use_ray=use_ray)
    mlflow_link("extend-run", res.get("run_id"),
                f"{cfg.name}: context extension run (registers {res.get('model_uri')})")
    return res


@flow(name="extend", log_prints=True)
def extend_flow(cfg: RunConfig, init: str, parent_run_id: str | None = None, use_ray: bool | None = None) -> dict:
    """YaRN context extension (§4.3) from `init` (best a registry URI, `models:/dsv3-base/N`); registers -long.
    `use_ray` None: on Ray Train when `lifecycle.use_ray` and a storage URI is in force (server mode: no
    shared filesystem, so the driver is no place for a training stage's files), else in-process."""
    if use_ray is None:
        from dsv3.train import storage

        use_ray = cfg.lifecycle.use_ray and storage.base_uri(cfg) is not None
    return extend_task(cfg, init, parent_run_id, use_ray)


@flow(name="pretrain", log_prints=True)
def pretrain_flow(cfg: RunConfig, run_data: bool = True, use_ray: bool = True, extend_on_ray: bool = False,
                  repo: str = ".", run_extend: bool = True, parent_run_id: str | None = None) -> dict:
    """Data (DVC + GX) -> pretrain (Ray Train) -> context extension (YaRN), tracked in MLflow.
    The short extension stages run in-process by default (a Ray Train launch costs ~20-30 s
    on a 2-core CPU); `extend_on_ray=True` runs them on Ray too. `run_extend=False` stops after
    pretraining (the lifecycle runs the extension as its own stage)."""
    from dsv3 import tracking

    out: dict = {}
    tags: dict = {}
    if run_data:
        from flows.data import data_flow

        d = data_flow(cfg.data, repo=repo)
        out["data"] = {"digest": d["digest"], "run_id": d["run_id"]}
        tags = {"dvc_data_digest": d["digest"], "data_run_id": d["run_id"]}
    if flow_run_id():
        tags["prefect_flow_run_id"] = flow_run_id()
    with tracking.start_run(cfg, "pipeline", run_name=f"{cfg.name}-pipeline", parent_run_id=parent_run_id,
                            tags=tags) as parent:
        pid = parent.info.run_id
        out["run_id"] = pid
        if use_ray:
            ray_start(cfg)
        pre = pretrain_task(cfg, pid, use_ray, tags)
        out["pretrain"] = pre
        if run_extend and cfg.train.extend.enabled and cfg.train.extend.stages:
            # from the registered -base version (lineage), else (registration off) the checkpoint
            out["extend"] = extend_task(cfg, pre.get("model_uri") or pre["checkpoint"], pid, use_ray and extend_on_ray)
        final = out.get("extend", pre)
        done = {"checkpoint_uri": final["checkpoint"], "model_dir": final["model_dir"],
                "registered_model": final.get("model_uri")}
        tracking.set_tags({k: v for k, v in done.items() if v})  # no "None" tag when registration is off
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.pretrain", description=pretrain_flow.__doc__)
    ap.add_argument("--config", default="configs/pretrain_small.yaml")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--no-data", action="store_true", help="skip the data flow (shards must exist)")
    ap.add_argument("--no-ray", action="store_true", help="train in-process instead of on Ray Train")
    a = ap.parse_args(argv)
    try:
        cfg = RunConfig.load(a.config, a.set)
    except ConfigError as e:
        return config_error_exit(e, "flows.pretrain")
    t0 = time.time()
    res = pretrain_flow(cfg, run_data=not a.no_data, use_ray=not a.no_ray, repo=str(Path.cwd()))
    print(summary(res, time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
