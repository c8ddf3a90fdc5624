"""Prefect flow `pretrain`: data flow -> pretraining on Ray Train -> YaRN context extension.

Thin by design: each task calls one dsv3 function and passes MLflow run ids
and checkpoint URIs on. The flow parameter is the whole `RunConfig` (a form in the
Prefect UI). MLflow: one parent run `pipeline` with child runs `pretrain` and `extend`
(whose stages are its children); the data flow logs its own `data` run, linked by tag.

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


@task
def pretrain_task(cfg: RunConfig, parent_run_id: str, use_ray: bool, tags: dict) -> dict:
    if use_ray:
        from dsv3.train.launcher import run_training

        return run_training(cfg, parent_run_id=parent_run_id, stage="pretrain", tags=tags)
    from dsv3.train.loop import train

    return train(cfg, parent_run_id=parent_run_id, stage="pretrain", tags=tags).to_json()


@task
def extend_task(cfg: RunConfig, checkpoint: str, parent_run_id: str, use_ray: bool) -> dict:
    from dsv3.train.extend import extend

    return extend(cfg, checkpoint, parent_run_id=parent_run_id, use_ray=use_ray)


@flow(name="pretrain", log_prints=True)
def pretrain_flow(cfg: RunConfig, run_data: bool = True, use_ray: bool = True, extend_on_ray: bool = False,
                  repo: str = ".") -> dict:
    """Data (DVC + GX) -> pretrain (Ray Train) -> context extension (YaRN), tracked in MLflow.
    The short extension stages run in-process by default (a Ray Train launch costs ~20-30 s
    on a 2-core CPU); `extend_on_ray=True` runs them on Ray too."""
    from dsv3 import tracking

    out: dict = {}
    tags: dict = {}
    if run_data:
        from flows.data import data_flow

        d = data_flow(cfg.data, repo=repo)
        out["data"] = {"digest": d["digest"], "run_id": d["run_id"]}
        tags = {"dvc_data_digest": d["digest"], "data_run_id": d["run_id"]}
    try:
        from prefect.runtime import flow_run

        tags["prefect_flow_run_id"] = flow_run.id
    except Exception:  # noqa: BLE001
        pass
    with tracking.start_run(cfg, "pipeline", run_name=f"{cfg.name}-pipeline", tags=tags) as parent:
        pid = parent.info.run_id
        out["run_id"] = pid
        pre = pretrain_task(cfg, pid, use_ray, tags)
        out["pretrain"] = pre
        if cfg.train.extend.enabled and cfg.train.extend.stages:
            ext = extend_task(cfg, pre["checkpoint"], pid, use_ray and extend_on_ray)
            out["extend"] = ext
        final = out.get("extend", pre)
        tracking.set_tags({"checkpoint_uri": final["checkpoint"], "model_dir": final["model_dir"],
                           "registered_model": f"models:/{cfg.tracking.registered_model}/"
                                               f"{final.get('model_version')}"})
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
