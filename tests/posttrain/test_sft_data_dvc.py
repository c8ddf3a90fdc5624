"""The SFT data as a DVC-versioned dataset: the real `sft_data` stage of dvc.yaml in a temporary
git repo (repro, no-op second repro, a posttrain.data param change re-runs it, metrics)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from dsv3.posttrain.config import DataGenConfig

from ..dvc_helpers import ROOT, dvc, init_repo


def test_params_yaml_posttrain_data_mirrors_datagenconfig():
    p = yaml.safe_load((ROOT / "params.yaml").read_text())["posttrain"]["data"]
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]["sft_data"]
    keys = {k.removeprefix("posttrain.data.") for k in spec["params"]}
    assert set(p) == keys  # every key the stage reads is in params.yaml, and only those
    assert DataGenConfig(**p) == DataGenConfig()


def test_dvc_sft_data_stage(tmp_path):
    r = tmp_path / "repo"
    shutil.copytree(ROOT / "dsv3", r / "dsv3", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", r / "dvc.yaml")
    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    p["posttrain"]["data"].update(n_arithmetic=200, n_algebra=50, n_code=20)
    (r / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    init_repo(r)

    out = dvc(r, "repro", "sft_data")
    assert "Running stage 'sft_data'" in out and "Running stage 'curate'" not in out, out
    st = json.loads((r / "data" / "posttrain_stats.json").read_text())
    n = 200 + 50 + 20 + 20  # + max(10, n_arithmetic // 10) instruction pairs
    assert st["n_train"] + st["n_val"] == n and st["n_val"] == int(n * 0.05)
    assert sum(st["kinds_train"].values()) == st["n_train"] and set(st["kinds_train"]) == {
        "arithmetic", "algebra", "code", "instruction"}
    meta = json.loads((r / "data" / "posttrain" / "sft_train.meta.json").read_text())
    assert meta["sha256"] == st["sha256"] and meta["provenance"]["config"]["n_arithmetic"] == 200
    lock = yaml.safe_load((r / "dvc.lock").read_text())["stages"]["sft_data"]
    outs = {o["path"]: o["md5"] for o in lock["outs"]}
    assert set(outs) == {"data/posttrain", "data/posttrain_stats.json"}
    md5 = outs["data/posttrain"]

    out = dvc(r, "repro", "sft_data")
    assert "Running stage" not in out and "up to date" in out, out
    m = json.loads(dvc(r, "metrics", "show", "--json"))
    assert f'"n_train": {st["n_train"]}' in json.dumps(m)

    p["posttrain"]["data"]["seed"] = 1
    (r / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    assert "posttrain.data.seed" in dvc(r, "status", "sft_data")
    out = dvc(r, "repro", "sft_data")
    assert "Running stage 'sft_data'" in out, out
    st2 = json.loads((r / "data" / "posttrain_stats.json").read_text())
    assert st2["sha256"] != st["sha256"] and st2["n_train"] == st["n_train"]
    lock = yaml.safe_load((r / "dvc.lock").read_text())["stages"]["sft_data"]
    assert {o["path"]: o["md5"] for o in lock["outs"]}["data/posttrain"] != md5


def _repo(tmp_path):
    r = tmp_path / "repo"
    shutil.copytree(ROOT / "dsv3", r / "dsv3", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "dvc.yaml", r / "dvc.yaml")
    shutil.copy(ROOT / "params.yaml", r / "params.yaml")
    init_repo(r)
    return r


@pytest.mark.slow
def test_repro_sft_data_keeps_dvc_lock_fresh_and_matches_stage_data(tmp_path, monkeypatch):
    """What the post-training flow calls: the SFT data through `dvc repro sft_data` (dvc.lock
    fresh), the same records `stages.stage_data` writes, an MLflow run with the DVC md5."""
    import mlflow

    from dsv3.config import RunConfig
    from dsv3.posttrain.sft_data import read_dataset, repro_sft_data
    from dsv3.posttrain.stages import stage_data

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    r = _repo(tmp_path)
    small = ["posttrain.data.n_arithmetic=120", "posttrain.data.n_algebra=30", "posttrain.data.n_code=10"]
    cfg = RunConfig.load(None, ["preset=tiny", *small])
    res = repro_sft_data(r, cfg)
    assert "up to date" in dvc(r, "status", "sft_data")  # dvc.lock records exactly what is on disk
    lock = yaml.safe_load((r / "dvc.lock").read_text())["stages"]["sft_data"]
    assert {o["path"]: o["md5"] for o in lock["outs"]}["data/posttrain"] == res["dvc_md5"]
    assert lock["params"]["params.yaml"]["posttrain.data.n_arithmetic"] == 120  # the flow's config, mirrored
    assert yaml.safe_load((r / "params.yaml").read_text())["posttrain"]["data"]["n_code"] == 10

    ref = stage_data(cfg.model_copy(update={"posttrain": cfg.posttrain.model_copy(update={
        "data": cfg.posttrain.data.model_copy(update={"out_dir": str(tmp_path / "direct")})})}))
    assert set(ref) <= set(res) and res["sha256"] == ref["sha256"]  # same shape, same data
    assert read_dataset(res["train"]) == read_dataset(ref["train"]) and Path(res["val"]).is_file()
    assert res["n_train"] == len(read_dataset(res["train"]))
    run = mlflow.MlflowClient(uri).get_run(res["run_id"])
    assert run.data.tags["stage"] == "sft_data" and run.data.tags["dvc_data_digest"] == res["dvc_md5"]
    assert [i.dataset.digest for i in run.inputs.dataset_inputs] == [res["dvc_md5"][:36]]
    assert run.data.tags["sft_sha256"] == res["sha256"] and run.data.metrics["data/n_train"] == res["n_train"]

    again = repro_sft_data(r, cfg, track=False)  # unchanged: DVC skips the stage
    assert again["dvc_md5"] == res["dvc_md5"] and again["run_id"] is None
    changed = repro_sft_data(r, RunConfig.load(None, ["preset=tiny", *small, "posttrain.data.seed=3"]), track=False)
    assert changed["dvc_md5"] != res["dvc_md5"] and changed["sha256"] != res["sha256"]
    assert "up to date" in dvc(r, "status", "sft_data")
    with pytest.raises(ValueError, match="posttrain.data.teacher.*stage_data"):
        repro_sft_data(r, RunConfig.load(None, ["preset=tiny", "posttrain.data.teacher=/some/model"]))
