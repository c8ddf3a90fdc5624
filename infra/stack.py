"""Server-mode stack on one machine: `python infra/stack.py up|down|status|env [--state DIR]`.

Each part is the real server its users run in a cluster; only addresses and credentials differ:
- PostgreSQL (Debian's package): a private cluster initdb'd into the state dir, run as an
  unprivileged OS user (postgres refuses root), databases `mlflow` and `prefect`, password auth.
- S3 on loopback: moto's server (`moto[server]`). MinIO's server is not in any registry reachable
  here (PyPI / Debian / npm ship only its clients). moto keeps objects in memory: they live as long
  as the stack; a DVC remote, MLflow artifacts and checkpoints on it vanish at `down`.
- MLflow tracking server: PostgreSQL backend, proxied artifacts (`--serve-artifacts
  --artifacts-destination s3://dsv3-mlflow/artifacts`), health-checked on /health.
- Prefect server on PostgreSQL (asyncpg), a `process` work pool `dsv3` and one worker
  (`--with-healthcheck`), which runs flows in its own working dir with the stack's env.
- Ray: a head and a second node, each with its own temp dir and working dir (no shared paths).

Design choices
- One state dir (default `.stack/`): state.json (ports, pids + start times, secrets), env / env.json
  (what a user exports), logs/<part>.log, pg/, prefect/, ray/. Ports are picked free on 127.0.0.1 at
  the first `up` and kept; `up` is idempotent (a live, healthy part is left alone; a dead one is
  restarted on its port).
- Every process started here carries DSV3_STACK_ID=<this stack's id> in its environment, so `down`
  stops exactly what `up` started (process groups first, then a sweep by that marker catches
  daemons that left the group, e.g. Ray workers) and never anything else, not even other Ray
  clusters on the machine (so no `ray stop`).
- Health checks wait with a timeout (DSV3_STACK_TIMEOUT, default 300 s, a loaded 2-core box);
  a failure names the part and its log and stops what this `up` started.
- Limitation (Ray, not configurable): the GCS, raylet and object manager gRPC servers bind all
  interfaces and Ray advertises the machine's own address for a node given 127.0.0.1; everything
  else listens on 127.0.0.1 only. Clients connect through 127.0.0.1.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stack_core import (  # noqa: E402
    BIN, HOST, PARTS, RAY_PORTS, REPO, WAVES, StackConfig, StackError, alive, assign_ports, http_get, launch,
    load_state, marked_processes, port_free, proc_env, ray_tmp, save_state, stop_part, user_env, wait_healthy,
    write_env,
)

__all__ = ["StackConfig", "StackError", "up", "down", "status", "s3_client", "marked_processes", "port_free"]

# ------------------------------------------------------------------------------------ the parts
def _pg_bin(tool: str) -> str:
    hits = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"), key=lambda b: int(b.parts[-3]))
    found = str(hits[-1]) if hits else shutil.which(tool)
    if not found:
        raise StackError(f"stack: postgres: `{tool}` not found; install Debian's `postgresql` (make sysdeps)")
    return found


def _as(user: str | None) -> dict:
    """Popen kwargs that drop to `user` with its own group and no supplementary (root) groups."""
    return {} if user is None else {"user": user, "group": pwd.getpwnam(user).pw_gid, "extra_groups": []}


def _pg_user() -> str | None:
    """postgres refuses to run as root: as root use the `postgres` account (Debian's package makes
    it) or a `dsv3stack` system user; as anyone else, that user."""
    if os.geteuid() != 0:
        return None
    for u in ("postgres", "dsv3stack"):
        try:
            return pwd.getpwnam(u).pw_name
        except KeyError:
            pass
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "dsv3stack"], check=True)
    return "dsv3stack"


def _let_reach(state: Path, pg: Path, user: str) -> None:
    """The postgres user must traverse every folder above its data dir: open up the state dir itself
    (search bit only: its files stay 0600), and name any folder above it that blocks the way."""
    if subprocess.run(["test", "-w", str(pg)], **_as(user)).returncode == 0:
        return
    state.chmod(state.stat().st_mode | 0o001)
    if subprocess.run(["test", "-w", str(pg)], **_as(user)).returncode != 0:
        blocked = next((str(d) for d in reversed(pg.parents) if not (d.stat().st_mode & 0o001)), str(pg))
        raise StackError(f"stack: postgres: user {user} cannot reach {pg} ({blocked} is not searchable by others); "
                         "use a state dir it can reach (--state / STACK_DIR)")


def start_postgres(cfg: StackConfig, st: dict) -> None:
    user, pg, s = _pg_user(), cfg.state / "pg", st["secrets"]
    pg.mkdir(parents=True, exist_ok=True)
    if user:
        shutil.chown(pg, user, pwd.getpwnam(user).pw_gid)
        os.chmod(pg, 0o700)
        _let_reach(cfg.state, pg, user)
    data = pg / "data"
    if not (data / "PG_VERSION").exists():
        pwfile = pg / "pwfile"
        pwfile.write_text(s["pg_password"] + "\n")
        if user:
            shutil.chown(pwfile, user, pwd.getpwnam(user).pw_gid)
        pwfile.chmod(0o600)
        r = subprocess.run([_pg_bin("initdb"), "-D", str(data), "-U", s["pg_user"], f"--pwfile={pwfile}",
                            "--auth=scram-sha-256", "-E", "UTF8", "--locale=C"],
                           cwd=pg, capture_output=True, text=True, **_as(user))
        pwfile.unlink()
        (cfg.state / "logs").mkdir(parents=True, exist_ok=True)
        (cfg.state / "logs" / "initdb.log").write_text(r.stdout + r.stderr)
        if r.returncode:
            log = cfg.state / "logs" / "initdb.log"
            raise StackError(f"stack: postgres: initdb failed (as user {user}); log: {log}\n"
                             f"{r.stderr[-2000:]}")
    launch(cfg, st, "postgres", [_pg_bin("postgres"), "-D", str(data), "-c", f"listen_addresses={HOST}",
                                  "-c", f"port={st['ports']['postgres']}", "-c", "unix_socket_directories=",
                                  "-c", "max_connections=200"], proc_env(cfg, st), pg, _as(user))


def ready_postgres(cfg: StackConfig, st: dict) -> None:
    import psycopg

    s = st["secrets"]

    def check() -> bool:  # connect, then make the two databases if missing
        with psycopg.connect(host=HOST, port=st["ports"]["postgres"], user=s["pg_user"], password=s["pg_password"],
                             dbname="postgres", connect_timeout=3, autocommit=True) as c:
            for db in ("mlflow", "prefect"):
                if c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,)).fetchone() is None:
                    c.execute(f'CREATE DATABASE "{db}"')
        return True

    wait_healthy(cfg, st, "postgres", check, f"connect to {HOST}:{st['ports']['postgres']}, create databases")


def pg_uri(st: dict, db: str, driver: str = "postgresql") -> str:
    """No password in the URI (it would show in `ps` and the logs): libpq (psycopg, MLflow) and
    asyncpg (Prefect) read PGPASSWORD from the two servers' environments (only theirs)."""
    return f"{driver}://{st['secrets']['pg_user']}@{HOST}:{st['ports']['postgres']}/{db}"


