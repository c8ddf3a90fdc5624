"""Prefect flow `posttrain`: SFT data -> SFT -> reward model -> GRPO (-> distillation) (DeepSeek-V3 §5).

Thin by design: each task calls one `dsv3.posttrain.stages` function and passes checkpoint URIs
and MLflow run ids on. MLflow: one parent run `posttrain` with a child run per stage (sft_data,
sft, reward, grpo, distill); the final model is registered as `<tracking.registered_model>-chat`
(alias `candidate`) with `parent_model` = the registry version it started from. The SFT data is the
DVC stage `sft_data` (`dvc repro sft_data` in `repo`, dvc.lock kept fresh) when the config writes
where that stage does, else generated in-process (a teacher, another out_dir). The flow
parameter is the whole `RunConfig`. A progress artifact follows GRPO; a link artifact opens the
MLflow run.

Start point (`stages.find_init`): `--init` / `posttrain.init` (path, runs:/, models:/; `fresh` for a
randomly initialised model), else the registered extended model `models:/dsv3-long@champion`,
else `@candidate`; with neither it stops, saying to run `make pretrain` or pass `--init`.
Without `--config` the run uses the post-training defaults (the `tiny` preset only matters for
`--init fresh`); `configs/posttrain_tiny.yaml` is a few steps of each stage.

    python -m flows.posttrain [--config configs/posttrain_tiny.yaml] [--set k=v ...] [--init URI|PATH|fresh]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
from prefect import flow, task  # noqa: E402

from dsv3.config import RunConfig  # noqa: E402
from dsv3.config_base import config_error_exit  # noqa: E402
from dsv3.errors import ConfigError  # noqa: E402
from dsv3.posttrain import stages  # noqa: E402
from dsv3.posttrain.report import summary  # noqa: E402
from flows.artifacts import flow_run_id, mlflow_link, progress  # noqa: E402


@task
def data_task(cfg, pid, repo):
    if stages.sft_data_in_dvc(cfg, repo):  # `dvc repro sft_data`: a no-op when unchanged, dvc.lock stays fresh
        from dsv3.posttrain.sft_data import repro_sft_data

        return repro_sft_data(repo, cfg, parent_run_id=pid)
    return stages.stage_data(cfg, parent_run_id=pid)


@task
def sft_task(cfg, init, data, out, pid):
    return stages.stage_sft(cfg, init, data, out, parent_run_id=pid)


@task
def reward_task(cfg, init, data, out, pid):
    return stages.stage_reward(cfg, init, data, out, parent_run_id=pid)


@task
def grpo_task(cfg, init, out, rm, pid):
    bar = progress("grpo-progress", f"{cfg.name}: GRPO steps")
    r = stages.stage_grpo(cfg, init, out, rm_uri=rm, parent_run_id=pid, progress=bar)
    return {k: v for k, v in r.items() if k != "history"}


@task
def distill_task(cfg, student, teacher, data, out, pid):
    return stages.stage_distill(cfg, student, teacher, data, out, parent_run_id=pid)


@task(retries=2, retry_delay_seconds=5)
def publish_task(cfg, local):
    return stages.publish(cfg, local)


@task(retries=2, retry_delay_seconds=5)
def register_task(cfg, final, start, checkpoint_uri=None):
    return stages.register_chat(cfg, final, start, checkpoint_uri)


@flow(name="posttrain", log_prints=True)
def posttrain_flow(cfg: RunConfig, init: str | None = None, parent_run_id: str | None = None,
                   repo: str = ".") -> dict:
    """SFT -> reward model -> GRPO (-> distillation), each stage an MLflow child run; registers the result.
    With a storage URI (`train.storage_uri` / $DSV3_CHECKPOINT_URI) the stages work in a temporary scratch
    directory and each one's output is uploaded to `<storage>/<posttrain.out_dir>/<stage>`."""
    # a storage URI (server mode): stage outputs go to storage, the local copies are scratch
    scratch = Path(tempfile.mkdtemp(prefix="dsv3-posttrain-")) if stages.storage_base(cfg) else None
    try:
        return _posttrain(cfg, scratch or Path(cfg.posttrain.out_dir), init, parent_run_id, repo, scratch is not None)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _posttrain(cfg: RunConfig, out: Path, init: str | None, parent_run_id: str | None, repo: str,
               remote: bool) -> dict:
    from dsv3 import tracking

    start = stages.find_init(cfg, out, init)  # before any run: a missing model is a message, not a run
    res: dict = {"init": start}
    with tracking.start_run(cfg, "posttrain", run_name=f"{cfg.name}-posttrain", parent_run_id=parent_run_id,
                            tags={"prefect_flow_run_id": flow_run_id(), "parent_checkpoint": start}) as parent:
        pid = res["run_id"] = parent.info.run_id
        data = res["data"] = data_task(cfg, pid, str(Path(repo).resolve()))
        sft = res["sft"] = sft_task(cfg, start, data, str(out / "sft"), pid)
        rm = res["reward"] = reward_task(cfg, sft["ckpt"], data, str(out / "reward"), pid)
        g = res["grpo"] = grpo_task(cfg, sft["ckpt"], str(out / "grpo"), rm["ckpt"], pid)
        final = g["ckpt"]
        d = cfg.posttrain.distill
        if d.enabled:
            teacher = d.teacher or final  # default: distil the RL'd policy into the SFT student
            res["distill"] = distill_task(cfg, sft["ckpt"], teacher, data, str(out / "distill"), pid)
            final = res["distill"]["ckpt"]
        if remote:  # every stage's output to storage (the scratch goes when the flow ends)
            res["published"] = {k: publish_task(cfg, res[k]["ckpt"]) for k in ("sft", "reward", "grpo", "distill")
                                if k in res}
        uri = res.get("published", {}).get("distill" if d.enabled else "grpo", final)
        res.update(final=uri, model_uri=register_task(cfg, final, start, uri))
    mlflow_link("posttrain-run", pid, f"{cfg.name}: post-training run (registers {res['model_uri']})")
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.posttrain", description=posttrain_flow.__doc__)
    ap.add_argument("--config", default=None, help="RunConfig YAML (default: CPU defaults, tiny preset)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--init", default=None,
                    help="start model: a checkpoint path or runs:/ / models:/ URI, or `fresh` (default: "
                         "models:/dsv3-long@champion, else @candidate)")
    a = ap.parse_args(argv)
    try:
        sets = a.set if a.config else ["preset=tiny", *a.set]
        cfg = RunConfig.load(a.config, sets)
    except ConfigError as e:
        return config_error_exit(e, "flows.posttrain")
    from dsv3.tracking import ModelNotFound

    try:  # resolved before Prefect starts: a missing start model costs no flow run
        init = stages.find_init(cfg, Path(cfg.posttrain.out_dir), a.init)
    except ModelNotFound as e:
        print(f"flows.posttrain: {e}", file=sys.stderr)
        return 2
    t0 = time.time()
    r = posttrain_flow(cfg, init=init)
    print(summary(r, time.time() - t0))
    return 0


if __name__ == "__main__":
    sys.exit(main())
