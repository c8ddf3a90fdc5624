"""Prefect flow `lifecycle`: data -> pretraining -> context extension -> post-training (SFT data, SFT,
reward model, GRPO, distillation when configured) -> evaluation of every stage model -> gates ->
promotion, as one flow whose stages are the other flows, run as subflows (each still usable alone).

Thin by design: the stage identities and cache hits are dsv3.lifecycle.plan's, the records and gate
decisions dsv3.lifecycle.ledger's / gates', the report card dsv3.lifecycle.report's; this module
only decides, per stage, "cached, or run the subflow", and passes registry URIs on:
    eval data -> offline MMLU / DROP / HumanEval, prepared when missing (decontamination, benchmarks)
    data      -> data_flow                                  (digest: DVC's md5 of the shards)
    pretrain  -> pretrain_flow(run_extend=False)            registers models:/dsv3-base/N
    extend    -> extend_flow(init=models:/dsv3-base/N)      registers models:/dsv3-long/M
    posttrain -> posttrain_flow(init=models:/dsv3-long@candidate)   registers models:/dsv3-chat/K
    evaluate  -> evaluate_flow per stage model (and per current champion, for the gate)
    gate      -> promote each candidate that beats its champion (alias `champion`)
    serve     -> serve_flow(models:/dsv3-chat/<champion>): `dsv3 serve` + a smoke request (lifecycle.serve_smoke)
A stage whose key is found in the MLflow store finishes in Prefect as `Cached` (its task returns a
Completed state named so) and writes nothing; `--force STAGE` re-runs from that stage. Every run,
a failed one too, writes report.md + report.png (under `lifecycle.report_dir/<MLflow run id>/`), logs them to its
MLflow run and publishes the markdown, a table (stage -> model version -> key metrics) and a link
as Prefect artifacts.
The Prefect API going away mid-flow (tests/faults/test_prefect_outage.py): each API call rides out ~15 s
of outage (PREFECT_CLIENT_MAX_RETRIES=3: 2+4+8 s back-off; Prefect's default 5 waits ~1 min per call),
then the stage fails; the failed run's card goes to MLflow only, `main` names the API in one line, exits 1
without waiting on events and logs for a server that is gone, and the re-run resumes from cached stages.

    python -m flows.lifecycle [--config configs/lifecycle.yaml] [--set k=v ...] [--force STAGE]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_CLIENT_MAX_RETRIES", "3")  # an API outage costs ~15 s per call, not ~1 min
from prefect import flow, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact, create_table_artifact  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.states import Completed  # noqa: E402

from dsv3.config import RunConfig  # noqa: E402
from dsv3.config_base import config_error_exit  # noqa: E402
from dsv3.errors import ConfigError  # noqa: E402
from dsv3.lifecycle import ledger, plan  # noqa: E402
from flows.artifacts import flow_run_id, mlflow_link, prefect_api_lost  # noqa: E402

MODELS = {"pretrain": "base", "extend": "long", "posttrain": "chat"}
DEFAULT_CONFIG = "configs/lifecycle.yaml"  # `make lifecycle`'s, and a deployment run's without parameters
API_LOST = 3  # main's exit status when the Prefect API went away


def _result(state):
    return state.result()  # a stage task's record (raises the stage's exception when it failed)


def _cached(rec: dict):
    return Completed(name="Cached", data=rec, message=f"cache hit: key {rec['key'][:12]}")


@task(name="mark", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def mark(uri: str, sk: plan.StageKey) -> None:
    """Tag a new version with its stage key: what the next run's cache lookup finds (an MLflow write)."""
    ledger.mark_model(uri, sk)