def start_s3(cfg: StackConfig, st: dict) -> None:
    launch(cfg, st, "s3", [sys.executable, "-m", "moto.server", "-H", HOST, "-p", str(st["ports"]["s3"])],
            proc_env(cfg, st), cfg.state / "s3")


def s3_client(env: dict):
    import boto3

    return boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"], region_name=env["AWS_DEFAULT_REGION"])


def ready_s3(cfg: StackConfig, st: dict) -> None:
    def check() -> bool:  # list, then make the buckets if missing (moto forgets them on restart)
        c = s3_client(user_env(cfg, st))
        have = {b["Name"] for b in c.list_buckets()["Buckets"]}
        for b in cfg.buckets.values():
            if b not in have:
                c.create_bucket(Bucket=b)
        return True

    wait_healthy(cfg, st, "s3", check, f"list/create buckets at {HOST}:{st['ports']['s3']}")


def _start_ray(cfg: StackConfig, st: dict, node: str) -> None:
    p = {k: str(st["ports"].get(f"{node}_{k}", "")) for k in RAY_PORTS}
    cmd = [str(BIN / "ray"), "start", "--block", "--node-ip-address", HOST, "--temp-dir", str(ray_tmp(cfg, node)),
           "--num-cpus", str(cfg.ray_cpus), "--object-store-memory", str(cfg.object_store_mb << 20),
           "--resources", json.dumps({f"dsv3_stack_{node}": 1}), "--disable-usage-stats",
           "--node-manager-port", p["node_manager"], "--object-manager-port", p["object_manager"],
           "--dashboard-agent-listen-port", p["agent_http"], "--dashboard-agent-grpc-port", p["agent_grpc"],
           "--runtime-env-agent-port", p["runtime_env_agent"], "--metrics-export-port", p["metrics"]]
    if node == "head":
        cmd += ["--head", "--port", p["gcs"], "--dashboard-host", HOST, "--dashboard-port", p["dashboard"],
                "--ray-client-server-port", p["client"]]
    else:
        cmd += ["--address", f"{HOST}:{st['ports']['head_gcs']}"]
    # each node has its own working dir: Ray workers start there (no shared filesystem)
    launch(cfg, st, f"ray-{node}", cmd, proc_env(cfg, st, {"RAY_USAGE_STATS_ENABLED": "0"}),
            cfg.state / "ray" / f"{node}-work")


