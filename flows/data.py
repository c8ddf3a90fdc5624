"""Prefect flow `data`: dvc repro (curate -> tokenizer -> shards -> validate) -> MLflow + Prefect artifact (§4.1).

Thin by design: the work is in dsv3.data (stages, `version`, `report`), DVC (what to rebuild;
the Great Expectations suites are its `validate` stage, whose result the flow reads back with
`dsv3.data.validate.read_validation`) and dsv3.tracking (MLflow). The flow parameter is the
`DataConfig` (a form in the Prefect UI); when given it is mirrored into params.yaml's `data:`
section before `dvc repro`, so DVC decides what re-runs. The data version is
`dsv3.data.version.data_digest` of the shards (DVC's md5 of `data/shards`, the value training logs
too); it is logged with `mlflow.log_input`, as the run tag `dvc_data_digest` and in the markdown
artifact. A failing GX suite fails `dvc repro` and so the flow (non-zero exit from
`python -m flows.data`), with the report and the Data Docs path; `--no-validate` skips the stage.

    python -m flows.data [--repo .] [--set data.k=v ...] [--no-validate]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

# a loaded laptop / CI box can take longer than Prefect's default 20 s to start the temporary API
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from dsv3.config_base import config_error_exit
from dsv3.data import report, version
from dsv3.data.cli import load_data_config
from dsv3.data.config import DataConfig
from dsv3.errors import ConfigError

DATA_STAGES = version.DATA_STAGES


@task
def write_params(repo: str, cfg: DataConfig) -> None:
    from dsv3.config_base import write_params as write

    write(Path(repo) / "params.yaml", {"data": cfg})


@task
def dvc_repro(repo: str, stages: tuple[str, ...] = DATA_STAGES) -> str:
    out = version.repro(repo, stages)
    get_run_logger().info(out[-4000:])
    return out


@task
def validation(repo: str) -> dict:
    """The shards' checksums (a corrupted shard raises ShardError naming it: DVC trusts its read-only cache
    objects unhashed) and the GX result the DVC stage `validate` wrote (a failed or stale one raises,
    naming Data Docs)."""
    from dsv3.data.shards import verify_shards
    from dsv3.data.validate import read_validation

    verify_shards(Path(repo) / "data" / "shards", verify="once")
    res = read_validation(Path(repo) / "data")
    print(res.get("report", ""))
    return {"success": res["success"], "docs": res.get("docs"), "suites": res.get("suites")}


@task(retries=2, retry_delay_seconds=5)
def track(repo: str, cfg: DataConfig, validation: dict, parent_run_id: str | None = None,
          tags: dict | None = None) -> dict:
    from dsv3 import tracking

    data = Path(repo) / "data"
    digest = version.data_digest(data / "shards", repo)
    outs = version.lock_outs(repo, DATA_STAGES)
    metrics = report.metrics(data)
    with tracking.start_run({"data": cfg.model_dump(mode="json")}, stage="data", parent_run_id=parent_run_id,
                            tags={**(tags or {}), "dvc_data_digest": digest}) as run:
        tracking.log_dataset_input(digest, name="dsv3-data", source=str((data / "shards").resolve()),
                                   context="curation")
        tracking.log_metrics(metrics)
        for f in report.STATS_FILES:
            tracking.log_artifact(data / f, "data")
        run_id = run.info.run_id
    create_markdown_artifact(markdown=report.markdown(data, digest, run_id, validation, outs), key="data-stats",
                             description="dsv3 data accounting")
    return {"digest": digest, "run_id": run_id, "outs": outs, "metrics": metrics}


@flow(name="data", log_prints=True)
def data_flow(cfg: DataConfig | None = None, repo: str = ".", run_validation: bool = True,
              parent_run_id: str | None = None, tags: dict | None = None) -> dict:
    """Curate -> tokenizer -> shards -> GX validation with DVC, log version + stats (the MLflow run
    nested under `parent_run_id` when given, with `tags` added)."""
    repo = str(Path(repo).resolve())
    if cfg is not None:
        write_params(repo, cfg)
    else:
        cfg = load_data_config(_params(repo))
    dvc_repro(repo, DATA_STAGES if run_validation else tuple(s for s in DATA_STAGES if s != "validate"))
    checked = validation(repo) if run_validation else {"success": True, "docs": None}
    out = track(repo, cfg, checked, parent_run_id, tags)
    return {**out, "validation": checked}


def _params(repo: str) -> str:
    p = Path(repo) / "params.yaml"
    return str(p) if p.is_file() else "none"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.data", description=data_flow.__doc__)
    ap.add_argument("--repo", default=".")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override params.yaml's data section, e.g. data.seq_len=256 (written back for DVC)")
    ap.add_argument("--no-validate", action="store_true")
    a = ap.parse_args(argv)
    try:
        cfg = load_data_config(_params(a.repo), a.set)
    except ConfigError as e:
        return config_error_exit(e, "flows.data")
    try:  # params.yaml is rewritten only when --set changed it
        res = data_flow(cfg if a.set else None, repo=a.repo, run_validation=not a.no_validate)
    except Exception as e:  # a failed stage or suite: readable message, non-zero exit
        print(f"data flow failed: {e}", file=sys.stderr)
        return 1
    print(f"data version {res['digest']}  MLflow run {res['run_id']}  Data Docs {res['validation'].get('docs')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
