"""The `serve` flow in real Prefect flow runs (test server), on a real SQLite MLflow registry: the tiny
model registered twice as `dsv3-chat` with `champion` on version 1 (version 2 is the newest, the
`candidate`), so only a server started on the champion answers with the version checked. The real
`dsv3 serve` subprocess answers the official `openai` client, the MLflow run names the version, and
the process is gone afterwards; `keep_running` serves until the server is stopped with SIGINT; no
champion is an error naming what to run."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

SETTINGS = {"cache_tokens": 2048, "block_size": 8}


def _store(path):
    """A fresh SQLite MLflow store under `path`, the working directory moved there."""
    import mlflow

    mp = pytest.MonkeyPatch()
    uri = f"sqlite:///{path}/mlruns.db"
    mp.setenv("MLFLOW_TRACKING_URI", uri)
    mp.chdir(path)
    mlflow.set_tracking_uri(uri)
    return mp


def _register(model_dir, times: int, champion: str | None) -> None:
    from dsv3 import tracking

    for _ in range(times):
        with tracking.start_run({"x": 1}, stage="posttrain"):
            tracking.register_stage_model(model_dir, "dsv3-chat")
    if champion:
        tracking.promote("dsv3-chat", champion)


@pytest.fixture(scope="module")
def registered(tiny_dir, tmp_path_factory):
    """Two versions of `dsv3-chat`: 1 is the champion, 2 the newest (the candidate)."""
    import mlflow

    mp = _store(tmp_path_factory.mktemp("served"))
    _register(tiny_dir, 2, "1")
    yield
    mp.undo()
    mlflow.set_tracking_uri(None)


@pytest.fixture
def store(tmp_path):
    import mlflow

    mp = _store(tmp_path)
    yield tmp_path
    mp.undo()
    mlflow.set_tracking_uri(None)


def _run(**kw):
    from flows.serve import serve_flow

    state = serve_flow(threads=1, settings=SETTINGS, startup_timeout_s=240, return_state=True, **kw)
    return state, state.result(raise_on_failure=False)


@pytest.mark.timeout(400)
def test_serve_flow_smoke_on_the_champion(registered, prefect_harness):
    from dsv3 import tracking

    state, res = _run()
    assert state.is_completed(), res
    assert res["served"] == {"requested": "models:/dsv3-chat@champion", "uri": "models:/dsv3-chat/1",
                             "name": "dsv3-chat", "version": "1",
                             "run_id": tracking.model_version("models:/dsv3-chat/1").run_id}
    smoke = res["smoke"]
    assert smoke["card"]["id"] == "dsv3-chat" and smoke["card"]["version"] == "1"
    assert smoke["completion_tokens"] >= 1 and 0 < smoke["latency_s"] < 60
    assert smoke["ttft_s"] is None or 0 < smoke["ttft_s"] <= smoke["stream_s"]
    assert not psutil.pid_exists(res["pid"]), "the server outlived the flow run"

    run = tracking.run_info(res["run_id"])
    t, m = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED" and t["stage"] == "serve"
    assert (t["model_name"], t["model_version"], t["model_uri"]) == ("dsv3-chat", "1", "models:/dsv3-chat/1")
    assert t["requested_model_uri"] == "models:/dsv3-chat@champion" and t["serve.keep_running"] == "false"
    assert m["serve/smoke_latency_s"] == pytest.approx(smoke["latency_s"])
    assert m["serve/startup_s"] > 0 and m["serve/smoke_completion_tokens"] == smoke["completion_tokens"]
    log = open(res["log"]).read()  # the server logs the version it serves
    assert "models:/dsv3-chat/1 as `dsv3-chat`: dsv3-chat version 1" in log, log[-2000:]
    from mlflow.tracking import MlflowClient

    assert [a.path for a in MlflowClient().list_artifacts(res["run_id"], "serve")] == [
        f"serve/{os.path.basename(res['log'])}"]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_keep_running_until_stopped(registered, prefect_harness):
    """The long-running mode: the flow run lasts as long as the server; `kill -INT PID` (the pid the
    MLflow run is tagged with) stops the server and the flow run completes."""
    from dsv3 import tracking

    box: dict = {}
    th = threading.Thread(target=lambda: box.update(zip(("state", "res"), _run(keep_running=True))), daemon=True)
    th.start()
    deadline = time.time() + 300
    run = None
    while run is None and time.time() < deadline and th.is_alive():
        time.sleep(1)
        run = tracking.find_run({"stage": "serve", "serve.keep_running": "true"})  # recorded after the smoke
    assert run is not None, box
    pid = int(run.data.tags["serve.pid"])
    time.sleep(2)
    assert th.is_alive() and psutil.pid_exists(pid), "the flow run ended while the server should keep serving"
    os.kill(pid, signal.SIGINT)
    th.join(timeout=60)
    assert not th.is_alive()
    assert box["state"].is_completed() and box["res"]["exit_status"] == 0
    assert box["res"]["smoke"]["card"]["version"] == "1" and not psutil.pid_exists(pid)


@pytest.mark.timeout(300)
def test_no_champion_says_what_to_run(store, tiny_dir, prefect_harness, capsys):
    from dsv3 import tracking
    from flows.serve import main, serve_flow

    assert main([]) == 2  # an empty store
    err = capsys.readouterr().err
    assert "models:/dsv3-chat@champion" in err and "make lifecycle" in err and "make posttrain" in err
    _register(tiny_dir, 1, None)  # a candidate, but nothing promoted
    with pytest.raises(tracking.ModelNotFound, match="make lifecycle"):
        serve_flow()
    assert main(["--set", "max_batch=0"]) == 2 and "serve.max_batch" in capsys.readouterr().err
