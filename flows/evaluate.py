"""Prefect flow `evaluate`: one task per benchmark on a checkpoint, results to MLflow and a
Prefect markdown artifact (DeepSeek-V3 §4.4 benchmarks; see dsv3/evals).

Thin by design: the work is in dsv3.evals.runner. The checkpoint is `--ckpt` (a HF dir,
`runs:/...`, `models:/name/version`) or the newest `runs/*/checkpoints/step_*/model` that
dsv3.train wrote, else `models:/dsv3/latest`. The flow parameter is the `EvalConfig`.
    python -m flows.evaluate [--ckpt PATH] [--limit N] [--tasks mmlu,drop] [--data-dir D] [--unsafe-no-sandbox]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from dsv3.evals import runner
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
def bits_per_byte(ckpt: str, cfg: EvalConfig) -> dict:
    return runner.run_bpb(ckpt, cfg)


@task
def publish(ckpt: str, cfg: EvalConfig, metrics: dict, out: str, tracking: bool) -> dict:
    table, run_id = runner.finish(ckpt, cfg, metrics, out, tracking)
    create_markdown_artifact(key="eval-results", markdown=f"# Eval of `{ckpt}`\n\nMLflow run: `{run_id}`\n\n{table}",
                             description="dsv3 benchmark results")
    return {"table": table, "run_id": run_id}


@flow(name="evaluate")
def evaluate_flow(ckpt: str | None = None, cfg: EvalConfig = EvalConfig(), tracking: bool = True) -> dict:
    c = resolve_checkpoint(ckpt)
    out = tempfile.mkdtemp(prefix="dsv3-eval-")
    metrics: dict = {}
    for bench in cfg.tasks:  # sequential: one model in memory, shared by the tasks
        metrics.update(benchmark(c, bench, cfg, out))
    if cfg.bpb_shards:
        metrics.update(bits_per_byte(c, cfg))
    res = publish(c, cfg, metrics, out, tracking)
    return {"metrics": metrics, **res, "ckpt": c}


def main(argv: list[str] | None = None) -> int:
    from dsv3.evals.cli import load_eval_config

    p = argparse.ArgumentParser(description="evaluate a checkpoint (Prefect flow)")
    p.add_argument("--ckpt", default=None)
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--tasks", default=None, help="comma list of mmlu,drop,humaneval")
    p.add_argument("--data-dir", default=None, help="offline data (default $DSV3_EVAL_DATA, or data/evals if present)")
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[])
    p.add_argument("--no-track", action="store_true")
    p.add_argument("--unsafe-no-sandbox", action="store_true", help="no sandbox mechanism: run HumanEval UNCONTAINED")
    a = p.parse_args(argv)
    sets = a.set + (["eval.unsafe_no_sandbox=true"] if a.unsafe_no_sandbox else [])
    cfg = load_eval_config(a.config, sets, a.tasks, a.limit, a.data_dir)
    res = evaluate_flow(a.ckpt, cfg, not a.no_track)
    print(res["table"])
    print(f"checkpoint: {res['ckpt']}  mlflow run: {res['run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
