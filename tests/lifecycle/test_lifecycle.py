"""End to end: the `lifecycle` flow on the tiny preset, through real Prefect (test server), DVC, MLflow
(SQLite in tmp): every stage runs and hands its model on through the registry; a second run is all
Cached and writes no model version; a run that fails in post-training leaves the earlier stages as
hits; a changed post-training parameter re-runs post-training and evaluation only; `--force eval`
re-scores the models without retraining."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import TINY

LINEAGE = ("git_commit", "config_digest", "dvc_data_digest", "prefect_flow_run_id", "mlflow_run_id")


def _run(cfg, force=None):
    from flows.lifecycle import lifecycle_flow

    state = lifecycle_flow(cfg, force=force, return_state=True)
    return state.state_details.flow_run_id, state.result(raise_on_failure=True)


def _prefect(flow_run_id):
    """({task run name: state name} of the flow run, names of the subflows it started, {artifact key:
    artifact} of the run and its subflows)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as c:
        tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        ids = {t.id for t in tasks}
        subflows = [f for f in c.read_flow_runs() if f.parent_task_run_id in ids]
        flows = {f.flow_id: c.read_flow(f.flow_id).name for f in subflows}
        runs = {flow_run_id} | {f.id for f in subflows}
        arts = {a.key: a for a in c.read_artifacts() if a.flow_run_id in runs and a.key}
    states = {re.sub(r"-[0-9a-f]{3}$", "", t.name): t.state.name for t in tasks}
    return states, sorted(flows[f.flow_id] for f in subflows), arts


def _versions(client, name):
    return {v.version: v for v in client.search_model_versions(f"name='{name}'")}


