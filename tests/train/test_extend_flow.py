"""Context extension (two YaRN stages, passkey heatmaps) and the Prefect pretrain flow."""

import json
from pathlib import Path

import numpy as np

from dsv3 import tracking
from dsv3.train.extend import extend
from dsv3.train.loop import train
from dsv3.train.passkey import build_prompt
from tests.train.conftest import tiny_cfg


def test_passkey_prompt_places_needle():
    rng = np.random.default_rng(0)
    ids, ans = build_prompt(200, 0.5, rng, None, 512)
    assert len(ids) == 200 and ids[-len(ans):] == ans
    assert abs(ids.index(7) - 100) < 15  # the needle marker sits at half depth


def test_extend_two_yarn_stages(tiny_shards, tmp_path, mlflow_uri):
    cfg = tiny_cfg(tiny_shards, tmp_path / "run", "train.steps=2", "train.plots=true",
                   "train.register_model=true")
    base = train(cfg, track=False)
    res = extend(cfg, base.checkpoint)
    assert len(res["stages"]) == 2
    conf = json.loads((Path(res["model_dir"]) / "config.json").read_text())
    rs = conf["rope_scaling"]
    assert rs["type"] == "yarn" and rs["factor"] == 4.0 and rs["original_max_position_embeddings"] == 32
    assert rs["beta_fast"] == 32 and rs["beta_slow"] == 1 and conf["max_position_embeddings"] >= 128
    assert np.array(res["passkey_after"]).shape == (3, 3)
    run = tracking.run_info(res["run_id"])
    assert "passkey/after_mean" in run.data.metrics and run.data.tags["stage"] == "extend"
    from mlflow.tracking import MlflowClient

    arts = {a.path for a in MlflowClient().list_artifacts(res["run_id"], "plots")}
    assert {"plots/passkey_before.png", "plots/passkey_after.png"} <= arts
    child = tracking.run_info(res["stages"][1]["run_id"])
    assert child.data.tags["mlflow.parentRunId"] == res["run_id"]
    assert child.data.params["train.seq_len"] == "128"


def test_pretrain_flow_in_prefect(tiny_shards, tmp_path, mlflow_uri, capsys, prefect_harness):
    from flows.pretrain import pretrain_flow, summary

    cfg = tiny_cfg(tiny_shards, tmp_path / "flow", "train.steps=2",
                   "train.extend.stages=[{factor: 2, seq_len: 64, steps: 1, batch_size: 2}]")
    res = pretrain_flow(cfg, run_data=False, use_ray=False)
    text = summary(res, 1.0)
    assert res["run_id"] in text and "mlflow ui" in text and "prefect server start" in text
    assert res["extend"]["checkpoint"] in text
    pre = tracking.run_info(res["pretrain"]["run_id"])
    assert pre.data.tags["mlflow.parentRunId"] == res["run_id"]


def test_stage_shards_default_to_pretraining_data(tiny_shards, tmp_path):
    from dsv3.train.extend import stage_config

    cfg = tiny_cfg(tiny_shards, tmp_path / "run",
                   "train.extend.stages=[{factor: 2, seq_len: 64, steps: 1}, "
                   "{factor: 4, seq_len: 128, steps: 1, shards: /data/long}]")
    assert stage_config(cfg, 0, "x", 32).train.shards == tiny_shards
    assert stage_config(cfg, 1, "x", 32).train.shards == "/data/long"
