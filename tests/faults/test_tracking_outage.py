"""The MLflow tracking server going away, with a real `mlflow server` (SQLite store in tmp,
127.0.0.1, a free port) killed with SIGKILL and restarted on the same port and store.

- Mid-run: `dsv3 pretrain` keeps training while the server is down; the metrics logged meanwhile are
  buffered by dsv3.tracking's outbox and arrive once it is back: the run's metric history has every
  step, equal to metrics.jsonl, and the run ends FINISHED. One warning for the outage.
- At the end of a run: leaving the run does not hang or raise; what could not be delivered (metrics,
  tags, the FINISHED status) is spilled to disk and sent by the next run against that server.
- At the start: a server that is not there fails `start_run` within seconds with one clear line
  (`dsv3: tracking error: ...` naming the URI), before any step is run."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from dsv3 import tracking
from dsv3.errors import TrackingError
from tests.train.conftest import make_shards

ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/pretrain_tiny.yaml"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`mlflow server` on a fixed port and store, so that it can be killed and restarted as the same server."""

    def __init__(self, d: Path):
        self.d, self.port = d, _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 180) -> None:
        self.starts += 1
        log = open(self.d / f"server-{self.starts}.log", "w")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner processes
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{self.d}/store.db",
             "--default-artifact-root", (self.d / "artifacts").as_uri(), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        log.close()
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {(self.d / f'server-{self.starts}.log').read_text()[-2000:]}")
            try:
                if urllib.request.urlopen(self.uri + "/health", timeout=2).read() == b"OK":
                    return
            except OSError:
                time.sleep(0.5)
        self.kill()
        raise TimeoutError(f"mlflow server not up in {timeout} s")

    def kill(self) -> None:
        """The server crashes: SIGKILL to its whole process group (the web workers too)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("mlflow-server"))
    s.start()
    try:
        yield s
    finally:
        s.kill()


@pytest.fixture
def remote(server, monkeypatch):
    """Track to the server in this process; MLflow's HTTP settings (which `setup` defaults) restored after."""
    for k in tracking.runs.HTTP_DEFAULTS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
    monkeypatch.setattr(tracking.runs, "_EXPLICIT_URI", None)  # an earlier test's explicit store
    if server.proc is None or server.proc.poll() is not None:
        server.start()
    return server


def _steps(metrics: Path) -> dict[int, float]:
    out = {}
    if metrics.exists():
        for line in metrics.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                if "train/loss" in r:
                    out[r["step"]] = r["train/loss"]
    return out


