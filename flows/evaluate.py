"""Prefect flow `evaluate`: one task per benchmark on a checkpoint, results to MLflow and a
Prefect markdown artifact (DeepSeek-V3 §4.4 benchmarks; see dsv3/evals).

Thin by design: the work is in dsv3.evals.runner (one task per call of it) and
dsv3.evals.report. The checkpoint is `--ckpt` (a HF dir, `runs:/...`, `models:/name/version`)
or the newest `runs/*/checkpoints/step_*/model` that dsv3.train wrote, else
`models:/dsv3/latest`. The flow parameter is the `EvalConfig` (the `eval:` section of
`--config`, `--set eval.k=v`, then the flags, as `dsv3 eval run` loads it).
    python -m flows.evaluate [--ckpt PATH] [--limit N] [--tasks mmlu,drop] [--data-dir D] [--set eval.k=v] [--unsafe-no-sandbox]
"""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from dsv3.config_base import config_error_exit
from dsv3.errors import ConfigError
from dsv3.evals import report, runner
from dsv3.evals.cli import load_eval_config
from dsv3.evals.config import EvalConfig


@task
def resolve_checkpoint(ckpt: str | None) -> str:
    c = ckpt or runner.find_latest_checkpoint()
    get_run_logger().info("evaluating %s", c)
    return c


@task(task_run_name="benchmark-{bench}")
def benchmark(ckpt: str, bench: str, cfg: EvalConfig, out: str) -> dict:
    m = runner.run_benchmark(ckpt, bench, cfg, out)
    get_run_logger().info("%s: %s", bench, {k: round(v, 4) for k, v in m.items() if k.count("/") == 2})
    return m


@task
def bpb(ckpt: str, cfg: EvalConfig) -> dict:
    return runner.run_bpb(ckpt, cfg)


@task
def publish(ckpt: str, cfg: EvalConfig, metrics: dict, out: str, tracking: bool) -> dict:
    table, run_id = runner.finish(ckpt, cfg, metrics, out, tracking)
    create_markdown_artifact(key="eval-results", markdown=report.markdown(ckpt, run_id, table),
                             description="dsv3 benchmark results")
    return {"table": table, "run_id": run_id}


@flow(name="evaluate")
def evaluate_flow(ckpt: str | None = None, cfg: EvalConfig = EvalConfig(), tracking: bool = True) -> dict:
    c = resolve_checkpoint(ckpt)
    out = str(runner.output_dir())
    metrics: dict = {}
    for bench in cfg.tasks:  # sequential: one model in memory, shared by the tasks
        metrics.update(benchmark(c, bench, cfg, out))
    if cfg.bpb_shards:
        metrics.update(bpb(c, cfg))
    res = publish(c, cfg, metrics, out, tracking)
    return {"metrics": metrics, **res, "ckpt": c}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.evaluate", description="evaluate a checkpoint (Prefect flow)")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--tasks", default=None, help="comma list of mmlu,drop,humaneval")
    p.add_argument("--data-dir", default=None, help="offline data (default $DSV3_EVAL_DATA, or data/evals if present)")
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. eval.batch_size=32")
    p.add_argument("--no-track", action="store_true")
    p.add_argument("--unsafe-no-sandbox", action="store_true", help="no sandbox mechanism: run HumanEval UNCONTAINED")
    a = p.parse_args(argv)
    try:
        sets = a.set + (["eval.unsafe_no_sandbox=true"] if a.unsafe_no_sandbox else [])
        cfg = load_eval_config(a.config, sets, a.tasks, a.limit, a.data_dir)
    except ConfigError as e:
        return config_error_exit(e, "flows.evaluate")
    res = evaluate_flow(a.ckpt, cfg, not a.no_track)
    print(res["table"])
    print(f"checkpoint: {res['ckpt']}  mlflow run: {res['run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