def _stage(cfg: RunConfig, lid: str, stage: str, force: str | None, inputs: dict, run) -> dict:
    """One stage: a hit in the store (Cached), else `run(key)` (a subflow) and its record."""
    sk = plan.stage_key(cfg, stage, inputs)
    t0 = time.time()
    rec = ledger.hit(cfg, sk, force)
    if rec is not None:
        ledger.note(lid, stage, {**rec, "wall_s": time.time() - t0})
        return _cached(rec)
    rec = {"status": "ran", "key": sk.key, **run(sk.key)}
    if rec.get("model_uri"):
        mark(rec["model_uri"], sk)
    rec["wall_s"] = time.time() - t0
    ledger.note(lid, stage, rec)
    return rec


@task(name="eval-data", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE)
def eval_data_stage(cfg: RunConfig) -> str:
    """The offline MMLU / DROP / HumanEval data, prepared when missing (a no-op otherwise): what curation
    decontaminates against and the benchmarks read."""
    from dsv3.evals.offline_data import ensure_eval_data

    return ensure_eval_data(cfg.eval.data_dir)


@task(name="data", cache_policy=NO_CACHE)
def data_stage(cfg: RunConfig, lid: str, force: str | None):
    from flows.data import data_flow

    def run(key):
        d = data_flow(cfg.data, repo=".", parent_run_id=lid, tags={plan.KEY_TAG: key})
        return {"run_id": d["run_id"], "data_digest": d["digest"]}

    return _stage(cfg, lid, "data", force, {}, run)


@task(name="pretrain", cache_policy=NO_CACHE)
def pretrain_stage(cfg: RunConfig, lid: str, force: str | None, digest: str):
    from flows.pretrain import pretrain_flow

    def run(key):
        r = pretrain_flow(cfg, run_data=False, use_ray=cfg.lifecycle.use_ray, run_extend=False, parent_run_id=lid)
        pre = r["pretrain"]
        return {"run_id": r["run_id"], "model_uri": pre["model_uri"], "model_run_id": pre["run_id"]}

    return _stage(cfg, lid, "pretrain", force, {"data": digest}, run)


@task(name="extend", cache_policy=NO_CACHE)
def extend_stage(cfg: RunConfig, lid: str, force: str | None, digest: str, base: str):
    from flows.pretrain import extend_flow

    def run(key):
        r = extend_flow(cfg, base, parent_run_id=lid)
        return {"run_id": r["run_id"], "model_uri": r["model_uri"], "model_run_id": r["run_id"]}

    return _stage(cfg, lid, "extend", force, {"data": digest, "parent": base}, run)


@task(name="posttrain", cache_policy=NO_CACHE)
def posttrain_stage(cfg: RunConfig, lid: str, force: str | None, long: str):
    from dsv3 import tracking
    from flows.posttrain import posttrain_flow

    def run(key):  # downstream reads the extended model's candidate alias (ledger.hit / registration set it)
        init = f"models:/{long.removeprefix('models:/').rpartition('/')[0]}@{tracking.CANDIDATE}"
        if tracking.concrete_model_uri(init) != long:
            raise RuntimeError(f"{init} is no longer {long}: another run registered a newer version meanwhile")
        r = posttrain_flow(cfg, init=init, parent_run_id=lid, repo=".")
        return {"run_id": r["run_id"], "model_uri": r["model_uri"], "model_run_id": r["run_id"], "init": r["init"]}

    return _stage(cfg, lid, "posttrain", force, {"parent": long}, run)


@task(name="evaluate", task_run_name="evaluate-{label}", cache_policy=NO_CACHE)
def eval_stage(cfg: RunConfig, lid: str, force: str | None, digest: str, uri: str, label: str):
    from flows.evaluate import evaluate_flow

    sk = plan.stage_key(cfg, "eval", {"model": uri, "data": digest})
    t0 = time.time()
    rec = ledger.hit(cfg, sk, force)
    cached = rec is not None
    if not cached:
        r = evaluate_flow(uri, cfg.eval, True, heldout=cfg.lifecycle.heldout, tags={plan.KEY_TAG: sk.key},
                          registered_model=cfg.tracking.registered_model)
        rec = {"status": "ran", "key": sk.key, "run_id": r["run_id"], "metrics": r["metrics"]}
    rec.update(model_uri=uri, wall_s=time.time() - t0)
    ledger.note(lid, label, rec, kind="eval")
    return _cached(rec) if cached else rec


