"""The lifecycle's own MLflow run: what each stage did, written as it happens, read back by the report.

- `begin` opens the `lifecycle` run (params: the whole config; tags: git commit, Prefect flow run)
  and leaves it RUNNING without making it the active run, so the stage flows' runs (nested under it
  by `parent_run_id`) and the evaluation runs (nested under the training run of the model they
  score) can each name their own parent.
- `hit` asks the store whether a stage is done (plan.py): for a model stage the registered
  version is made the `candidate` again when a newer one took the alias meanwhile (downstream
  stages read `@candidate`); nothing is written when it already is.
- `mark_model` tags a new version with the stage's key (the cache's source of truth, next run).
- `note` writes one stage's record as the JSON tag `lifecycle.stage.<stage>` (or
  `lifecycle.eval.<label>` for an evaluation): cached or ran, key, run ids, model URI, wall time.
- `apply_gate` decides (gates.py) and promotes (`champion` alias), recording the decision as
  `lifecycle.gate.<stage>` and the metric `gate/<stage>/promoted`.
- `serve_record` is the serve smoke's record: the champion served, its start-up, smoke latency and
  TTFT (read from the serve run, cached or not).
- `end` ends the run FINISHED or FAILED with the total wall time.
"""

from __future__ import annotations

import json
import time

from dsv3 import tracking
from dsv3.lifecycle import plan
from dsv3.lifecycle.gates import Decision, decide


def begin(cfg, flow_run_id: str | None = None, force: str | None = None) -> str:
    tags = {"prefect_flow_run_id": flow_run_id, "lifecycle.force": force}
    with tracking.start_run(cfg, "lifecycle", run_name=f"{cfg.name}-lifecycle",
                            tags={k: v for k, v in tags.items() if v}) as run:
        run_id = run.info.run_id
    tracking.set_status(run_id, "RUNNING")
    return run_id


def hit(cfg, sk: plan.StageKey, force: str | None) -> dict | None:
    """The record of a finished identical stage in the store, else None (also when caching is off or forced)."""
    if not plan.use_cache(cfg, sk.stage, force):
        return None
    if sk.stage in plan.MODEL_OF:
        m = plan.cached_model(cfg, sk)
        if m is None:
            return None
        if tracking.CANDIDATE not in m["aliases"]:
            tracking.set_alias(m["name"], tracking.CANDIDATE, m["version"])
        return {"status": "cached", "key": sk.key, "model_uri": m["uri"], "model_run_id": m["run_id"]}
    r = plan.cached_run(cfg, sk, data_dir=cfg.data.out_dir if sk.stage == "data" else None)
    if r is None:
        return None
    rec = {"status": "cached", "key": sk.key, "run_id": r["run_id"], "metrics": r["metrics"]}
    if sk.stage == "data":
        rec["data_digest"] = r["tags"]["dvc_data_digest"]
    return rec


def mark_model(uri: str, sk: plan.StageKey) -> None:
    name, _, version = uri.removeprefix("models:/").rpartition("/")
    tracking.set_version_tags(name, version, {plan.KEY_TAG: sk.key, "lifecycle_stage": sk.stage,
                                              "code_digest": sk.code_digest})


def note(run_id: str, label: str, record: dict, kind: str = "stage") -> None:
    keep = {k: v for k, v in record.items() if k != "metrics"}
    tracking.set_run_tags(run_id, {f"lifecycle.{kind}.{label}": json.dumps(keep, sort_keys=True)})
    if record.get("data_digest"):
        tracking.set_run_tags(run_id, {"dvc_data_digest": record["data_digest"]})
    if record.get("wall_s") is not None:
        tracking.log_metrics_to(run_id, {f"lifecycle/wall_s/{label}": record["wall_s"]})


def apply_gate(cfg, run_id: str, model_stage: str, candidate: str, evals: dict[str, dict]) -> Decision:
    """Decide `candidate` (a `models:/NAME/VERSION`) against the current champion with the metrics in
    `evals` (model URI -> metrics); promote it when it passes; record the decision."""
    name = candidate.removeprefix("models:/").rpartition("/")[0]
    champion = tracking.resolve_stage_model(name, (tracking.CHAMPION,))
    g = getattr(cfg.lifecycle.gates, model_stage)
    d = decide(model_stage, g, candidate, evals.get(candidate, {}), champion, evals.get(champion or "", {}))
    if d.promote:
        tracking.promote(name, candidate.rpartition("/")[2])
    tracking.set_run_tags(run_id, {f"lifecycle.gate.{model_stage}": json.dumps(d.to_json())})
    tracking.log_metrics_to(run_id, {f"gate/{model_stage}/promoted": float(d.promote)})
    return d


def serve_record(rec: dict, champion: str, wall_s: float) -> dict:
    """The serve stage's record (`rec`: status, key, the serve run's id) with the figures of its run."""
    m = tracking.run_info(rec["run_id"]).data.metrics
    return {**{k: v for k, v in rec.items() if k != "metrics"}, "model_uri": champion, "wall_s": wall_s,
            "startup_s": m.get("serve/startup_s"), "smoke_latency_s": m.get("serve/smoke_latency_s"),
            "smoke_ttft_s": m.get("serve/smoke_ttft_s")}


def end(run_id: str, started: float, ok: bool = True, error: str | None = None) -> None:
    tracking.log_metrics_to(run_id, {"lifecycle/wall_s": time.time() - started})
    if error:
        tracking.set_run_tags(run_id, {"lifecycle.error": error[:4000]})
    tracking.set_status(run_id, "FINISHED" if ok else "FAILED")
