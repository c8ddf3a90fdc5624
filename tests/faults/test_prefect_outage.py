"""The Prefect API going away mid-flow, with a real `prefect server start` (its own
PREFECT_HOME and SQLite database in tmp, 127.0.0.1, a free port) killed with SIGKILL and restarted on
the same port and database, and the tiny lifecycle (`python -m flows.lifecycle`) as a subprocess with
its own MLflow store in a temporary git + DVC repository.

- Mid-flow: the server is killed once the extension stage has started. The lifecycle exits within a
  bounded time with status 3 and one line naming the Prefect API (no traceback at the end); what
  finished is in the MLflow store: the data run, `dsv3-base` with its stage key; the lifecycle's MLflow
  run is FAILED and its report card says so.
- Restarted: the same command re-run finishes; the stages finished before the outage are Cached in
  Prefect and get no new model version; the rest run.
- No server at the start: exit 3 within seconds, the same one line.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.lifecycle.conftest import TINY, make_repo

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "infra"))
from servers import free_port, start_detached, wait_until_up  # noqa: E402

OFF = ("cancellation_cleanup", "foreman", "late_runs", "scheduler", "pause_expirations", "triggers", "event_logger",
       "repossessor", "cleanup_reconciler")
API_LOST = 3  # flows.lifecycle's exit status for it


class PrefectServer:
    """`prefect server start` on a fixed port and database, so that it can be killed and restarted as the
    same server. Only the services that record flow and task runs (events) are on."""

    def __init__(self, d: Path):
        self.d, self.port = d, free_port()
        self.api = f"http://127.0.0.1:{self.port}/api"
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.env = {"PREFECT_HOME": str(d / "home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_SERVER_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{d}/prefect.db",
                    **{f"PREFECT_SERVER_SERVICES_{s.upper()}_ENABLED": "false" for s in OFF}}

    def spawn(self) -> None:
        self.starts += 1
        self.t0 = time.monotonic()
        self.proc = start_detached([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                                    "--port", str(self.port)], self.d / f"server-{self.starts}.log",
                                   self.d / "server.pid", self.env, self.d)

    def wait(self, timeout: float = 180) -> float:
        """Seconds from spawn until the API answered."""
        try:
            log = self.d / f"server-{self.starts}.log"
            wait_until_up(f"{self.api}/health", timeout, self.proc, log, "prefect server")
        except RuntimeError:
            self.kill()
            raise
        return time.monotonic() - self.t0

    def kill(self) -> None:
        """The server crashes: SIGKILL to its whole process group."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


def _lifecycle(repo: Path, api: str, out: Path, store: Path | None = None) -> subprocess.Popen:
    """`python -m flows.lifecycle` on the tiny config in `repo`, output (both streams) to `out`."""
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_HOME": str(out.parent / "client-home"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{store or repo / 'mlruns.db'}", "PYTHONPATH": str(ROOT),
           "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    with open(out, "w") as f:
        return subprocess.Popen([sys.executable, "-m", "flows.lifecycle", "--config", TINY], cwd=repo, env=env,
                                stdout=f, stderr=subprocess.STDOUT, start_new_session=True)


