"""Sandboxed execution of model-written code (HumanEval pass@k, DeepSeek-V3 §4.4 / §5.3).

`run_code(program, timeout_s=10.0, memory_mb=512) -> SandboxResult(ok, returncode, stdout,
stderr, reason)`. What is enforced, per run:
- a separate process, its own session/process group (`start_new_session`), started as
  `python -I -S` (isolated: no env vars, no user site, no site-packages) with a scrubbed
  environment (PATH, LANG only) in a fresh temp directory that is deleted afterwards;
- wall-clock timeout: the process group is SIGKILLed, and then every process still owned
  by the run's uid (catches children that called setsid);
- RLIMIT_CPU (timeout + 1 s), RLIMIT_AS (memory_mb), RLIMIT_NPROC (16), RLIMIT_FSIZE (16 MB,
  stdout/stderr are files too, so a print loop cannot fill memory), RLIMIT_NOFILE (64), no core;
- when running as root (our containers): a private network namespace with no interfaces
  (unshare CLONE_NEWNET) and a throw-away uid/gid per run, so the fork limit is enforced
  (root ignores RLIMIT_NPROC) and files outside the working dir are not writable;
- always: an audit hook refusing socket creation and writes/deletes outside the working dir
  (best effort on its own: ctypes or os.* syscalls can bypass a hook, the uid drop cannot).
  After the uid drop only the preloaded stdlib modules (`PRELOAD`) are importable.
Not enforced: read access to world-readable files, CPU pinning. `ENFORCED` records the mode.
`reason` is "" on success, else "timeout", "memory", "cpu", "fsize", "signal:N", "exit:N".
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

_CHILD = str(Path(__file__).with_name("_sandbox_child.py"))
_UID_BASE = 200_000
_counter = itertools.count()
_lock = threading.Lock()
MAX_OUTPUT = 64 * 1024
ENFORCED = {"root": os.geteuid() == 0, "netns": os.geteuid() == 0, "uid_drop": os.geteuid() == 0,
            "rlimits": True, "audit_hook": True, "wall_timeout": True, "tempdir": True}


@dataclass
class SandboxResult:
    ok: bool
    returncode: int | None
    stdout: str
    stderr: str
    reason: str = ""


def _next_uid() -> int:
    with _lock:
        return _UID_BASE + (os.getpid() % 1000) * 1000 + next(_counter) % 1000


def _kill_uid(uid: int) -> None:
    """SIGKILL every process whose real uid is `uid` (stragglers that left the group)."""
    for _ in range(3):
        found = False
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/status") as f:
                    for line in f:
                        if line.startswith("Uid:"):
                            if int(line.split()[1]) == uid:
                                os.kill(int(d), signal.SIGKILL)
                                found = True
                            break
            except (OSError, ValueError):
                continue
        if not found:
            return
        time.sleep(0.05)


def _read(path: Path) -> str:
    with open(path, "rb") as f:
        return f.read(MAX_OUTPUT).decode("utf-8", "replace")


def run_code(program: str, timeout_s: float = 10.0, memory_mb: int = 512, nproc: int = 16) -> SandboxResult:
    """Run `program` (Python source) in the sandbox; ok iff it exits 0 within the limits."""
    root = os.geteuid() == 0
    uid = _next_uid() if root else 0
    work = Path(tempfile.mkdtemp(prefix="dsv3-sbx-"))
    logs = Path(tempfile.mkdtemp(prefix="dsv3-sbx-log-"))
    try:
        (work / "main.py").write_text(program)
        if root:
            os.chown(work, uid, uid)
            os.chown(work / "main.py", uid, uid)
        cmd = [sys.executable, "-I", "-S", "-B", _CHILD, str(uid), str(int(timeout_s) + 1), str(memory_mb),
               str(nproc), "main.py"]
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "PYTHONHASHSEED": "0", "HOME": str(work)}
        with open(logs / "out", "wb") as out, open(logs / "err", "wb") as err:
            proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, start_new_session=True, close_fds=True)
            timed_out = False
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                rc = None
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if root:
                _kill_uid(uid)
            if rc is None:
                proc.wait()
        stdout, stderr = _read(logs / "out"), _read(logs / "err")
        reason = _reason(timed_out, rc, stderr)
        return SandboxResult(ok=reason == "", returncode=rc, stdout=stdout, stderr=stderr, reason=reason)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(logs, ignore_errors=True)


def _reason(timed_out: bool, rc: int | None, stderr: str) -> str:
    if timed_out:
        return "timeout"
    if rc == 0:
        return ""
    if rc is not None and rc < 0:
        sig = -rc
        return {signal.SIGXCPU: "cpu", signal.SIGXFSZ: "fsize", signal.SIGKILL: "signal:9"}.get(sig, f"signal:{sig}")
    if "MemoryError" in stderr:
        return "memory"
    return f"exit:{rc}"


def check_program(prompt: str, completion: str, test: str, entry_point: str) -> str:
    """The HumanEval program: prompt + completion + tests + `check(entry_point)`."""
    return f"{prompt}{completion}\n\n{test}\n\ncheck({entry_point})\n"


def run_many(programs: list[str], workers: int = 2, timeout_s: float = 10.0,
             memory_mb: int = 512) -> list[SandboxResult]:
    """Run programs concurrently (threads only wait on child processes)."""
    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        return list(ex.map(lambda p: run_code(p, timeout_s=timeout_s, memory_mb=memory_mb), programs))