def _wait_steps(p, metrics: Path, n: int, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert p.poll() is None, f"training exited early ({p.returncode})"
        done = len(_steps(metrics))
        if done >= n:
            return done
        time.sleep(0.05)
    raise TimeoutError(f"fewer than {n} steps after {timeout} s")


@pytest.mark.slow
def test_server_killed_and_restarted_mid_run(remote, tmp_path):
    shards = make_shards(tmp_path / "shards")
    run = tmp_path / "run"
    sets = [f"train.shards={shards}", f"train.out_dir={run}", f"train.tokenizer={run}/no-tokenizer",
            "train.steps=400", "train.eval_every=100", "train.ckpt_every=200", "train.threads=1",
            "train.plots=false", "train.precision=fp32", "train.log_checkpoints=false", "train.register_model=false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-m", "dsv3.cli", "pretrain", "--config", CONFIG,
                          *(f"--set={s}" for s in sets)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    try:
        _wait_steps(p, metrics, 5)
        remote.kill()
        killed_at = len(_steps(metrics))
        _wait_steps(p, metrics, killed_at + 10)  # training goes on while the server is down
        remote.start()
        back_at = len(_steps(metrics)) if p.poll() is None else None  # the server is back while training runs
        out, err = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err[-3000:]
    print(f"server killed at step {killed_at}, back at step {back_at}")
    assert back_at is not None and back_at < 400, "the server came back while the run was training"
    assert err.count("unreachable") == 1 and "is back after" in err, err[-3000:]  # one warning per outage
    run_id = json.loads(out[out.rindex("{"):])["run_id"]
    want = _steps(metrics)
    assert sorted(want) == list(range(1, 401))
    got = dict(tracking.metric_history(run_id, "train/loss"))
    assert got == want  # every step arrived, the ones logged while the server was down included
    assert [s for s, _ in tracking.metric_history(run_id, "val/loss")] == [100, 200, 300, 400]
    info = tracking.run_info(run_id)
    assert info.info.status == "FINISHED"
    assert info.data.params["train.steps"] == "400" and info.data.tags["checkpoint_uri"].endswith("step_00000400")


@pytest.mark.slow
def test_server_gone_at_the_end_of_a_run_spills_and_replays(remote, monkeypatch):
    """Also the memory bound: at most 4 records are kept (DSV3_TRACKING_BUFFER), the oldest are spilled."""
    monkeypatch.setenv("DSV3_TRACKING_FLUSH_S", "3")
    monkeypatch.setenv("DSV3_TRACKING_BUFFER", "4")
    with tracking.start_run({"lr": 0.1}, stage="outage") as run:
        tracking.log_metrics({"m": 1.0}, step=1)
        assert tracking.runs.flush(30)
        remote.kill()
        t = time.monotonic()
        for s in range(2, 6):
            tracking.log_metrics({"m": float(s)}, step=s)
        tracking.set_tags({"after": "outage"})
        assert time.monotonic() - t < 1.0, "logging never waits for the server"
        assert len(tracking.outbox.OUTBOX.q) <= 4
        t = time.monotonic()
    assert time.monotonic() - t < 30, "leaving the run is bounded"
    spilled = list((Path(os.environ["DSV3_CACHE_DIR"]) / "mlflow-outbox").glob("*.jsonl"))
    assert len(spilled) == 1
    ops = [json.loads(x) for x in spilled[0].read_text().splitlines()]
    assert sorted(op["step"] for op in ops if op["kind"] == "metrics") == [2, 3, 4, 5]
    assert [op["kind"] for op in ops[-2:]] == ["tags", "terminate"] and len(ops) == 6

    remote.start()
    monkeypatch.delenv("DSV3_TRACKING_BUFFER")  # a later process, with the default bound
    with tracking.start_run({"lr": 0.2}, stage="next"):  # sends what the last run spilled
        pass
    assert not list(spilled[0].parent.glob("*.jsonl*"))
    info = tracking.run_info(run.info.run_id)
    assert tracking.metric_history(run.info.run_id, "m") == [(s, float(s)) for s in range(1, 6)]
    assert info.data.tags["after"] == "outage" and info.info.status == "FINISHED"


def test_no_server_at_the_start_fails_fast_and_clearly(tmp_path, monkeypatch, capsys):
    from dsv3.cli import main

    for k in tracking.runs.HTTP_DEFAULTS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(tracking.runs, "_EXPLICIT_URI", None)
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    t = time.monotonic()
    with pytest.raises(TrackingError, match=f"MLflow tracking server {uri} cannot be reached .Connection refused"):
        with tracking.start_run({"a": 1}, stage="never"):
            pytest.fail("the run must not start")
    assert time.monotonic() - t < 20, "bounded: MLflow's own retries would take minutes"

    shards = make_shards(tmp_path / "shards", n_docs=40)
    run = tmp_path / "run"
    rc = main(["pretrain", "--config", CONFIG, f"--set=train.shards={shards}", f"--set=train.out_dir={run}",
               f"--set=train.tokenizer={run}/no-tokenizer", "--set=train.steps=2", "--set=train.threads=1", "--set=train.precision=fp32"])
    err = capsys.readouterr().err
    assert rc == 1
    lines = [x for x in err.splitlines() if x.startswith("dsv3: tracking error: ")]
    assert len(lines) == 1 and uri in lines[0] and "Traceback" not in err, err[-2000:]
    assert not _steps(run / "metrics.jsonl") and not (run / "checkpoints").exists()  # nothing was run
