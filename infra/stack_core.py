"""State, environment and processes of the server-mode stack (used by infra/stack.py).

- state.json in the state dir: the stack id, ports (picked free on 127.0.0.1, then kept), pids with
  their start times (a recycled pid is never taken for a part), generated secrets (mode 0600).
- Every process started here has DSV3_STACK_ID=<stack id> in its environment: `marked_processes`
  finds exactly what the stack started, including daemons that left their process group.
- `wait_healthy` polls a part's health check until a timeout, failing early if the process died,
  and names the part and its log in the error.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: mlflow, prefect, ray, moto_server
HOST = "127.0.0.1"
WAVES = (("postgres", "s3", "ray-head"), ("mlflow", "prefect-server", "ray-node2"), ("prefect-worker",))
PARTS = tuple(p for w in WAVES for p in w)
BUCKETS = {"mlflow": "dsv3-mlflow", "dvc": "dsv3-dvc", "checkpoints": "dsv3-checkpoints"}
RAY_PORTS = ("gcs", "dashboard", "client", "node_manager", "object_manager", "agent_http", "agent_grpc",
             "runtime_env_agent", "metrics")  # all chosen: Ray's defaults (6379, 10001, 52365) collide
PORTS = ["postgres", "s3", "mlflow", "prefect", "worker_health"] + [f"head_{p}" for p in RAY_PORTS] + \
    [f"node2_{p}" for p in RAY_PORTS if p not in ("gcs", "dashboard", "client")]


class StackError(RuntimeError):
    pass


@dataclass
class StackConfig:
    state: Path = REPO / ".stack"
    timeout: float = float(os.environ.get("DSV3_STACK_TIMEOUT", "300"))
    ray_cpus: int = 2               # logical CPUs per Ray node (scheduling slots, not cores)
    object_store_mb: int = 256      # per Ray node
    pool: str = "dsv3"              # Prefect work pool (infra/prefect.md)
    buckets: dict = field(default_factory=lambda: dict(BUCKETS))


# ---------------------------------------------------------------------------------------- state
def load_state(cfg: StackConfig) -> dict:
    f = cfg.state / "state.json"
    st = json.loads(f.read_text()) if f.exists() else {}
    st.setdefault("id", secrets.token_hex(8))
    st.setdefault("secrets", {"pg_user": "dsv3", "pg_password": secrets.token_urlsafe(18),
                              "aws_key": "dsv3stack", "aws_secret": secrets.token_urlsafe(24),
                              "ray_token": secrets.token_hex(32)})
    st.setdefault("ports", {})
    st.setdefault("procs", {})
    return st


def save_state(cfg: StackConfig, st: dict) -> None:
    cfg.state.mkdir(parents=True, exist_ok=True)
    f = cfg.state / "state.json"
    tmp = f.with_suffix(".tmp")
    tmp.write_text(json.dumps(st, indent=1))
    os.chmod(tmp, 0o600)  # holds the passwords
    tmp.replace(f)


def alive(rec: dict | None) -> bool:
    if not rec:
        return False
    try:
        p = psutil.Process(rec["pid"])
        return abs(p.create_time() - rec["ctime"]) < 0.01 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers bind: TIME_WAIT is no owner
        try:
            s.bind((HOST, port))
            return True
        except OSError:
            return False


def free_port(taken: set) -> int:
    while True:
        with socket.socket() as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in taken:
            return port


def assign_ports(st: dict) -> None:
    """Keep the recorded ports; when no part runs, re-pick any that another process now holds."""
    ports, running = st["ports"], any(alive(r) for r in st["procs"].values())
    for name in PORTS:
        if name not in ports or (not running and not port_free(ports[name])):
            ports[name] = free_port(set(ports.values()))


def ray_tmp(cfg: StackConfig, node: str) -> Path:
    """Ray's temp dir. Its unix sockets (<tmp>/session_<date>_<pid>/sockets/plasma_store) must fit
    in 107 bytes, so a long state path gets a short dir in /tmp, linked from the state dir."""
    want = cfg.state.resolve() / "ray" / f"{node}-tmp"
    if len(str(want)) <= 40:
        return want
    short = Path("/tmp") / f"dsv3-ray-{hashlib.sha1(str(want).encode()).hexdigest()[:8]}"
    short.mkdir(parents=True, exist_ok=True)
    want.parent.mkdir(parents=True, exist_ok=True)
    if not want.is_symlink():
        shutil.rmtree(want, ignore_errors=True)
        want.symlink_to(short)
    return short


# ------------------------------------------------------------------------------------ the env
def user_env(cfg: StackConfig, st: dict) -> dict[str, str]:
    """What a user (or a worker) exports to use the stack instead of the laptop defaults."""
    p, s = st["ports"], st["secrets"]
    return {
        "MLFLOW_TRACKING_URI": f"http://{HOST}:{p['mlflow']}",
        "PREFECT_API_URL": f"http://{HOST}:{p['prefect']}/api",
        "RAY_ADDRESS": f"{HOST}:{p['head_gcs']}",
        "AWS_ACCESS_KEY_ID": s["aws_key"],
        "AWS_SECRET_ACCESS_KEY": s["aws_secret"],
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{HOST}:{p['s3']}",       # boto3 / s3fs / DVC
        "MLFLOW_S3_ENDPOINT_URL": f"http://{HOST}:{p['s3']}",  # MLflow's S3 client
        "RAY_AUTH_MODE": "token",  # Ray's token auth; drivers read the token from this file
        "RAY_AUTH_TOKEN_PATH": str(cfg.state / "ray" / "auth_token"),
        "DSV3_DVC_REMOTE": f"s3://{cfg.buckets['dvc']}/dsv3",
        "DSV3_CHECKPOINT_URI": f"s3://{cfg.buckets['checkpoints']}",
    }


def write_env(cfg: StackConfig, st: dict) -> None:
    env = user_env(cfg, st)
    lines = ["# dsv3 server-mode stack (infra/stack.py); `source` this file to use it"]
    lines += [f"export {k}={v}" for k, v in env.items()]
    lines += ["# DVC remote (once per checkout):",
              "#   dvc remote add -d stack $DSV3_DVC_REMOTE && dvc remote modify stack endpointurl $AWS_ENDPOINT_URL",
              f"# Ray dashboard: http://{HOST}:{st['ports']['head_dashboard']}",
              f"# Prefect UI:    http://{HOST}:{st['ports']['prefect']}"]
    (cfg.state / "env").write_text("\n".join(lines) + "\n")
    (cfg.state / "env.json").write_text(json.dumps(env, indent=1))
    os.chmod(cfg.state / "env", 0o600)
    os.chmod(cfg.state / "env.json", 0o600)


def proc_env(cfg: StackConfig, st: dict, extra: dict | None = None, drop=("RAY_ADDRESS",)) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_", "RAY_AUTH"))
           and k not in ("RAY_ADDRESS", "DSV3_STACK_ID", "PGPASSWORD")}
    env.update(user_env(cfg, st))
    for k in drop:
        env.pop(k, None)
    env.update(extra or {})
    # the venv's bin first, as the image's PATH has it: `python` / `dsv3` in a Ray job's entrypoint,
    # a flow run's subprocesses, ... are the project's
    env.update(DSV3_STACK_ID=st["id"], PYTHONUNBUFFERED="1", PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]))
    return env


# --------------------------------------------------------------------------------- processes
def launch(cfg: StackConfig, st: dict, name: str, cmd: list[str], env: dict, cwd: Path,
            as_user: dict | None = None) -> subprocess.Popen:
    logs = cfg.state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    cwd.mkdir(parents=True, exist_ok=True)
    with open(logs / f"{name}.log", "ab") as log:
        log.write(f"\n=== {time.strftime('%F %T')} {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=cwd, start_new_session=True, **(as_user or {}))
    st["procs"][name] = {"pid": proc.pid, "ctime": psutil.Process(proc.pid).create_time(), "cmd": cmd[:3]}
    save_state(cfg, st)
    return proc


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def wait_healthy(cfg: StackConfig, st: dict, name: str, check, what: str) -> None:
    log = cfg.state / "logs" / f"{name}.log"
    deadline, last = time.monotonic() + cfg.timeout, None
    while time.monotonic() < deadline:
        if not alive(st["procs"].get(name)):
            raise StackError(f"stack: {name} exited before it became healthy ({what}); log: {log}\n{_tail(log)}")
        try:
            if check():
                return
        except Exception as e:  # noqa: BLE001 - any failure means "not yet"
            last = e
        time.sleep(0.5)
    raise StackError(f"stack: {name} not healthy within {cfg.timeout:.0f} s ({what}: {last}); log: {log}\n{_tail(log)}")


def http_get(url: str, headers: dict | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def stop_part(rec: dict, sig: int, grace: float, leader_first: bool = False) -> None:
    """Signal a part's process group (or first its leader alone, for `ray start --block`, which shuts
    its children down in order); SIGKILL the group if the leader is still there after `grace` s."""
    if not alive(rec):
        return
    pid = rec["pid"]
    steps = [(lambda: os.killpg(pid, sig), grace)]
    if leader_first:
        steps.insert(0, (lambda: os.kill(pid, sig), grace))
    for target, wait in steps:
        try:
            target()
            psutil.Process(pid).wait(wait)
            break
        except (psutil.TimeoutExpired, ProcessLookupError):
            continue
        except psutil.Error:
            break
    try:
        os.killpg(pid, signal.SIGKILL if alive(rec) else signal.SIGTERM)  # children the leader left behind
    except (ProcessLookupError, PermissionError):
        pass


def marked_processes(stack_id: str) -> list[psutil.Process]:
    """Every live process whose environment carries this stack's DSV3_STACK_ID."""
    mark, out = f"DSV3_STACK_ID={stack_id}".encode(), []
    for p in psutil.process_iter():
        try:
            with open(f"/proc/{p.pid}/environ", "rb") as f:
                if mark in f.read().split(b"\0") and p.status() != psutil.STATUS_ZOMBIE:
                    out.append(p)
        except (OSError, psutil.Error):
            continue
    return out
