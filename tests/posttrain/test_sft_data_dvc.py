"""The SFT data as a DVC-versioned dataset: the real `sft_data` stage of dvc.yaml in a temporary
git repo (repro, no-op second repro, a posttrain.data param change re-runs it, metrics)."""

from __future__ import annotations

import json
import shutil

import yaml

from dsv3.posttrain.config import DataGenConfig

from ..dvc_helpers import ROOT, dvc, sh


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
    sh(r, "git", "init", "-q")
    dvc(r, "init", "-q")
    dvc(r, "config", "core.analytics", "false")
    sh(r, "git", "add", "-A")
    sh(r, "git", "commit", "-qm", "init")

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
