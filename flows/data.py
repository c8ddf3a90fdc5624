"""Prefect flow `data`: dvc repro -> Great Expectations -> MLflow + Prefect artifact (§4.1).

Thin by design: the work is in dsv3.data (stages), DVC (what to rebuild) and
dsv3.tracking (MLflow). The flow parameter is the `DataConfig` (a form in the Prefect
UI); when given it is mirrored into params.yaml's `data:` section before `dvc repro`, so
DVC decides what re-runs. The data version is a digest of the outs' md5s in dvc.lock; it
is logged with `mlflow.log_input` (via dsv3.tracking.log_dataset_input), as a run tag and
in the markdown artifact. A failing GX suite fails the flow (non-zero exit from
`python -m flows.data`) after printing the report and the Data Docs path.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

# a loaded laptop / CI box can take longer than Prefect's default 20 s to start the temporary API
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from dsv3.data.config import DataConfig


def _env() -> dict:
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@task
def write_params(repo: str, cfg: DataConfig) -> None:
    p = Path(repo) / "params.yaml"
    d = yaml.safe_load(p.read_text()) if p.is_file() else {}
    d = d or {}
    d["data"] = cfg.model_dump(mode="json")
    p.write_text(yaml.safe_dump(d, sort_keys=False))


# the dvc.yaml stages this flow runs and versions (sft_data, the post-training SFT data, is not one)
DATA_STAGES = ("curate", "tokenizer", "shards")


@task
def dvc_repro(repo: str) -> str:
    r = subprocess.run([sys.executable, "-m", "dvc", "repro", *DATA_STAGES], cwd=repo, env=_env(), capture_output=True, text=True)
    get_run_logger().info(r.stdout[-4000:])
    if r.returncode:
        raise RuntimeError(f"dvc repro failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return r.stdout


def data_version(repo: str | Path) -> tuple[str, dict]:
    """(digest, {out path: md5}) of the DATA_STAGES outs in dvc.lock (metrics files, which hold timings, excluded)."""
    lock = yaml.safe_load((Path(repo) / "dvc.lock").read_text())
    spec = yaml.safe_load((Path(repo) / "dvc.yaml").read_text())
    metrics = {next(iter(m)) if isinstance(m, dict) else m for st in spec["stages"].values()
               for m in st.get("metrics", [])}
    outs = {o["path"]: o["md5"] for name, st in lock["stages"].items() if name in DATA_STAGES
            for o in st.get("outs", []) if o["path"] not in metrics}
    digest = hashlib.sha256(json.dumps(outs, sort_keys=True).encode()).hexdigest()[:16]
    return digest, outs


@task
def validate_data(repo: str, cfg: DataConfig) -> dict:
    from dsv3.data.validate import validate

    rep = validate(Path(repo) / "data", cfg, gx_root=repo)
    print(rep.text)
    if not rep.success:
        raise RuntimeError(f"Great Expectations validation failed; Data Docs: {rep.docs_path}\n{rep.text}")
    return {"success": rep.success, "docs": rep.docs_path, "suites": rep.results}


def _metrics(stats: dict, tok: dict, shards: dict) -> dict:
    m = {"data/input": stats["input"], "data/kept": stats["kept"], "data/input_bytes": stats["input_bytes"],
         "data/kept_bytes": stats["kept_bytes"], "data/vocab_size": tok.get("vocab_size", 0)}
    m.update({f"data/bucket/{k.replace(':', '/')}": v for k, v in stats["buckets"].items()})
    for split in ("train", "val"):
        for k in ("docs", "tokens", "fim_docs", "bytes_per_token"):
            if split in shards:
                m[f"data/{split}/{k}"] = shards[split][k]
    return m


@task
def track(repo: str, cfg: DataConfig, validation: dict) -> dict:
    from dsv3 import tracking

    data = Path(repo) / "data"
    stats = json.loads((data / "stats.json").read_text())
    tok = json.loads((data / "tokenizer_stats.json").read_text())
    shards = json.loads((data / "shards_stats.json").read_text())
    digest, outs = data_version(repo)
    metrics = _metrics(stats, tok, shards)
    with tracking.start_run({"data": cfg.model_dump(mode="json")}, stage="data",
                            tags={"dvc_data_digest": digest}) as run:
        tracking.log_dataset_input(digest, name="dsv3-data", source=str((data / "shards").resolve()),
                                   context="curation")
        tracking.log_metrics(metrics)
        for f in ("stats.json", "tokenizer_stats.json", "shards_stats.json"):
            tracking.log_artifact(data / f, "data")
        run_id = run.info.run_id
    rows = "\n".join(f"| {k} | {v} |" for k, v in stats["buckets"].items())
    md = (f"# Data version `{digest}`\n\nMLflow run `{run_id}`; GX: {'passed' if validation['success'] else 'FAILED'}"
          f" ([Data Docs]({validation['docs']}))\n\n| bucket | docs |\n|---|---|\n{rows}\n| **input** | "
          f"**{stats['input']}** |\n\n| split | docs | tokens | FIM docs |\n|---|---|---|---|\n" +
          "\n".join(f"| {s} | {shards[s]['docs']} | {shards[s]['tokens']} | {shards[s]['fim_docs']} |"
                    for s in ("train", "val") if s in shards) +
          "\n\nouts (dvc.lock md5):\n" + "\n".join(f"- `{p}`: `{h}`" for p, h in outs.items()))
    create_markdown_artifact(markdown=md, key="data-stats", description="dsv3 data accounting")
    return {"digest": digest, "run_id": run_id, "outs": outs, "metrics": metrics}


@flow(name="data", log_prints=True)
def data_flow(cfg: DataConfig | None = None, repo: str = ".", run_validation: bool = True) -> dict:
    """Curate -> tokenizer -> shards with DVC, validate with GX, log version + stats."""
    repo = str(Path(repo).resolve())
    if cfg is not None:
        write_params(repo, cfg)
    else:
        p = Path(repo) / "params.yaml"
        cfg = DataConfig(**((yaml.safe_load(p.read_text()) or {}).get("data") or {})) if p.is_file() else DataConfig()
    dvc_repro(repo)
    validation = validate_data(repo, cfg) if run_validation else {"success": True, "docs": None}
    out = track(repo, cfg, validation)
    return {**out, "validation": validation}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.data", description=data_flow.__doc__)
    ap.add_argument("--repo", default=".")
    ap.add_argument("--no-validate", action="store_true")
    a = ap.parse_args(argv)
    try:
        res = data_flow(repo=a.repo, run_validation=not a.no_validate)
    except Exception as e:  # a failed stage or suite: readable message, non-zero exit
        print(f"data flow failed: {e}", file=sys.stderr)
        return 1
    print(f"data version {res['digest']}  MLflow run {res['run_id']}  Data Docs {res['validation'].get('docs')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