def _no_none_tags(client, exp_id):
    bad = [(r.info.run_id, k) for r in client.search_runs([exp_id], max_results=500)
           for k, v in r.data.tags.items() if v == "None"]
    for rm in client.search_registered_models():
        bad += [(f"{rm.name}/{v.version}", k) for v in client.search_model_versions(f"name='{rm.name}'")
                for k, val in (v.tags or {}).items() if val == "None"]
    return bad


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_lifecycle_end_to_end(repo, prefect_harness):
    from mlflow.tracking import MlflowClient

    from dsv3 import tracking
    from dsv3.config import RunConfig
    from dsv3.data.version import data_digest
    from dsv3.lifecycle import plan

    cfg = RunConfig.load(TINY)
    client = MlflowClient()

    # ---- first run: every stage runs, in order, each a subflow --------------------------------
    fid, res = _run(cfg)
    st = res["stages"]
    assert [st[s]["status"] for s in ("data", "pretrain", "extend", "posttrain")] == ["ran"] * 4
    assert {k: v["status"] for k, v in res["evals"].items()} == {"base": "ran", "long": "ran", "chat": "ran"}
    states, subflows, art = _prefect(fid)
    assert {states[s] for s in ("data", "pretrain", "extend", "posttrain")} == {"Completed"}
    assert subflows == sorted(["data", "pretrain", "extend", "posttrain", "evaluate", "evaluate", "evaluate",
                               "serve"])
    digest = st["data"]["data_digest"]
    assert digest == data_digest(repo / "data" / "shards")

    # ---- the registry: three models, aliases, lineage chat -> long -> base --------------------------
    uris = {m: st[s]["model_uri"] for s, m in plan.MODEL_OF.items()}
    assert uris == {"base": "models:/dsv3-base/1", "long": "models:/dsv3-long/1", "chat": "models:/dsv3-chat/1"}
    sections = {"base": "pretrain", "long": "extend", "chat": "posttrain"}
    for m, uri in uris.items():
        mv = client.get_model_version(f"dsv3-{m}", "1")
        assert set(mv.aliases) == {"candidate", "champion"}, (m, mv.aliases)  # first ones: no champion to beat
        assert all(mv.tags.get(k) for k in LINEAGE), (m, mv.tags)
        assert mv.tags["config_digest"] == tracking.config_digest(plan.prepared(cfg).section(sections[m]))
        assert mv.tags[plan.KEY_TAG] == st[sections[m]]["key"]
        assert mv.run_id == st[sections[m]]["model_run_id"] == mv.tags["mlflow_run_id"]
    base, long_, chat = (client.get_model_version(f"dsv3-{m}", "1") for m in ("base", "long", "chat"))
    assert "parent_model" not in base.tags and base.tags["dvc_data_digest"] == digest
    assert long_.tags["parent_model"] == uris["base"] and long_.tags["dvc_data_digest"] == digest
    assert chat.tags["parent_model"] == uris["long"] and st["posttrain"]["init"] == uris["long"]
    assert tracking.run_info(chat.run_id).data.tags["parent_checkpoint"] == uris["long"]

    # ---- evaluation runs linked to the version they scored; gates recorded; no "None" tag ----------
    exp = client.get_experiment_by_name("dsv3").experiment_id
    for m, uri in uris.items():
        ev = tracking.run_info(res["evals"][m]["run_id"])
        assert (ev.data.tags["model_name"], ev.data.tags["model_version"]) == (f"dsv3-{m}", "1")
        assert {"eval/bpb", "eval/arith/acc"} <= set(ev.data.metrics)
        logged = client.get_logged_model(ev.data.tags["model_id"])
        assert {x.key for x in logged.metrics} >= {"eval/bpb", "eval/arith/acc"}  # on the model's page too
        assert res["gates"][m]["promote"] and "no champion yet" in res["gates"][m]["reason"]
    assert not _no_none_tags(client, exp)

    # ---- the last stage served the promoted chat champion and recorded the version that answered ---
    sv = res["serve"]
    assert sv["status"] == "ran" and sv["model_uri"] == uris["chat"] and states["serve"] == "Completed"
    served = tracking.run_info(sv["run_id"]).data
    assert (served.tags["model_version"], served.tags["mlflow.parentRunId"]) == ("1", res["run_id"])
    assert served.metrics["serve/smoke_latency_s"] == sv["smoke_latency_s"] > 0

    # ---- report card and Prefect artifacts ---------------------------------------------------------
    md = Path(res["report"]["markdown"]).read_text()
    assert Path(res["report"]["png"]).stat().st_size > 10_000
    assert digest in md and "| posttrain | ran |" in md and "models:/dsv3-chat/1" in md and "no champion yet" in md
    assert f"| {uris['chat']} | ran |" in md.split("## Serving")[1]  # the serving row: version, smoke latency
    arts = {a.path for a in client.list_artifacts(res["run_id"], "report")}
    assert arts == {"report/report.md", "report/report.png"}
    assert {"lifecycle-report", "lifecycle-models", "lifecycle-run", "pretrain-run", "posttrain-run",
            "eval-run"} <= set(art)
    assert art["pretrain-progress"].data == 100 and art["grpo-progress"].data == 100
    assert "workflowType=machine_learning" in art["lifecycle-run"].data
    assert all(x in str(art["lifecycle-models"].data) for x in ("dsv3-base/1", "dsv3-long/1", "dsv3-chat/1"))
    first_wall = tracking.run_info(res["run_id"]).data.metrics["lifecycle/wall_s"]

    # ---- second run, nothing changed: all Cached, no new versions, a fraction of the time -----------
    fid2, res2 = _run(cfg)
    states2, subflows2, _ = _prefect(fid2)
    assert {states2[s] for s in ("data", "pretrain", "extend", "posttrain", "evaluate-base", "evaluate-long",
                                 "evaluate-chat", "serve")} == {"Cached"}
    assert subflows2 == []
    assert all(len(_versions(client, f"dsv3-{m}")) == 1 for m in uris)
    assert all(not g["promote"] and "champion already" in g["reason"] for g in res2["gates"].values())
    second_wall = tracking.run_info(res2["run_id"]).data.metrics["lifecycle/wall_s"]
    assert second_wall <= 0.1 * first_wall, (first_wall, second_wall)

    # ---- a run failing in post-training: earlier stages are hits, the lifecycle run is FAILED -------
    bad = RunConfig.load(TINY, ["posttrain.data.instructions_path=missing.jsonl"])
    with pytest.raises(Exception, match="missing.jsonl"):
        _run(bad)
    failed = client.search_runs([exp], "tags.stage = 'lifecycle'", order_by=["attributes.start_time DESC"])[0]
    assert failed.info.status == "FAILED" and "missing.jsonl" in failed.data.tags["lifecycle.error"]
    assert "cached" in failed.data.tags["lifecycle.stage.extend"]
    assert {a.path for a in client.list_artifacts(failed.info.run_id, "report")} == {"report/report.md",
                                                                                   "report/report.png"}
    failed_md = (repo / cfg.lifecycle.report_dir / failed.info.run_id / "report.md").read_text()
    assert "**failed**" in failed_md and "missing.jsonl" in failed_md and "| extend | cached |" in failed_md

    # ---- one post-training parameter changed: post-training and evaluation re-run, nothing else ------
    changed = RunConfig.load(TINY, ["posttrain.grpo.lr=0.001"])
    fid3, res3 = _run(changed)
    st3 = res3["stages"]
    assert [st3[s]["status"] for s in ("data", "pretrain", "extend", "posttrain")] == ["cached"] * 3 + ["ran"]
    assert st3["posttrain"]["model_uri"] == "models:/dsv3-chat/2" and st3["posttrain"]["init"] == uris["long"]
    assert client.get_model_version("dsv3-chat", "2").tags["parent_model"] == uris["long"]
    assert {k: v["status"] for k, v in res3["evals"].items()} == {
        "base": "cached", "long": "cached", "chat": "ran", "chat-champion": "cached"}
    assert len(_versions(client, "dsv3-base")) == len(_versions(client, "dsv3-long")) == 1
    g = res3["gates"]["chat"]  # compared with the champion scored the same way, in this run
    assert g["champion"] == uris["chat"] and g["candidate"] == "models:/dsv3-chat/2"
    champ = tracking.resolve_stage_model("dsv3-chat", ("champion",))
    assert champ == (g["candidate"] if g["promote"] else uris["chat"])
    # a new champion is served anew; the same one is a cache hit
    assert sorted(_prefect(fid3)[1]) == ["evaluate", "posttrain"] + (["serve"] if g["promote"] else [])
    assert (res3["serve"]["model_uri"], res3["serve"]["status"]) == (champ, "ran" if g["promote"] else "cached")

    # ---- --force eval: the models are re-scored, nothing retrained ----------------------------------
    # (serve smoke switched off: no stage key depends on the switch, and the smoke is not re-run)
    _, res4 = _run(RunConfig.load(TINY, ["posttrain.grpo.lr=0.001", "lifecycle.serve_smoke=false"]), force="eval")
    assert [res4["stages"][s]["status"] for s in ("data", "pretrain", "extend", "posttrain")] == ["cached"] * 4
    assert "serve" not in res4
    assert {v["status"] for v in res4["evals"].values()} == {"ran"}
    assert len(_versions(client, "dsv3-chat")) == 2
