"""`make deploy` / `make deploy-down`: the dsv3 flows as Prefect deployments on a local server.

    python infra/deploy.py up   [--port 4200] [--pool dsv3] [--state .prefect] [--repo .]
    python infra/deploy.py down [--state .prefect]
    python infra/deploy.py status

`up`: reuses the Prefect server at $PREFECT_API_URL (else http://127.0.0.1:PORT/api) when it
answers, otherwise starts `prefect server start` on 127.0.0.1 in the background (bounded wait);
creates the process work pool when missing; registers the deployments of prefect.yaml whose
flow file exists (`prefect --no-prompt deploy -n ...` from the repo root, so a worker runs them
from this checkout); starts one process worker (`--limit 1`: one training run at a time) unless
one started earlier still runs. Pids and logs go to STATE (`server.pid`, `worker.pid`,
`*.log`). `down` stops the worker and the server this script started (by the pids it wrote),
nothing else. The server's database is Prefect's default ($PREFECT_HOME, ~/.prefect), the one
`make pretrain` & co. use through Prefect's local API, so their runs show in the same UI.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from servers import answers, running, start_detached, stop_pidfile, wait_until_up  # noqa: E402

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def prefect(*args: str, env: dict, cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([str(BIN / "prefect"), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    if check and r.returncode:
        raise RuntimeError(f"prefect {' '.join(args)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def deployments(repo: Path) -> tuple[list[str], list[str]]:
    """(names to deploy, names skipped because their flow file is not in this checkout)."""
    spec = yaml.safe_load((repo / "prefect.yaml").read_text())
    ok, skipped = [], []
    for d in spec["deployments"]:
        (ok if (repo / d["entrypoint"].split(":")[0]).is_file() else skipped).append(d["name"])
    return ok, skipped


def up(port: int, pool: str, state: Path, repo: Path, server_timeout: float = 240.0) -> dict:
    api = os.environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
    if answers(f"{api}/health"):
        print(f"reusing the Prefect server at {api}")
    else:
        if "127.0.0.1" not in api and "localhost" not in api:
            raise RuntimeError(f"PREFECT_API_URL={api} does not answer, and is not a local server to start")
        print(f"starting a Prefect server on 127.0.0.1:{port} (log {state / 'server.log'})")
        ui = {"PREFECT_UI_API_URL": api, "PREFECT_SERVER_UI_API_URL": api}  # the UI calls this server's API
        start_detached([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                       state / "server.log", state / "server.pid", env={**env, **ui}, cwd=repo)
        wait_until_up(f"{api}/health", server_timeout, log=state / "server.log", what="prefect server")
    if prefect("work-pool", "inspect", pool, env=env, check=False).returncode:
        prefect("work-pool", "create", pool, "--type", "process", env=env)
        print(f"created the process work pool {pool!r}")
    names, skipped = deployments(repo)
    args = [a for n in names for a in ("-n", n)]
    prefect("--no-prompt", "deploy", *args, "--pool", pool, env=env, cwd=repo)
    print(f"registered deployments: {', '.join(names)}"
          + (f" (skipped, flow file missing: {', '.join(skipped)})" if skipped else ""))
    if running(state / "worker.pid"):
        print(f"reusing the worker started earlier (pid {running(state / 'worker.pid')})")
    else:
        start_detached([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--name", f"{pool}-local",
                        "--limit", "1"], state / "worker.log", state / "worker.pid", env=env, cwd=repo)
        print(f"started a process worker on pool {pool!r} (log {state / 'worker.log'})")
    ui = api.removesuffix("/api")
    print(f"\nPrefect UI: {ui}/deployments  (Custom run shows each flow's typed parameter form)\n"
          f"From a shell: PREFECT_API_URL={api} prefect deployment run data/data\n"
          f"Send `make` flows to this server too: export PREFECT_API_URL={api}\n"
          f"Stop the worker and the server started here: make deploy-down")
    return {"api": api, "deployments": names, "skipped": skipped}


def down(state: Path) -> None:
    for what in ("worker", "server"):
        stopped = stop_pidfile(state / f"{what}.pid")
        print(f"{what}: {'stopped' if stopped else 'not running (not started by make deploy)'}")


def status(state: Path, port: int) -> None:
    api = os.environ.get("PREFECT_API_URL") or f"http://127.0.0.1:{port}/api"
    print(f"server {api}: {'up' if answers(api + '/health') else 'down'}; "
          f"started here: {running(state / 'server.pid') or 'no'}; worker: {running(state / 'worker.pid') or 'no'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python infra/deploy.py", description=__doc__.splitlines()[0])
    ap.add_argument("action", choices=["up", "down", "status"])
    ap.add_argument("--port", type=int, default=int(os.environ.get("PREFECT_PORT", 4200)))
    ap.add_argument("--pool", default="dsv3")
    ap.add_argument("--state", default=str(REPO / ".prefect"), help="pid files and logs")
    ap.add_argument("--repo", default=str(REPO))
    a = ap.parse_args(argv)
    state, repo = Path(a.state).resolve(), Path(a.repo).resolve()
    try:
        if a.action == "up":
            up(a.port, a.pool, state, repo)
        elif a.action == "down":
            down(state)
        else:
            status(state, a.port)
    except RuntimeError as e:
        print(f"deploy: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
