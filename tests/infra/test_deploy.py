"""`make deploy` for real: infra/deploy.py starts a Prefect server on loopback,
creates the process work pool, registers prefect.yaml's deployments (typed parameter forms) and
starts a process worker; a deployment run triggered through the Prefect API (`run_deployment`)
completes on that worker; `deploy.py down` stops what `up` started. The run is the data flow on a
tiny corpus in a temporary repo copy (real DVC, GX, MLflow)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ..dvc_helpers import ENV, ROOT, tiny_data_repo

DEPLOY = ROOT / "infra" / "deploy.py"


def test_prefect_yaml_declares_every_flow_with_a_process_pool():
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    deps = {d["name"]: d for d in spec["deployments"]}
    assert set(deps) == {"lifecycle", "data", "pretrain", "posttrain", "evaluate", "serve"}
    assert deps["lifecycle"]["entrypoint"] == "flows/lifecycle.py:lifecycle_flow"
    for name, d in deps.items():
        path, fn = d["entrypoint"].split(":")
        assert path == f"flows/{name}.py" and fn == f"{name}_flow", d
        assert d["work_pool"]["name"] == "dsv3"
        if (ROOT / path).is_file():  # the flow object is there, named as the deployment
            assert f"def {fn}(" in (ROOT / path).read_text() and f'@flow(name="{name}"' in (ROOT / path).read_text()


def _repo(tmp: Path) -> Path:
    (tmp / "repo").mkdir()
    return tiny_data_repo(tmp / "repo", "/gx/\n/.prefect/\n", dirs=("dsv3", "flows"), data_only=False,
                          files=("prefect.yaml",))


def _alive(pidfile: Path) -> bool:
    try:
        os.killpg(int(pidfile.read_text()), 0)
        return True
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return False


@pytest.mark.slow
@pytest.mark.timeout(480)
def test_make_deploy_then_run_deployment_completes_on_the_worker(tmp_path):
    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    sys.path.insert(0, str(ROOT / "infra"))
    from servers import free_port

    repo = _repo(tmp_path)
    state, port = tmp_path / "state", free_port()
    api = f"http://127.0.0.1:{port}/api"
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    env = {**ENV, "PREFECT_HOME": str(tmp_path / "prefect_home"), "MLFLOW_TRACKING_URI": uri,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, str(DEPLOY), "--port", str(port), "--state", str(state), "--repo", str(repo)]
    try:
        r = subprocess.run([*cmd[:2], "up", *cmd[2:]], env=env, capture_output=True, text=True, timeout=400)
        assert r.returncode == 0, r.stdout + r.stderr
        want = [d["name"] for d in yaml.safe_load((repo / "prefect.yaml").read_text())["deployments"]
                if (repo / d["entrypoint"].split(":")[0]).is_file()]
        assert f"registered deployments: {', '.join(want)}" in r.stdout, r.stdout
        assert _alive(state / "server.pid") and _alive(state / "worker.pid")
        with temporary_settings({PREFECT_API_URL: api}):
            with get_client(sync_client=True) as c:
                deps = {d.name: d for d in c.read_deployments()}
                assert set(want) <= set(deps)
                pool = c.read_work_pool("dsv3")
                assert pool.type == "process"
            forms = {"data": "DataConfig", "pretrain": "RunConfig", "posttrain": "RunConfig", "evaluate": "EvalConfig",
                     "lifecycle": "RunConfig"}
            serve = deps["serve"].parameter_openapi_schema["properties"]  # plain typed parameters
            assert {k: serve[k]["type"] for k in ("model_uri", "port", "keep_running")} == {
                "model_uri": "string", "port": "integer", "keep_running": "boolean"}
            for name in set(want) - {"serve"}:  # a typed form: the pydantic config's fields are in the schema
                schema = deps[name].parameter_openapi_schema
                defs = schema.get("definitions") or schema.get("$defs") or {}
                assert forms[name] in defs and "properties" in defs[forms[name]], (name, list(defs))
            assert "sources" in (deps["data"].parameter_openapi_schema.get("definitions") or {})["DataConfig"]["properties"]
            run = run_deployment("data/data", parameters={"repo": str(repo)}, timeout=360)
            assert run.state.is_completed(), (run.state, (state / "worker.log").read_text()[-4000:])
        runs = mlflow.MlflowClient(uri).search_runs(
            [e.experiment_id for e in mlflow.MlflowClient(uri).search_experiments()],
            filter_string="tags.stage = 'data'")
        assert len(runs) == 1 and runs[0].data.tags["prefect_flow_run_id"] == str(run.id)
        assert runs[0].data.tags["dvc_data_digest"].endswith(".dir")
        lock = yaml.safe_load((repo / "dvc.lock").read_text())["stages"]
        assert {"curate", "tokenizer", "shards", "validate"} <= set(lock)  # ran in the repo the deployment names
    finally:
        d = subprocess.run([*cmd[:2], "down", *cmd[2:]], env=env, capture_output=True, text=True, timeout=120)
    assert d.returncode == 0 and "worker: stopped" in d.stdout and "server: stopped" in d.stdout, d.stdout + d.stderr
    assert not _alive(state / "server.pid") and not (state / "worker.pid").exists()
