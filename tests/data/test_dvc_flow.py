"""Real DVC (repro / no-op / param change / metrics / push+pull) and the real Prefect flow
(dvc repro -> GX -> MLflow + markdown artifact) in a temporary git repo copy."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from dsv3.data.version import data_digest, dir_md5, lock_outs

from ..dvc_helpers import dvc, tiny_data_repo


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    # the data stages only (sft_data, the post-training SFT data, has its own test in tests/posttrain)
    r = tiny_data_repo(tmp_path_factory.mktemp("repo"), "/gx/\nmlruns.db\nmlartifacts/\n",
                       remote=tmp_path_factory.mktemp("remote"))
    out = dvc(r, "repro")
    assert all(f"Running stage '{s}'" in out for s in ("curate", "tokenizer", "shards")), out
    return r


def test_dvc_second_repro_is_noop(repo):
    out = dvc(repo, "repro")
    assert "Data and pipelines are up to date" in out and "Running stage" not in out, out
    assert "up to date" in dvc(repo, "status")
    m = dvc(repo, "metrics", "show", "--json")
    metrics = json.loads(m)
    flat = json.dumps(metrics)
    assert '"kept": 11' in flat and '"exact_dup": 1' in flat and "vocab_size" in flat


def _lock_md5(repo: Path, out: str) -> str:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
    return next(o["md5"] for st in lock.values() for o in st.get("outs", []) if o["path"] == out)


def test_data_digest_is_dvcs_md5_of_the_shards(repo, tmp_path):
    want = _lock_md5(repo, "data/shards")
    assert want.endswith(".dir")
    assert data_digest(repo / "data" / "shards", repo) == want  # through dvc.lock
    assert dir_md5(repo / "data" / "shards") == want  # computed from the files: DVC's own value
    copy = tmp_path / "data" / "shards"  # outside any DVC repo: computed, same value
    shutil.copytree(repo / "data" / "shards", copy)
    assert data_digest(copy, tmp_path) == want
    shutil.copy(repo / "dvc.lock", tmp_path / "dvc.lock")  # a lock that no longer matches the files
    with open(copy / "val.bin", "ab") as f:
        f.write(b"\0\0")
    changed = data_digest(copy, tmp_path)
    assert changed != want and changed == dir_md5(copy)
    outs = lock_outs(repo)
    assert set(outs) == {"data/curated", "data/tokenizer", "data/shards"} and outs["data/shards"] == want


def test_dvc_tokenizer_param_reruns_only_tokenizer_and_later(repo):
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["data"]["tokenizer"]["vocab_size"] = 300
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))
    out = dvc(repo, "repro")
    assert "Stage 'curate' didn't change, skipping" in out, out
    assert "Running stage 'tokenizer'" in out and "Running stage 'shards'" in out, out
    assert json.loads((repo / "data" / "shards" / "index.json").read_text())["vocab_size"] == 300


def test_dvc_push_pull_local_remote(repo):
    dvc(repo, "push")
    shutil.rmtree(repo / "data" / "shards")
    shutil.rmtree(repo / ".dvc" / "cache")
    dvc(repo, "pull")
    assert (repo / "data" / "shards" / "index.json").is_file()
    assert "up to date" in dvc(repo, "status")


@pytest.mark.slow
@pytest.mark.timeout(500)
def test_prefect_flow_logs_version_and_stats(repo, prefect_harness, tmp_path, monkeypatch):
    import mlflow
    from prefect.client.orchestration import get_client

    from flows.data import data_flow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlruns.db")
    res = data_flow(repo=str(repo))
    digest = _lock_md5(repo, "data/shards")
    assert res["digest"] == digest and res["outs"] == lock_outs(repo)
    assert res["metrics"]["data/train/tokens"] > 0
    assert res["validation"]["success"] and Path(res["validation"]["docs"].removeprefix("file://")).is_file()
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlruns.db").get_run(res["run_id"])
    assert run.data.tags["dvc_data_digest"] == digest
    assert run.data.metrics["data/input"] == 19 and run.data.metrics["data/bucket/exact_dup"] == 1
    assert [i.dataset.digest for i in run.inputs.dataset_inputs] == [digest]
    with get_client(sync_client=True) as c:
        arts = [a for a in c.read_artifacts() if a.key == "data-stats"]
    assert arts and digest in arts[0].data
