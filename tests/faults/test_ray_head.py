"""The Ray head restarted between runs: a real `ray start --head` on a free port with its own
temp dir, training through dsv3.train.launcher.run_training with RAY_ADDRESS set.

- `dsv3 pretrain --ray` is interrupted (driver SIGKILLed mid-run), the head is killed and started again on
  the same port, and `dsv3 pretrain --ray --resume` reconnects and resumes from the latest checkpoint:
  every step's loss equals an uninterrupted in-process run's, bitwise.
- One long-lived driver process (a flow worker, a notebook) runs training, the head restarts, and its next
  `run_training` connects to the new head. (Were it still connected, Ray would end the whole process with
  status 1 and no message when the head goes away: what this test saw before run_training disconnected.)
A Ray worker killed mid-step (the group restarts from the latest checkpoint) is
tests/train/test_ray.py::test_local_two_workers_restart_after_worker_death.

The cluster uses Ray's token authentication (a token of its own in the temp dir; `ray start` turns it on
by default when a token exists, and a driver given an explicit address needs RAY_AUTH_MODE=token)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from dsv3.config import RunConfig
from dsv3.train.loop import train
from tests.train.conftest import make_shards

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
CONFIG = "configs/pretrain_tiny.yaml"
STEPS = 40


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayHead:
    """`ray start --head --block` in its own session: every port its own, a short temp dir (socket paths)."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="dsv3ray", dir="/tmp"))
        (self.dir / "token").write_text(secrets.token_hex(32))
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.dir / "token")}
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 180) -> None:
        self.starts += 1
        log = self.dir / f"head-{self.starts}.log"
        ports = {k: _free_port() for k in ("node-manager-port", "object-manager-port", "dashboard-port",
                                            "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                            "runtime-env-agent-port", "metrics-export-port")}
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={self.port}",
               "--node-ip-address=127.0.0.1", f"--temp-dir={self.dir}", "--num-cpus=2", "--include-dashboard=false",
               "--disable-usage-stats", "--include-log-monitor=false", "--object-store-memory=100000000",
               *(f"--{k}={v}" for k, v in ports.items())]
        with open(log, "w") as f:
            self.proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                         env={**os.environ, **self.env, "DSV3_TEST_RAY_HEAD": str(self.dir)})
        deadline = time.time() + timeout
        while "Ray runtime started" not in log.read_text():
            if self.proc.poll() is not None or time.time() > deadline:
                self.kill()
                raise RuntimeError(f"ray head did not start: {log.read_text()[-2000:]}")
            time.sleep(0.3)

    def processes(self, workers_only: bool = False) -> list[int]:
        """Every process of this cluster: the head's children and the workers they start (which rename
        themselves `ray::...` and leave the head's process group) inherit the head's DSV3_TEST_RAY_HEAD."""
        out, mark = [], f"DSV3_TEST_RAY_HEAD={self.dir}".encode()
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    if mark in (d / "environ").read_bytes().split(b"\0") and (
                            not workers_only or (d / "cmdline").read_bytes().startswith(b"ray::")):
                        out.append(int(d.name))
                except OSError:
                    pass
        return out

    def kill(self) -> None:
        """The head goes away: SIGKILL to its process group, then to any of its processes left over."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.time() + 30
        while self.processes() and time.time() < deadline:
            time.sleep(0.2)


@pytest.fixture
def head():
    h = RayHead()
    h.start()
    try:
        yield h
    finally:
        h.kill()
        shutil.rmtree(h.dir, ignore_errors=True)


def _sets(shards, out_dir) -> list[str]:
    return [f"train.shards={shards}", f"train.out_dir={out_dir}", f"train.tokenizer={out_dir}/no-tokenizer",
            f"train.steps={STEPS}", "train.ckpt_every=10", "train.eval_every=100", "train.threads=1",
            "train.plots=false", "train.precision=fp32", "train.log_checkpoints=false", "train.register_model=false",
            "parallel.dp=1"]


def _losses(run_dir) -> dict[int, float]:
    out = {}
    p = Path(run_dir) / "metrics.jsonl"
    for line in p.read_text().splitlines() if p.exists() else []:
        r = json.loads(line)
        if "train/loss" in r:
            out[r["step"]] = r["train/loss"]
    return out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    train(RunConfig.load(CONFIG, _sets(shards, out)), track=False)
    return _losses(out)


def _env(head: RayHead, tmp_path: Path) -> dict:
    return {**os.environ, **head.env, "RAY_ADDRESS": head.address, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlruns.db"}


def test_head_restarted_between_runs_resumes(head, shards, reference, tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "dsv3.cli", "pretrain", "--ray", "--config", CONFIG,
           *(f"--set={s}" for s in _sets(shards, run))]
    p = subprocess.Popen(cmd, cwd=ROOT, env=_env(head, tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         text=True)
    deadline = time.time() + 300
    while len(_losses(run)) < 12 and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert p.poll() is None, f"run 1 ended before it could be interrupted: {p.stderr.read()[-2000:]}"
    assert head.processes(workers_only=True), "the training worker is one of the cluster's processes"
    os.kill(p.pid, signal.SIGKILL)  # the driver dies mid-run ...
    p.wait()
    p.stderr.close()
    head.kill()  # ... and the cluster's head goes away with its workers
    assert not head.processes()
    done = max(_losses(run))
    time.sleep(2)
    assert max(_losses(run)) == done, "no orphaned worker goes on training"
    assert 12 <= done < STEPS
    head.start()  # the same address, a new Ray session

    r = subprocess.run(cmd + ["--resume"], cwd=ROOT, env=_env(head, tmp_path), capture_output=True, text=True,
                       timeout=400)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (run / "train.log").read_text()
    resumed = [x for x in log.splitlines() if "resumed from" in x]
    assert len(resumed) == 1 and "step_000000" in resumed[0], log[-2000:]
    from_step = int(resumed[0].split("step_")[1][:8])
    assert 10 <= from_step <= done  # the latest checkpoint the first run completed
    got = _losses(run)
    assert sorted(got) == list(range(1, STEPS + 1))  # no step lost
    assert got == reference  # bitwise equal to an uninterrupted run
    assert len(list(head.dir.glob("session_2*"))) == 2  # two Ray sessions: the restarted head served run 2


DRIVER = """
import json, sys, time
from pathlib import Path
from dsv3.config import RunConfig
from dsv3.train.launcher import run_training

sets1, sets2, go = json.loads(sys.argv[1])
run_training(RunConfig.load("configs/pretrain_tiny.yaml", sets1), progress=False)
print("first run done", flush=True)
while not Path(go).exists():
    time.sleep(0.1)
res = run_training(RunConfig.load("configs/pretrain_tiny.yaml", sets2), progress=False)
print("second run done", res["checkpoint"], flush=True)
"""


def test_one_driver_reconnects_after_a_head_restart(head, shards, reference, tmp_path):
    go = tmp_path / "go"
    arg = json.dumps([_sets(shards, tmp_path / "a"), _sets(shards, tmp_path / "b"), str(go)])
    p = subprocess.Popen([sys.executable, "-c", DRIVER, arg], cwd=ROOT, env=_env(head, tmp_path),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        assert line.startswith("first run done"), (line, p.stderr.read()[-3000:] if p.poll() is not None else "")
        head.kill()
        head.start()
        go.touch()
        out, err = p.communicate(timeout=300)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0 and "second run done" in out, (out[-2000:], err[-3000:])
    assert _losses(tmp_path / "a") == reference and _losses(tmp_path / "b") == reference