def _wait_for(p: subprocess.Popen, out: Path, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in out.read_text(errors="replace"):
            return
        assert p.poll() is None, f"the lifecycle exited ({p.returncode}) before {text!r}:\n{out.read_text()[-3000:]}"
        time.sleep(0.2)
    raise TimeoutError(f"no {text!r} after {timeout} s")


def _finish(p: subprocess.Popen, timeout: float) -> int | None:
    """The exit status, or None when it is still running after `timeout` s (then killed)."""
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(30)
        return None


def _finished(client) -> dict[str, int]:
    """{registered model: its number of versions} for the models whose stage finished (a version carries
    the stage key, written once the stage's subflow returned)."""
    from dsv3.lifecycle.plan import KEY_TAG

    out = {}
    for rm in client.search_registered_models():
        vs = client.search_model_versions(f"name='{rm.name}'")
        if any(KEY_TAG in (v.tags or {}) for v in vs):
            out[rm.name] = len(vs)
    return out


def _task_states(api: str, timeout: float = 60) -> dict[str, str]:
    """{task run name without its suffix: state name} of the newest Completed lifecycle flow run (polled:
    the server records task runs from events, a little after the flow run ends)."""
    import re

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterId
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    deadline = time.monotonic() + timeout
    with temporary_settings({PREFECT_API_URL: api}), get_client(sync_client=True) as c:
        while True:
            runs = c.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["lifecycle"])),
                                    sort=FlowRunSort.START_TIME_DESC)
            done = [r for r in runs if r.state and r.state.name == "Completed"]
            states = {}
            if done:
                tasks = c.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[done[0].id])))
                states = {re.sub(r"-[0-9a-f]{3}$", "", t.name): t.state.name for t in tasks if t.state}
            if "report" in states or time.monotonic() > deadline:
                return {"_first_run": runs[-1].state.name if runs else None, **states}
            time.sleep(1)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_prefect_server_killed_mid_flow_then_rerun_resumes_from_cache(tmp_path):
    from mlflow.tracking import MlflowClient

    server = PrefectServer(tmp_path)
    server.spawn()  # meanwhile: the repository and an initialised MLflow store (~10 s each on a busy box)
    try:
        repo = make_repo(tmp_path / "repo")
        MlflowClient(f"sqlite:///{repo}/mlruns.db").search_experiments()
        t_start = server.wait()
    except BaseException:
        server.kill()
        raise
    out1, out2 = tmp_path / "run1.log", tmp_path / "run2.log"
    p = _lifecycle(repo, server.api, out1)
    try:
        _wait_for(p, out1, "for flow 'extend'", 300)  # the extension stage has started: its subflow runs
        server.kill()
        t0 = time.monotonic()
        rc = _finish(p, 180)
        fail_s = time.monotonic() - t0
    finally:
        server.kill()
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    log1 = out1.read_text(errors="replace")
    assert rc is not None, f"the lifecycle hung after the Prefect API went away:\n{log1[-3000:]}"
    tail = log1[log1.rfind("lifecycle failed:"):]
    assert rc == API_LOST and tail.startswith(f"lifecycle failed: the Prefect API at {server.api} cannot be reached"), \
        log1[-3000:]
    assert "Traceback" not in tail and "re-run" in tail

    # ---- nothing finished is lost: the data run and the base model with its stage key; the run FAILED ----
    client = MlflowClient(f"sqlite:///{repo}/mlruns.db")
    before = _finished(client)
    assert before.get("dsv3-base") == 1, before
    exp = client.get_experiment_by_name("dsv3").experiment_id
    (life,) = client.search_runs([exp], "tags.stage = 'lifecycle'")
    assert life.info.status == "FAILED" and "lifecycle.stage.data" in life.data.tags
    assert "lifecycle.stage.pretrain" in life.data.tags and "ConnectError" in life.data.tags["lifecycle.error"]
    assert {a.path for a in client.list_artifacts(life.info.run_id, "report")} == {"report/report.md",
                                                                                 "report/report.png"}
    card = (repo / "runs/lifecycle-tiny/reports" / life.info.run_id / "report.md").read_text()
    assert "**failed**" in card and "| pretrain | ran |" in card  # the card says how far it got

    # ---- the server is back (same database): the re-run resumes from the cached stages ------------------
    server.spawn()
    try:
        t_restart = server.wait()
        t0 = time.monotonic()
        p = _lifecycle(repo, server.api, out2)
        rc2 = _finish(p, 600)
        rerun_s = time.monotonic() - t0
        assert rc2 == 0, out2.read_text(errors="replace")[-3000:]
        states = _task_states(server.api)
    finally:
        server.kill()
    after = _finished(client)
    assert {"dsv3-base", "dsv3-long", "dsv3-chat"} <= set(after)
    assert all(after[name] == n for name, n in before.items()), (before, after)  # no new version for them
    cached = ["data", "pretrain"] + [s for s, m in (("extend", "dsv3-long"), ("posttrain", "dsv3-chat")) if m in before]
    assert all(states.get(s) == "Cached" for s in cached), states
    assert all(states.get(s) == "Completed" for s in ("extend", "posttrain") if s not in cached), states
    print(f"prefect server up in {t_start:.0f} s (restart {t_restart:.0f} s); lifecycle failed {fail_s:.0f} s after "
          f"the kill (exit {rc}); re-run {rerun_s:.0f} s; finished before the kill: {before}; first run in "
          f"Prefect: {states['_first_run']}; re-run task states: {states}")


def test_no_prefect_server_at_the_start_fails_fast_and_clearly(tmp_path):
    api = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    out = tmp_path / "run.log"
    t = time.monotonic()
    p = _lifecycle(ROOT, api, out, store=tmp_path / "mlruns.db")
    rc = _finish(p, 120)
    log = out.read_text(errors="replace")
    assert rc == API_LOST, log[-3000:]
    tail = log[log.rfind("lifecycle failed:"):]
    assert tail.startswith(f"lifecycle failed: the Prefect API at {api} cannot be reached") and "Traceback" not in tail
    assert time.monotonic() - t < 90
    assert not (tmp_path / "mlruns.db").exists()  # nothing ran