def ray_nodes(st: dict) -> list[dict]:
    """ALIVE nodes from the head's state API (the dashboard)."""
    code, body = http_get(f"http://{HOST}:{st['ports']['head_dashboard']}/api/v0/nodes?limit=100&detail=true",
                       {"Authorization": f"Bearer {st['secrets']['ray_token']}"})
    if code != 200:
        raise StackError(f"ray dashboard answered {code}")
    return [n for n in json.loads(body)["data"]["result"]["result"] if n["state"] == "ALIVE"]


def _ready_ray(cfg: StackConfig, st: dict, node: str) -> None:
    key = f"dsv3_stack_{node}"
    wait_healthy(cfg, st, f"ray-{node}", lambda: any(key in n.get("resources_total", {}) for n in ray_nodes(st)),
          f"node with resource {key} ALIVE on the dashboard http://{HOST}:{st['ports']['head_dashboard']}")


def mlflow_cmd(cfg: StackConfig, st: dict) -> list[str]:
    """`mlflow server` as a team runs it (infra/docker-compose.mlflow.yml runs the same options)."""
    port = st["ports"]["mlflow"]
    return [str(BIN / "mlflow"), "server", "--backend-store-uri", pg_uri(st, "mlflow"), "--serve-artifacts",
            "--artifacts-destination", f"s3://{cfg.buckets['mlflow']}/artifacts", "--host", HOST, "--port", str(port),
            "--workers", "1", "--allowed-hosts", f"{HOST}:{port},localhost:{port}"]


