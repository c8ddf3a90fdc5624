"""The real `mlflow server` (SQLite store, 127.0.0.1, a free port) serves what its UI reads:
the experiment kind tag, each stage run's model outputs and the logged models grouped by
source run (the runs table's Model column), eval metrics on the model page, alias lookup,
and a UI bundle that reads `mlflow.experimentKind` and the `workflowType` switch that
`tracking.experiment_url` sets. What the browser then draws is not checked here."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from dsv3 import tracking


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, store_uri: str, artifacts: str, log_path):
        self.base = f"http://127.0.0.1:{_free_port()}"
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner processes
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri, "--default-artifact-root",
             artifacts, "--host", "127.0.0.1", "--port", self.base.rsplit(":", 1)[1], "--workers", "1"],
            stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited {self.proc.returncode}: {open(log_path).read()[-2000:]}")
            try:
                if urllib.request.urlopen(self.base + "/health", timeout=2).read() == b"OK":
                    return
            except OSError:
                time.sleep(1)
        self.stop()
        raise TimeoutError(f"mlflow server not up in 180 s: {open(log_path).read()[-2000:]}")

    def get(self, path: str, raw: bool = False):
        body = urllib.request.urlopen(self.base + path, timeout=30).read()
        return body.decode() if raw else json.loads(body)

    def post(self, path: str, payload: dict) -> dict:
        req = urllib.request.Request(self.base + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req, timeout=30).read())

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()


@pytest.mark.slow
def test_mlflow_server_serves_model_column_and_training_view(chain, tmp_path):
    with tracking.start_run({"eval.limit": 2}, stage="eval", run_name="eval-chat") as ev:
        tracking.log_eval_metrics({"eval/bpb": 1.75}, "models:/dsv3-chat@candidate")
    srv = Server(chain["uri"], str(chain["root"] / "mlartifacts"), tmp_path / "server.log")
    try:
        api = "/ajax-api/2.0/mlflow"
        exp = srv.get(f"{api}/experiments/get-by-name?experiment_name=dsv3")["experiment"]
        assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == "custom_model_development"
        eid = exp["experiment_id"]

        runs = srv.post(f"{api}/runs/search", {"experiment_ids": [eid], "max_results": 100})["runs"]
        outputs = {r["info"]["run_id"]: [m["model_id"] for m in r.get("outputs", {}).get("model_outputs", [])]
                   for r in runs}
        for stage, sm in chain["models"].items():
            assert outputs[chain["runs"][stage]] == [sm.model_id], stage

        # the request the runs table sends; it groups the answer by source_run_id for its Model column
        models = srv.post(f"{api}/logged-models/search", {
            "experiment_ids": [eid], "order_by": [{"field_name": "creation_time", "ascending": False}]})["models"]
        by_run: dict[str, list[str]] = {}
        for m in models:
            by_run.setdefault(m["info"]["source_run_id"], []).append(m["info"]["name"])
        for stage in ("base", "long", "chat"):
            assert by_run[chain["runs"][stage]] == [f"dsv3-{stage}"]

        chat = chain["models"]["chat"]
        lm = srv.get(f"{api}/logged-models/{chat.model_id}")["model"]
        assert {(m["key"], m["run_id"]) for m in lm["data"]["metrics"]} >= {("eval/bpb", ev.info.run_id)}
        mv = srv.get(f"{api}/registered-models/alias?name=dsv3-chat&alias=candidate")["model_version"]
        assert mv["version"] == chat.version and mv["source"] == f"models:/{chat.model_id}"
        tags = {t["key"]: t["value"] for t in mv["tags"]}
        assert tags["parent_model"] == chain["models"]["long"].uri and "None" not in tags.values()
        run = srv.get(f"{api}/runs/get?run_id={ev.info.run_id}")["run"]
        assert [m["model_id"] for m in run["inputs"]["model_inputs"]] == [chat.model_id]

        # the served UI reads the tag and the workflow switch experiment_url sets
        html = srv.get("/", raw=True)
        main = re.search(r'src="([^"]*static/js/main\.[0-9a-f]+\.js)"', html).group(1)
        js = srv.get("/" + main.lstrip("./").lstrip("/"), raw=True)
        assert '"mlflow.experimentKind"' in js and '"workflowType"' in js and '"machine_learning"' in js
        url = tracking.experiment_url(srv.base, eid)
        assert url.startswith(srv.base + "/#/experiments/") and "workflowType=machine_learning" in url
    finally:
        srv.stop()
    assert srv.proc.poll() is not None
