"""`dsv3 eval run --ckpt PATH|URI [...]` and `dsv3 eval compare RUN... [--out chart.png]`.

The config is the `eval:` section of `--config` (a RunConfig YAML) with `--set eval.k=v` and the
flags on top, loaded by `dsv3.config_base.load_config` like every entry point."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="benchmarks (MMLU, DROP, HumanEval, bpb) via lm-eval")
    sub = p.add_subparsers(dest="eval_command", metavar="ACTION")
    r = sub.add_parser("run", help="evaluate a checkpoint and log to MLflow")
    r.add_argument("--ckpt", default=None, help="HF dir, runs:/..., models:/name/version (default: latest)")
    r.add_argument("--config", default=None, help="a RunConfig YAML (its eval section is used)")
    r.add_argument("--set", action="append", default=[], metavar="eval.KEY=VALUE", help="config override")
    r.add_argument("--tasks", default=None, help="comma list of mmlu,drop,humaneval")
    r.add_argument("--limit", type=int, default=None, help="documents per task (quick runs)")
    r.add_argument("--data-dir", default=None, help="offline data (make eval-data); also $DSV3_EVAL_DATA")
    r.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    r.add_argument("--unsafe-no-sandbox", action="store_true",
                   help="where no sandbox mechanism (bubblewrap) works, run HumanEval's model-written code UNCONTAINED")
    r.set_defaults(func=_run)
    c = sub.add_parser("compare", help="side-by-side table and PNG chart of eval runs")
    c.add_argument("runs", nargs="+", help="MLflow run ids")
    c.add_argument("--out", default="plots/eval_compare.png")
    c.set_defaults(func=_compare)
    p.set_defaults(func=lambda a: p.print_help() or 2)


def _run_config():
    from dsv3.config import RunConfig  # the file is a whole run config: its other sections are checked too

    return RunConfig


def load_eval_config(config: str | None, sets: list[str], tasks: str | None = None, limit: int | None = None,
                     data_dir: str | None = None):
    """EvalConfig: the `eval:` section of `config` (a RunConfig YAML), `--set eval.k=v`, then the flags."""
    from dsv3.config_base import load_config
    from dsv3.evals.config import EvalConfig

    flags = {"eval.tasks": [t.strip() for t in tasks.split(",") if t.strip()] if tasks else None,
             "eval.limit": limit, "eval.data_dir": data_dir}
    return load_config(EvalConfig, config, sets, section="eval", root=_run_config(), values=flags)


def _run(a: argparse.Namespace) -> int:
    from dsv3.evals.runner import evaluate_checkpoint, find_latest_checkpoint

    sets = a.set + (["eval.unsafe_no_sandbox=true"] if a.unsafe_no_sandbox else [])
    cfg = load_eval_config(a.config, sets, a.tasks, a.limit, a.data_dir)
    res = evaluate_checkpoint(a.ckpt or find_latest_checkpoint(), cfg, tracking=not a.no_track)
    print(res["table"])
    if res["run_id"]:
        print(f"mlflow run: {res['run_id']}")
    return 0


def _compare(a: argparse.Namespace) -> int:
    from dsv3.evals.report import compare

    table, png = compare(a.runs, a.out)
    print(table)
    print(f"chart: {png}")
    return 0

