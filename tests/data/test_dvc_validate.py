"""GX validation as the DVC stage `validate`: real `dvc repro` in a temporary git
repo runs the suites after `shards`, records data/validation.json as a metric, and a failing
suite (PII let through by `data.pii.enabled=false`) fails `dvc repro`; `read_validation` gives
the stage's result to the data flow and refuses a failed or stale one."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dsv3.data.validate import RESULT, ValidationFailed, read_validation
from dsv3.data.version import DATA_STAGES, data_digest

from ..dvc_helpers import ENV, ROOT, dvc, tiny_data_repo


def _params(repo: Path, **pii) -> None:
    p = yaml.safe_load((repo / "params.yaml").read_text())
    p["data"]["pii"].update(pii)
    (repo / "params.yaml").write_text(yaml.safe_dump(p, sort_keys=False))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    spec = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert "validate" in DATA_STAGES and spec["stages"]["validate"]["deps"][:2] == ["data/curated", "data/shards"]
    r = tiny_data_repo(tmp_path_factory.mktemp("repo"), "/gx/\n")
    (r / "first_repro.log").write_text(dvc(r, "repro"))
    return r


def test_dvc_repro_runs_gx_after_shards(repo):
    out = (repo / "first_repro.log").read_text()
    assert out.index("Running stage 'shards'") < out.index("Running stage 'validate'"), out
    assert "PASS suite curated_docs" in out and "PASS suite token_shards" in out, out
    res = read_validation(repo / "data")
    assert res["success"] and res["failed"] == 0
    assert set(res["suites"]) == {"curated_docs", "token_shards", "shard_totals"}
    assert res["data_digest"] == data_digest(repo / "data" / "shards", repo)
    assert Path(res["docs"].removeprefix("file://")).is_file() and (repo / "gx").is_dir()
    lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["validate"]
    assert [o["path"] for o in lock["outs"]] == [f"data/{RESULT}"]
    assert "validation.json" in dvc(repo, "metrics", "show")
    again = dvc(repo, "repro")
    assert "Running stage" not in again and "up to date" in again, again


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_a_failing_suite_fails_dvc_repro(repo):
    before = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["validate"]
    _params(repo, enabled=False)  # PII now reaches the curated docs: the no-residual-PII expectations fail
    r = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=repo, env=ENV, capture_output=True,
                       text=True, timeout=300)
    log = r.stdout + r.stderr
    assert r.returncode != 0, log
    assert "Running stage 'validate'" in log and "FAIL suite curated_docs" in log, log
    assert "expect_column_values_to_not_match_regex" in log and "failed to reproduce 'validate'" in log, log
    assert yaml.safe_load((repo / "dvc.lock").read_text())["stages"]["validate"] == before  # not recorded
    assert "validate" in dvc(repo, "status")
    res = read_validation(repo / "data", check=False)
    assert res["success"] is False and res["suites"]["curated_docs"]["failed"] >= 1
    with pytest.raises(ValidationFailed, match="Great Expectations validation failed"):
        read_validation(repo / "data")

    _params(repo, enabled=True)  # fixed: the pipeline reproduces (DVC's run cache restores the
    dvc(repo, "repro")  # earlier passing runs) and the recorded validation is the passing one again
    assert read_validation(repo / "data")["success"] and "up to date" in dvc(repo, "status")


def test_read_validation_refuses_missing_and_stale_results(tmp_path, repo):
    with pytest.raises(ValidationFailed, match=r"run `dvc repro validate`"):
        read_validation(tmp_path / "data")
    d = tmp_path / "data"  # a copy whose shards changed after validation
    shutil.copytree(repo / "data" / "shards", d / "shards")
    shutil.copy(repo / "data" / RESULT, d / RESULT)
    assert read_validation(d)["success"]
    with open(d / "shards" / "val.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ValidationFailed, match="validated shards .* is now"):
        read_validation(d)
    assert json.loads((d / RESULT).read_text())["success"]  # the record itself is left as it was