@task(name="gate", task_run_name="gate-{model_stage}", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def gate_stage(cfg: RunConfig, lid: str, model_stage: str, candidate: str, evals: dict) -> dict:
    d = ledger.apply_gate(cfg, lid, model_stage, candidate, evals)
    print(f"gate {model_stage}: {'PROMOTED' if d.promote else 'not promoted'} {candidate}: {d.reason}")
    return d.to_json()


@task(name="serve", cache_policy=NO_CACHE)
def serve_stage(cfg: RunConfig, lid: str, force: str | None) -> dict:
    """Last stage: `dsv3 serve` on the chat champion and a smoke request (flows/serve.py), cached by the
    champion version and the serving code; skipped (and said so) when no version is champion."""
    from dsv3 import tracking
    from flows.serve import serve_flow

    champion = tracking.resolve_stage_model(plan.model_name(cfg, "posttrain"), (tracking.CHAMPION,))
    if champion is None:
        rec = {"status": "skipped", "reason": "no chat champion to serve"}
        ledger.note(lid, "serve", rec)
        return rec
    sk = plan.stage_key(cfg, "serve", {"model": champion})
    t0 = time.time()
    rec = ledger.hit(cfg, sk, force)
    cached = rec is not None
    if not cached:
        r = serve_flow(champion, threads=cfg.train.threads, parent_run_id=lid, tags={plan.KEY_TAG: sk.key})
        rec = {"status": "ran", "key": sk.key, "run_id": r["run_id"]}
    rec = ledger.serve_record(rec, champion, time.time() - t0)
    ledger.note(lid, "serve", rec)
    return _cached(rec) if cached else rec


def _card(cfg: RunConfig, lid: str):
    """report.md + report.png, logged to the lifecycle's MLflow run: (markdown, md path, png path)."""
    from dsv3 import tracking
    from dsv3.lifecycle import report

    md, md_path, png = report.write_report(lid, Path(cfg.lifecycle.report_dir) / lid)
    tracking.log_artifact_to(lid, md_path, "report")
    tracking.log_artifact_to(lid, png, "report")
    return md, md_path, png


@task(name="report", retries=2, retry_delay_seconds=5, cache_policy=NO_CACHE)
def report_stage(cfg: RunConfig, lid: str) -> dict:
    from dsv3.lifecycle import report

    md, md_path, png = _card(cfg, lid)
    create_markdown_artifact(markdown=md, key="lifecycle-report", description=f"{cfg.name}: lifecycle report card")
    create_table_artifact(table=report.table_rows(report.collect(lid)), key="lifecycle-models",
                          description="stage -> model version -> key metrics")
    mlflow_link("lifecycle-run", lid, f"{cfg.name}: the lifecycle's MLflow run (report under report/)")
    return {"markdown": str(md_path), "png": str(png)}


@flow(name="lifecycle", log_prints=True)
def lifecycle_flow(cfg: RunConfig | None = None, force: str | None = None) -> dict:
    """Data -> pretrain -> extend -> post-train -> evaluate every stage model -> gate -> promote, cached by
    stage (`cfg` None: configs/lifecycle.yaml; `force`: re-run from this stage on)."""
    from dsv3 import tracking

    plan.check_force(force)
    cfg = plan.prepared(cfg if cfg is not None else RunConfig.load(DEFAULT_CONFIG))
    started = time.time()
    lid = ledger.begin(cfg, flow_run_id(), force)
    out: dict = {"run_id": lid, "stages": {}, "evals": {}, "gates": {}}
    try:
        st = out["stages"]
        if plan.needs_eval_data(cfg):
            eval_data_stage(cfg)
        st["data"] = _result(data_stage(cfg, lid, force, return_state=True))
        digest = st["data"]["data_digest"]
        st["pretrain"] = _result(pretrain_stage(cfg, lid, force, digest, return_state=True))
        st["extend"] = _result(extend_stage(cfg, lid, force, digest, st["pretrain"]["model_uri"], return_state=True))
        st["posttrain"] = _result(posttrain_stage(cfg, lid, force, st["extend"]["model_uri"], return_state=True))
        scores: dict[str, dict] = {}
        for stage, model_stage in MODELS.items():
            uri = st[stage]["model_uri"]
            champion = tracking.resolve_stage_model(plan.model_name(cfg, stage), (tracking.CHAMPION,))
            for label, u in ((model_stage, uri), (f"{model_stage}-champion", champion)):
                if u and u not in scores:
                    out["evals"][label] = _result(eval_stage(cfg, lid, force, digest, u, label, return_state=True))
                    scores[u] = out["evals"][label]["metrics"]
        for stage, model_stage in MODELS.items():
            out["gates"][model_stage] = gate_stage(cfg, lid, model_stage, st[stage]["model_uri"], scores)
        if cfg.lifecycle.serve_smoke:
            out["serve"] = _result(serve_stage(cfg, lid, force, return_state=True))
    except BaseException as e:
        ledger.end(lid, started, ok=False, error=f"{type(e).__name__}: {e}")
        try:  # a failed run's card says how far it got and why it stopped
            if prefect_api_lost(e):
                _card(cfg, lid)  # to MLflow only: no Prefect task or artifact without the API
            else:
                report_stage(cfg, lid)
        except Exception as r:  # noqa: BLE001 - the stage's error is the one to raise
            print(f"no report for the failed run: {r}")
        raise
    ledger.end(lid, started)
    out["report"] = report_stage(cfg, lid)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flows.lifecycle", description=lifecycle_flow.__doc__)
    ap.add_argument("--config", default=DEFAULT_CONFIG)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--force", default=None, choices=plan.ORDER, help="re-run from this stage on (no cache hits)")
    a = ap.parse_args(argv)
    try:
        cfg = RunConfig.load(a.config, a.set)
        plan.prepared(cfg)
    except ConfigError as e:
        return config_error_exit(e, "flows.lifecycle")
    t0 = time.time()
    try:
        res = lifecycle_flow(cfg, force=a.force)
    except Exception as e:  # a failed stage: one readable line (the flow run holds the traceback), exit 1
        if api := prefect_api_lost(e):
            print(f"lifecycle failed: the Prefect API at {api} cannot be reached ({type(e).__name__}: {e}).\n"
                  f"Finished stages are kept in the MLflow store: start the Prefect server again (or unset "
                  f"PREFECT_API_URL for a temporary local one) and re-run; it resumes at the failed stage.",
                  file=sys.stderr)
            return API_LOST
        print(f"lifecycle failed: {type(e).__name__}: {e}\n(fix it and run again: finished stages are cached, "
              f"so it resumes at the failed one)", file=sys.stderr)
        return 1
    print(Path(res["report"]["markdown"]).read_text().split("<details>")[0])
    print(f"lifecycle finished in {(time.time() - t0) / 60:.1f} min; MLflow run {res['run_id']}; "
          f"report {res['report']['markdown']} + {res['report']['png']}")
    return 0


def _exit(rc: int) -> None:
    """Exit with `rc`; when the Prefect API is gone, without Prefect's at-exit drain of the events and logs
    it could not send (~7 s of websocket retries per queued event, unbounded). The MLflow outbox's own at-exit
    step runs first (bounded: deliver, else spill to disk for the next run)."""
    if rc != API_LOST:
        sys.exit(rc)
    from dsv3.tracking import outbox

    outbox._spill_at_exit()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


if __name__ == "__main__":
    _exit(main())
