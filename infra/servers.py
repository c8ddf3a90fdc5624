"""Local loopback servers for `make deploy` and `make screenshots`: free ports, bounded starts,
stops by process group id (only the processes these helpers started).

`serving(cmd, url)` / `serving_all(specs)` are context managers (start, wait until each `url`
answers, always stop);
`start_detached` / `stop_pidfile` keep a server or worker running between `make` calls, with a
pid file and a log under the state dir (`make deploy-down` stops them).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str, timeout: float = 3.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return 200 <= r.status < 400
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _tail(log: Path | None, n: int = 3000) -> str:
    return log.read_text(errors="replace")[-n:] if log and log.is_file() else ""


def wait_until_up(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None,
                  what: str = "server") -> None:
    """Poll `url` until it answers (bounded by `timeout` s); RuntimeError with the log tail otherwise."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if answers(url):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} before {url} answered:\n{_tail(log)}")
        time.sleep(0.5)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout:.0f} s:\n{_tail(log)}")


def _spawn(cmd: list[str], log: Path, env: dict | None, cwd: str | Path | None) -> subprocess.Popen:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as f:  # the child keeps its own handle
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)


def stop_group(pid: int, grace: float = 15.0) -> None:
    """SIGTERM the process group led by `pid` (a session we started), SIGKILL after `grace` s."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                return
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
            time.sleep(0.2)


@contextlib.contextmanager
def serving_all(specs: list[dict], timeout: float = 180.0) -> Iterator[list[subprocess.Popen]]:
    """Start every server of `specs` ({cmd, url, log, env?, cwd?, what?}) at once, each in its own
    session; each `url` must answer within `timeout` s; all are stopped when the block ends."""
    procs: list[subprocess.Popen] = []
    try:
        for sp in specs:
            procs.append(_spawn(sp["cmd"], sp["log"], sp.get("env"), sp.get("cwd")))
        for sp, proc in zip(specs, procs):
            wait_until_up(sp["url"], timeout, proc, sp["log"], sp.get("what", "server"))
        yield procs
    finally:
        for proc in procs:
            stop_group(proc.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)


@contextlib.contextmanager
def serving(cmd: list[str], url: str, log: Path, env: dict | None = None, timeout: float = 180.0,
            cwd: str | Path | None = None, what: str = "server") -> Iterator[subprocess.Popen]:
    """Run `cmd` in its own session until the block ends; `url` must answer within `timeout` s."""
    with serving_all([{"cmd": cmd, "url": url, "log": log, "env": env, "cwd": cwd, "what": what}], timeout) as procs:
        yield procs[0]


def start_detached(cmd: list[str], log: Path, pidfile: Path, env: dict | None = None,
                   cwd: str | Path | None = None) -> subprocess.Popen:
    """Start `cmd` in its own session, left running; its pid goes to `pidfile`."""
    proc = _spawn(cmd, log, env, cwd)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    pidfile.write_text(f"{proc.pid}\n")
    return proc


def running(pidfile: Path) -> int | None:
    """The pid in `pidfile` when that process group is still alive, else None."""
    try:
        pid = int(pidfile.read_text().split()[0])
        os.killpg(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, IndexError, ProcessLookupError, PermissionError):
        return None


def stop_pidfile(pidfile: Path) -> bool:
    """Stop the process group named in `pidfile` (if alive) and remove the file; True if one was stopped."""
    pid = running(pidfile)
    if pid is not None:
        stop_group(pid)
    pidfile.unlink(missing_ok=True)
    return pid is not None
