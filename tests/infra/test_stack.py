"""The server-mode stack (infra/stack.py) brought up for real in a temp state dir, used through each
component's own client, then brought down: nothing of it may be left running or listening.

Each check runs in a subprocess with the stack's exports (what `source .stack/env` gives a user), so
the test process's own MLflow / Prefect / Ray settings stay untouched."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.infra.stack_helpers import REPO, run_py as _py, stack_cmd as _stack  # fixture `stack`: conftest.py

pytestmark = pytest.mark.slow


def test_up_is_idempotent_and_status_healthy(stack):
    r = _stack(stack["state"], "up")
    assert r.returncode == 0, r.stderr
    after = json.loads((stack["state"] / "state.json").read_text())
    assert {k: v["pid"] for k, v in after["procs"].items()} == {k: v["pid"] for k, v in stack["st"]["procs"].items()}
    assert len(after["procs"]) == 7
    s = _stack(stack["state"], "status")
    assert s.returncode == 0 and s.stdout.count("healthy") == 7, s.stdout + s.stderr


def test_everything_but_rays_grpc_listens_on_loopback_only(stack):
    sys.path.insert(0, str(REPO / "infra"))
    import stack as stack_mod

    wide, ray_wide = [], []
    for p in stack_mod.marked_processes(stack["st"]["id"]):
        try:
            socks = [c.laddr for c in p.net_connections("tcp") if c.status == "LISTEN"]
            name = " ".join(p.cmdline()) or p.name()
        except Exception:  # exited meanwhile
            continue
        for addr in socks:
            if addr.ip not in ("127.0.0.1", "::1"):
                is_ray = "/ray/" in name or name.startswith("ray::") or " -m ray." in name
                (ray_wide if is_ray else wide).append((name[:80], addr))
    assert wide == [], wide  # PostgreSQL, S3, MLflow, Prefect server + worker, Ray's dashboard
    listening = {a.port for p in stack_mod.marked_processes(stack["st"]["id"])
                 for a in [c.laddr for c in p.net_connections("tcp") if c.status == "LISTEN"]}
    ports = stack["st"]["ports"]
    for k in ("postgres", "s3", "mlflow", "prefect", "worker_health", "head_dashboard", "head_gcs"):
        assert ports[k] in listening, k


def test_mlflow_run_artifact_lands_in_s3_and_metric_in_postgres(stack, tmp_path):
    env, payload = stack["env"], f"stack artifact {uuid.uuid4()}"
    out = _py(f"""
        import json, os, mlflow
        from mlflow.tracking import MlflowClient
        mlflow.set_experiment("stack-test")
        with mlflow.start_run() as run:
            mlflow.log_metric("loss", 1.25, step=3)
            open("note.txt", "w").write({payload!r})
            mlflow.log_artifact("note.txt", artifact_path="notes")
        os.remove("note.txt")
        back = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="notes/note.txt")
        hist = MlflowClient().get_metric_history(run.info.run_id, "loss")
        print(json.dumps({{"run_id": run.info.run_id, "artifact_uri": run.info.artifact_uri,
                          "back": open(back).read(), "metric": [(m.step, m.value) for m in hist]}}))
    """, env, tmp_path)
    assert out["artifact_uri"].startswith("mlflow-artifacts:")  # proxied by the server, not a client path
    assert out["back"] == payload and out["metric"] == [[3, 1.25]]
    # the object is in the S3 store, under the server's --artifacts-destination
    sys.path.insert(0, str(REPO / "infra"))
    import stack as stack_mod

    s3 = stack_mod.s3_client(env)
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="dsv3-mlflow", Prefix="artifacts/")["Contents"]]
    key = next(k for k in keys if k.endswith(f"{out['run_id']}/artifacts/notes/note.txt"))
    assert s3.get_object(Bucket="dsv3-mlflow", Key=key)["Body"].read().decode() == payload
    # the metric row is in PostgreSQL (the tracking server's backend store)
    import psycopg

    sec, port = stack["st"]["secrets"], stack["st"]["ports"]["postgres"]
    with psycopg.connect(host="127.0.0.1", port=port, user=sec["pg_user"], password=sec["pg_password"],
                         dbname="mlflow") as c:
        rows = c.execute("SELECT step, value FROM metrics WHERE run_uuid = %s AND key = 'loss'",
                         (out["run_id"],)).fetchall()
    assert rows == [(3, 1.25)]


FLOW = '''
import os
from prefect import flow, get_run_logger
from prefect.runtime import flow_run


@flow(name="stack-tiny")
def tiny(x: int) -> int:
    import mlflow

    mlflow.set_experiment("stack-flow")
    with mlflow.start_run(tags={"prefect_flow_run_id": str(flow_run.id), "cwd": os.getcwd()}):
        mlflow.log_metric("x_plus_one", x + 1)
    get_run_logger().info("tiny ran in %s", os.getcwd())
    return x + 1
'''


def test_prefect_deployment_runs_on_the_process_pool_worker(stack, tmp_path):
    src = tmp_path / "flowsrc"
    src.mkdir()
    (src / "tiny_flow.py").write_text(FLOW)
    out = _py(f"""
        import json
        from prefect import flow
        from prefect.deployments import run_deployment
        flow.from_source(source={str(src)!r}, entrypoint="tiny_flow.py:tiny").deploy(
            name="stack-test", work_pool_name="dsv3", print_next_steps=False)
        fr = run_deployment("stack-tiny/stack-test", parameters={{"x": 20}}, timeout=240)
        import mlflow
        runs = mlflow.search_runs(experiment_names=["stack-flow"], output_format="list",
                                  filter_string=f"tags.prefect_flow_run_id = '{{fr.id}}'")
        print(json.dumps({{"state": fr.state.type.value, "id": str(fr.id),
                          "metrics": [r.data.metrics for r in runs]}}))
    """, stack["env"], tmp_path)
    assert out["state"] == "COMPLETED", out
    # the worker ran it (a separate process started by the stack) with the stack's env: it logged
    # to the stack's MLflow under this flow run's id
    assert out["metrics"] == [{"x_plus_one": 21.0}]


def test_prefect_server_accepts_the_k8s_work_pool_template(stack):
    env = {**os.environ, **stack["env"]}
    tmpl = REPO / "infra" / "k8s" / "prefect-k8s-work-pool.json"
    r = subprocess.run([str(Path(sys.executable).parent / "prefect"), "work-pool", "create", "dsv3-k8s", "--type",
                        "kubernetes", "--base-job-template", str(tmpl)], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    import urllib.request

    with urllib.request.urlopen(f"{stack['env']['PREFECT_API_URL']}/work_pools/dsv3-k8s", timeout=10) as resp:
        pool = json.loads(resp.read())
    assert pool["type"] == "kubernetes" and pool["base_job_template"] == json.loads(tmpl.read_text())


def test_ray_task_on_each_node_with_its_own_working_dir(stack, tmp_path):
    out = _py("""
        import json, os, ray
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)

        @ray.remote(num_cpus=1)
        def where():
            return ray.get_runtime_context().get_node_id(), os.getcwd()

        alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        got = {node: ray.get(where.options(resources={f"dsv3_stack_{node}": 0.01}).remote())
               for node in ("head", "node2")}
        print(json.dumps({"alive": alive, "got": got}))
    """, stack["env"], tmp_path)
    (head_id, head_cwd), (node2_id, node2_cwd) = out["got"]["head"], out["got"]["node2"]
    assert len(out["alive"]) == 2 and {head_id, node2_id} == set(out["alive"])
    assert head_id != node2_id
    ray_dir = (stack["state"] / "ray").resolve()
    assert Path(head_cwd) == ray_dir / "head-work" and Path(node2_cwd) == ray_dir / "node2-work"
    # the job-submission API (what `ray job submit` and KubeRay's RayJob use), with the stack's token
    dash = f"http://127.0.0.1:{stack['st']['ports']['head_dashboard']}"
    job = _py(f"""
        import json, time
        from ray.job_submission import JobSubmissionClient, JobStatus
        c = JobSubmissionClient({dash!r})
        code = "import ray; ray.init(); print('alive', sum(n['Alive'] for n in ray.nodes()))"
        jid = c.submit_job(entrypoint="python -c " + json.dumps(code))
        t, done = time.time(), (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED)
        while c.get_job_status(jid) not in done and time.time() - t < 120:
            time.sleep(1)
        print(json.dumps({{"status": str(c.get_job_status(jid)), "logs": c.get_job_logs(jid)}}))
    """, stack["env"], tmp_path)
    assert job["status"].endswith("SUCCEEDED") and "alive 2" in job["logs"], job


def test_dvc_push_to_the_stack_remote(stack, tmp_path):
    env = {**os.environ, **stack["env"]}
    dvc = [sys.executable, "-m", "dvc"]

    def run(*cmd):
        r = subprocess.run(list(cmd), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, f"{cmd}: {r.stdout}\n{r.stderr}"

    run("git", "init", "-q")
    run(*dvc, "init", "-q")
    (tmp_path / "tokens.txt").write_text("shard 0\n" * 100)
    run(*dvc, "add", "-q", "tokens.txt")
    run(*dvc, "remote", "add", "-d", "stack", stack["env"]["DSV3_DVC_REMOTE"])
    run(*dvc, "remote", "modify", "stack", "endpointurl", stack["env"]["AWS_ENDPOINT_URL"])
    run(*dvc, "push", "-q")
    md5 = [ln.split(":")[1].strip() for ln in (tmp_path / "tokens.txt.dvc").read_text().splitlines()
           if "md5:" in ln][0]
    sys.path.insert(0, str(REPO / "infra"))
    import stack as stack_mod

    keys = [o["Key"] for o in stack_mod.s3_client(stack["env"]).list_objects_v2(Bucket="dsv3-dvc")["Contents"]]
    assert any(k.endswith(md5[2:]) and md5[:2] in k for k in keys), keys


def test_down_leaves_nothing_running_or_listening(stack):
    sys.path.insert(0, str(REPO / "infra"))
    import stack as stack_mod

    assert stack_mod.marked_processes(stack["st"]["id"]), "the marker must find the running stack"
    r = _stack(stack["state"], "down", timeout=300)
    assert r.returncode == 0, r.stderr
    assert stack_mod.marked_processes(stack["st"]["id"]) == []
    busy = {k: p for k, p in stack["st"]["ports"].items() if not stack_mod.port_free(p)}
    assert busy == {}
    s = _stack(stack["state"], "status")
    assert s.returncode == 3 and "healthy" not in s.stdout.replace("UNHEALTHY", "")