def start_mlflow(cfg: StackConfig, st: dict) -> None:
    # MLflow's job runner (7 huey consumer processes for GenAI jobs dsv3 does not use) stays off
    env = proc_env(cfg, st, {"PGPASSWORD": st["secrets"]["pg_password"], "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    launch(cfg, st, "mlflow", mlflow_cmd(cfg, st), env, cfg.state / "mlflow")


def ready_mlflow(cfg: StackConfig, st: dict) -> None:
    url = f"http://{HOST}:{st['ports']['mlflow']}/health"
    wait_healthy(cfg, st, "mlflow", lambda: http_get(url)[0] == 200, f"GET {url}")


def start_prefect_server(cfg: StackConfig, st: dict) -> None:
    env = proc_env(cfg, st, {"PREFECT_HOME": str(cfg.state / "prefect" / "server-home"),
                              "PREFECT_SERVER_DATABASE_CONNECTION_URL": pg_uri(st, "prefect", "postgresql+asyncpg"),
                              "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PGPASSWORD": st["secrets"]["pg_password"]},
                   drop=("RAY_ADDRESS", "PREFECT_API_URL"))
    launch(cfg, st, "prefect-server", [str(BIN / "prefect"), "server", "start", "--host", HOST,
                                        "--port", str(st["ports"]["prefect"])], env, cfg.state / "prefect" / "server")


def ready_prefect_server(cfg: StackConfig, st: dict) -> None:
    url = f"http://{HOST}:{st['ports']['prefect']}/api/health"
    wait_healthy(cfg, st, "prefect-server", lambda: http_get(url)[0] == 200, f"GET {url}")


def start_prefect_worker(cfg: StackConfig, st: dict) -> None:
    env = proc_env(cfg, st, {"PREFECT_HOME": str(cfg.state / "prefect" / "worker-home"),
                              "PREFECT_WORKER_WEBSERVER_HOST": HOST,
                              "PREFECT_WORKER_WEBSERVER_PORT": str(st["ports"]["worker_health"])}, drop=())
    api = user_env(cfg, st)["PREFECT_API_URL"]
    if http_get(f"{api}/work_pools/{cfg.pool}")[0] == 404:
        r = subprocess.run([str(BIN / "prefect"), "work-pool", "create", cfg.pool, "--type", "process"], env=env,
                           capture_output=True, text=True, timeout=cfg.timeout)
        if r.returncode:
            raise StackError(f"stack: prefect-worker: `prefect work-pool create {cfg.pool}` failed:\n"
                             f"{r.stdout}{r.stderr}")
    launch(cfg, st, "prefect-worker", [str(BIN / "prefect"), "worker", "start", "--pool", cfg.pool, "--type", "process",
                                        "--name", f"dsv3-stack-{st['id']}", "--with-healthcheck"],
            env, cfg.state / "prefect" / "worker-work")


def ready_prefect_worker(cfg: StackConfig, st: dict) -> None:
    url = f"http://{HOST}:{st['ports']['worker_health']}/health"
    wait_healthy(cfg, st, "prefect-worker", lambda: http_get(url)[0] == 200, f"GET {url} (the worker polls its pool)")


PART_FNS = {
    "postgres": (start_postgres, ready_postgres),
    "s3": (start_s3, ready_s3),
    "ray-head": (lambda c, s: _start_ray(c, s, "head"), lambda c, s: _ready_ray(c, s, "head")),
    "mlflow": (start_mlflow, ready_mlflow),
    "prefect-server": (start_prefect_server, ready_prefect_server),
    "ray-node2": (lambda c, s: _start_ray(c, s, "node2"), lambda c, s: _ready_ray(c, s, "node2")),
    "prefect-worker": (start_prefect_worker, ready_prefect_worker),
}


# ----------------------------------------------------------------------------------- commands
@contextlib.contextmanager
def _locked(cfg: StackConfig):
    """One `up` / `down` at a time per state dir (a second waits, then finds the parts healthy)."""
    cfg.state.mkdir(parents=True, exist_ok=True)
    with open(cfg.state / ".lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


MAIN_PORT = {"postgres": "postgres", "s3": "s3", "mlflow": "mlflow", "prefect-server": "prefect",
             "prefect-worker": "worker_health", "ray-head": "head_gcs", "ray-node2": "node2_node_manager"}


def _stop_named(name: str, rec: dict | None) -> None:
    sig = signal.SIGINT if name == "postgres" else signal.SIGTERM  # SIGINT: postgres' fast shutdown
    stop_part(rec, sig, 30, leader_first=name.startswith("ray"))  # `ray start --block` stops its own


def up(cfg: StackConfig) -> dict:
    with _locked(cfg):
        return _up(cfg)


def _up(cfg: StackConfig) -> dict:
    t0 = time.monotonic()
    cfg.state.mkdir(parents=True, exist_ok=True)
    st = load_state(cfg)
    assign_ports(st)
    save_state(cfg, st)
    write_env(cfg, st)
    tok = cfg.state / "ray" / "auth_token"
    tok.parent.mkdir(parents=True, exist_ok=True)
    tok.write_text(st["secrets"]["ray_token"])
    tok.chmod(0o600)
    started: list[str] = []
    try:
        for wave in WAVES:  # start a wave's parts together, then wait on each one's health check
            for name in wave:
                if not alive(st["procs"].get(name)):
                    PART_FNS[name][0](cfg, st)
                    started.append(name)
            for name in wave:
                PART_FNS[name][1](cfg, st)
                print(f"stack: {name:15s} ok  ({time.monotonic() - t0:5.1f} s)", flush=True)
    except BaseException:
        for name in reversed(started):  # leave nothing half-up that this call started
            _stop_named(name, st["procs"].pop(name, None))
        save_state(cfg, st)
        raise
    print(f"stack: up in {time.monotonic() - t0:.1f} s; `source {cfg.state}/env` to use it")
    return user_env(cfg, st)


def down(cfg: StackConfig) -> list[str]:
    if not (cfg.state / "state.json").exists():
        print("stack: nothing to stop (no state)")
        return []
    with _locked(cfg):
        return _down(cfg)


def _down(cfg: StackConfig) -> list[str]:
    st = load_state(cfg)
    stopped = []
    for name in reversed(PARTS):
        rec = st["procs"].get(name)
        if alive(rec):
            t = time.monotonic()
            _stop_named(name, rec)
            stopped.append(f"{name} ({time.monotonic() - t:.1f} s)")
        st["procs"].pop(name, None)
    me = {os.getpid()} | {p.pid for p in psutil.Process().parents()}  # a flow run may call `down`
    left = [p for p in marked_processes(st["id"]) if p.pid not in me]  # outside the groups: Ray workers, ...
    for p in left:
        p.terminate()
    _, still = psutil.wait_procs(left, timeout=10)
    for p in still:
        p.kill()
    save_state(cfg, st)
    print(f"stack: stopped {', '.join(stopped) or 'nothing'}" + (f"; swept {len(left)} stray" if left else ""))
    return stopped


def status(cfg: StackConfig) -> bool:
    if not (cfg.state / "state.json").exists():
        print("stack: not set up (no state)")
        return False
    st, ok = load_state(cfg), True
    cfg.timeout = 3.0
    for name in PARTS:
        rec = st["procs"].get(name)
        healthy = False
        if alive(rec):
            try:
                PART_FNS[name][1](cfg, st)
                healthy = True
            except StackError:
                pass
        ok &= healthy
        state = "healthy" if healthy else ("UNHEALTHY" if alive(rec) else "down")
        pid, port = rec["pid"] if rec else "-", st["ports"].get(MAIN_PORT[name], "-")
        print(f"{name:15s} {state:9s} pid={pid:<7} port={port:<6} log={cfg.state / 'logs' / (name + '.log')}")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["up", "down", "status", "env"])
    ap.add_argument("--state", default=os.environ.get("DSV3_STACK_DIR", str(REPO / ".stack")))
    ap.add_argument("--ray-cpus", type=int, default=None, help="logical CPUs per Ray node (default 2)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds to wait on each health check")
    a = ap.parse_args(argv)
    cfg = StackConfig(state=Path(a.state).resolve())
    cfg.ray_cpus = a.ray_cpus or cfg.ray_cpus
    cfg.timeout = a.timeout or cfg.timeout
    try:
        if a.command == "up":
            up(cfg)
        elif a.command == "down":
            down(cfg)
        elif a.command == "status":
            return 0 if status(cfg) else 3
        else:
            f = cfg.state / "env"
            if not f.exists():
                raise StackError(f"stack: no {f}; run `make stack-up` first")
            print(f.read_text(), end="")
    except StackError as e:
        print(e, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
